"""The compiled-artifact cache: one entry per program, keyed by everything that makes it valid, written
through a staging directory, checked against its manifest before use (aot/hub.py moves entries to and from the Hub)."""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import torch

from aot.hardware import Hardware
from aot.quantize import ACTIVATION_SCALE_FLOOR
from aot.report import Report

log = logging.getLogger("aot-space")

CACHE_FORMAT = 6  # bump when a change here alters what a compiled program contains
# Beside an entry's manifest: each package's checksum as last verified, with the file's size and mtime then.
# Local bookkeeping only; never uploaded (an upload carries the manifest, which holds the checksums).
VERIFIED = "verified.json"


def cache_key(pipe, family: str, model_id: str, revision: str | None, report: Report, hardware: Hardware, scope: str,
              shape: int | list, dynamic: bool, text: str, inductor_configs: dict) -> dict:
    """Everything that makes one compiled program valid; a program built under any other value is not reused.
    `shape`: the image tokens (or token grid) a static program serves, or the [min, max] tokens of a dynamic one.
    A program is native code for one architecture, torch and CUDA: a Hub repo may hold entries for several, each
    under its own key, and a start takes only its own (an H100's sm_90 programs are never loaded on sm_120)."""
    # The model's own settings only: diffusers' bookkeeping entries ("_use_default_values", a list whose order
    # follows the process's string hashing, and "_name_or_path") changed the key on every restart. A pre-quantized
    # transformer's config holds its torchao `quantization_config`: programs over weights stored in one torchao format
    # are not those over another, nor those over weights quantized at startup ("fp8" against "fp8 (pre-quantized)")
    config = json.dumps({k: v for k, v in pipe.transformer.config.items() if not k.startswith("_")}, sort_keys=True,
                        default=str)
    # the programs address weights by name and shape: fused projections or another layout are other programs
    weights = "".join(f"{name}:{tuple(t.shape)}:{t.dtype};" for name, t in pipe.transformer.state_dict().items())
    return {
        "format": CACHE_FORMAT,
        "family": family,
        "model_id": model_id,
        "revision": revision or getattr(pipe.transformer.config, "_commit_hash", None) or "",
        "transformer_config": hashlib.sha256(config.encode()).hexdigest()[:16],
        "weights": hashlib.sha256(weights.encode()).hexdigest()[:16],
        "torch": torch.__version__,
        "cuda": hardware.cuda if hardware.device == "cuda" else None,
        "arch": hardware.arch,
        "dtype": report.dtype,
        "quantization": report.quantization,
        "fp8_scales": report.fp8_granularity or None,
        # the floor is baked into each program's activation scaling: programs made before it (which give NaN on zero
        # rows, aot/quantize.py) are not these. Absent without fp8, so that no other program's key changes
        **({"fp8_activation_floor": ACTIVATION_SCALE_FLOOR} if report.quantization.startswith("fp8") else {}),
        "attention": report.attention,
        "scope": scope,
        "dynamic_shapes": dynamic,
        "image_tokens": shape,
        "text_tokens": text,
        "inductor": inductor_configs,
        # fused LoRAs change the weights' values, which "weights" above does not read: each one's file and scale (and
        # expert, where it names one). Absent without LoRAs, so that no other program's key changes
        **({"loras": [[lora["sha256"], lora["scale"], *([lora["expert"]] if "expert" in lora else [])]
                      for lora in report.loras]} if report.loras else {}),
        # a recipe other than the standard one may call the transformer in another batch at the same shape (LTX-2's
        # distilled one: one of batch one, where CFG's is of two). Absent for the standard one, as for LoRAs
        **({"recipe": report.recipe} if report.recipe != "standard" else {}),
    }


def key_digest(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _stamp(path: Path) -> list[int]:
    stat = path.stat()
    return [stat.st_size, stat.st_mtime_ns]


def _intact(root: Path, name: str, digest: str, verified: dict) -> bool:
    """Whether package `name` has checksum `digest`. A file hashed before, and unchanged since (same size and
    modification time, recorded in VERIFIED), is not hashed again: a restart need not read every package."""
    path = root / name
    if verified.get(name) == [digest, *_stamp(path)]:
        return True
    if _sha256(path) != digest:
        return False
    verified[name] = [digest, *_stamp(path)]
    return True


def read_cached(root: Path, key: dict) -> dict | None:
    """The manifest of entry `root` (one program) if it is usable: it matches `key` and every package is intact."""
    if not root.exists():
        return None
    try:
        manifest = json.loads((root / "manifest.json").read_text())
        if manifest["key"] != json.loads(json.dumps(key)):
            raise ValueError("it was built for another key")
        if not manifest["sha256"]:
            raise ValueError("it holds no program")
        if not isinstance(manifest["signatures"], dict):
            raise ValueError("it has no input signatures")
        try:
            verified = json.loads((root / VERIFIED).read_text())
        except (OSError, ValueError):
            verified = {}
        before = dict(verified)
        for name, digest in manifest["sha256"].items():
            if not _intact(root, name, digest, verified):
                raise ValueError(f"{name} does not match its checksum")
    except (OSError, ValueError, KeyError, TypeError, AttributeError, json.JSONDecodeError) as err:
        log.warning("AoT cache %s is unusable (%s): recompiling", root, err)
        return None
    if verified != before:
        try:
            (root / VERIFIED).write_text(json.dumps(verified))
        except OSError as err:  # a read-only cache still works; it is hashed again next time
            log.info("AoT cache %s: could not record verified checksums (%s)", root, err)
    return manifest


def compile_into_cache(compile_to: Callable[[Path], dict], root: Path, key: dict, source: str = "") -> None:
    """Runs `compile_to(staging directory)` (which returns the programs' signatures), writes the manifest, and
    renames the directory into place, so that a crash never leaves a half-written entry that looks complete.
    `source`: where packages that were not compiled here came from (a foreign package), kept in the manifest."""
    root.parent.mkdir(parents=True, exist_ok=True)
    for stale in root.parent.glob(root.name + ".*"):  # left by a compile that was killed (never trusted: no rename)
        shutil.rmtree(stale, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=root.name + ".", dir=root.parent))
    try:
        signatures = compile_to(staging)
        packages = sorted(p.relative_to(staging).as_posix() for p in staging.rglob("*.pt2"))
        manifest = {"key": key, "signatures": signatures,
                    "sha256": {name: _sha256(staging / name) for name in packages}}
        if source:
            manifest["source"] = source
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=1))
        (staging / VERIFIED).write_text(json.dumps({name: [digest, *_stamp(staging / name)]
                                                    for name, digest in manifest["sha256"].items()}))
        shutil.rmtree(root, ignore_errors=True)
        staging.rename(root)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def entry_files(root: Path) -> list[str]:
    """What makes up cache entry `root`, relative to it: the manifest and its packages (not local bookkeeping)."""
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and p.name != VERIFIED)


def measured_path(cache_dir: Path, digests: list[str], presets: list[str], card: str) -> Path:
    """Where a start's measurements on `card` are kept: each preset's timing and each call shape's CUDA graph check,
    for the programs `digests` at `presets`. Local bookkeeping, never uploaded: another card of the same
    architecture compiles to the same programs but runs them at another speed."""
    digest = hashlib.sha256(json.dumps([sorted(digests), sorted(presets), card]).encode()).hexdigest()[:20]
    return Path(cache_dir) / "measured" / f"{digest}.json"


def read_measured(path: Path) -> dict | None:
    try:
        measured = json.loads(path.read_text())
        return measured if isinstance(measured.get("timings"), dict) and isinstance(measured.get("graphs"), dict) \
            else None
    except (OSError, ValueError, AttributeError):
        return None


def write_measured(path: Path, timings: dict, graphs: dict) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"timings": timings, "graphs": graphs}, indent=1))
    except OSError as err:  # a read-only cache: the next start measures again
        log.info("AoT cache: could not keep this start's measurements in %s (%s)", path, err)
