"""The compiled-artifact cache: one entry per program, keyed by everything that makes it valid, written
through a staging directory, checked against its manifest before use; and the pinned Hub download."""
from __future__ import annotations

import hashlib
import json
import logging
import platform
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import torch

from aot.report import Report

log = logging.getLogger("aot-space")

CACHE_FORMAT = 4  # bump when a change here alters what a compiled program contains


def cache_key(pipe, family: str, model_id: str, revision: str | None, report: Report, scope: str,
              shape: int | list, dynamic: bool, text: str, inductor_configs: dict) -> dict:
    """Everything that makes one compiled program valid; a program built under any other value is not reused.
    `shape`: the image tokens (or token grid) a static program serves, or the [min, max] tokens of a dynamic one."""
    if report.device.startswith("cuda"):
        arch = "sm_%d%d" % torch.cuda.get_device_capability()
    else:
        from torch._inductor.cpu_vec_isa import pick_vec_isa

        arch = f"cpu-{platform.machine()}-{pick_vec_isa()}"
    config = json.dumps(dict(pipe.transformer.config), sort_keys=True, default=str)
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
        "arch": arch,
        "dtype": report.dtype,
        "quantization": report.quantization,
        "attention": report.attention,
        "scope": scope,
        "dynamic_shapes": dynamic,
        "image_tokens": shape,
        "text_tokens": text,
        "inductor": inductor_configs,
    }


def key_digest(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


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
        for name, digest in manifest["sha256"].items():
            if _sha256(root / name) != digest:
                raise ValueError(f"{name} does not match its checksum")
    except (OSError, ValueError, KeyError, TypeError, AttributeError, json.JSONDecodeError) as err:
        log.warning("AoT cache %s is unusable (%s): recompiling", root, err)
        return None
    return manifest


def compile_into_cache(compile_to: Callable[[Path], dict], root: Path, key: dict) -> None:
    """Runs `compile_to(staging directory)` (which returns the programs' signatures), writes the manifest, and
    renames the directory into place, so that a crash never leaves a half-written entry that looks complete."""
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=root.name + ".", dir=root.parent))
    try:
        signatures = compile_to(staging)
        packages = sorted(p.relative_to(staging).as_posix() for p in staging.rglob("*.pt2"))
        manifest = {"key": key, "signatures": signatures, "sha256": {name: _sha256(staging / name) for name in packages}}
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=1))
        shutil.rmtree(root, ignore_errors=True)
        staging.rename(root)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def fetch_from_hub(hub_repo: str, digests: list[str], cache_dir: Path, report: Report) -> None:
    """Downloads the cache entries `digests` from a revision-pinned Hub repo into the cache, in one call.
    They are checked against their manifests like any cached entry; anything missing or wrong is compiled."""
    from huggingface_hub import snapshot_download

    repo, _, revision = hub_repo.partition("@")
    try:
        snapshot_download(repo, revision=revision, allow_patterns=[f"{d}/*" for d in digests], local_dir=cache_dir)
    except Exception as err:  # noqa: BLE001 - offline, missing or gated: compile instead, and say so
        report.fallback("compiled packages", f"could not fetch {', '.join(digests)} from {hub_repo} "
                                             f"({type(err).__name__}: {err}); compiling here")
