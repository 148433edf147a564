"""Compiled programs on the Hub: the pinned download and the upload of cache entries. Whole-model entries travel as
their cache folders (`<digest>/`); regional ones in the layout `spaces.aoti_blocks_load(transformer, repo, variant)`
reads, a package per repeated block class and variant:

    <BlockClass>.<variant>/package.pt2   one per class in `transformer._repeated_blocks`
    config.<variant>.json                spaces reads its "kernels" only; the template's manifest: key, signatures,
                                         sha256 (of the entry's files) and "files" (entry file -> repo file)

A package in this layout without the template's manifest (one made by spaces' `aoti_compile_and_save`) is "foreign":
its key is unknown, so it is used only after it ran at every preset and matched the eager block there."""
from __future__ import annotations

import json
import logging
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from spaces.zero.torch.aoti import LazyAOTIModel, aoti_patch
from torch.utils._pytree import tree_leaves

from aot.cache import compile_into_cache, entry_files, key_digest
from aot.families import Text
from aot.model import repeated_block_lists
from aot.programs import capture_inputs, named_inputs, signature
from aot.report import Report

log = logging.getLogger("aot-space")

PACKAGE = "package.pt2"  # spaces' file name for a package
# A foreign package's output against the eager block's, relative L2: 1e-4 is what the tests hold the template's own
# programs to in float32 (tests/); half precision rounds differently once Inductor fuses, so 1e-2 (not measured on
# a GPU for foreign packages yet).
FOREIGN_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 1e-2}
_DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def variant(key: dict) -> str:
    """The variant naming one regional program, read from its cache key: quantization (or dtype), architecture,
    CUDA, torch, the program's image tokens, then 8 hex digits of the whole key's digest, so that two keys never
    share a variant: `fp8row-sm90-cu130-torch2.11-t4096-<digest>`, `fp32-cpu_x86_64_avx512-torch2.11-t16-<digest>`."""
    quantization = key["quantization"] + (key["fp8_scales"] or "") if key["quantization"] != "none" else \
        _DTYPES.get(key["dtype"], key["dtype"])
    tokens = key["image_tokens"]
    if key["dynamic_shapes"]:
        shape = f"t{tokens[0]}to{tokens[1]}"
    else:
        shape = "t" + ("x".join(map(str, tokens)) if isinstance(tokens, (list, tuple)) else str(tokens))
    parts = [quantization, re.sub(r"[-\s]+", "_", key["arch"].replace("sm_", "sm")),
             f"cu{key['cuda'].replace('.', '')}" if key["cuda"] else "",
             "torch" + ".".join(key["torch"].split("+")[0].split(".")[:2]), shape, key_digest(key)[:8]]
    return "-".join(re.sub(r"[^a-z0-9_.]", "", part.lower()) for part in parts if part)


def block_classes(transformer: torch.nn.Module) -> dict[str, str]:
    """Each repeated block list's class name, by list name: the entry's `submodules/<list>` is the repo's `<Class>`."""
    classes = {name: type(blocks[0]).__name__ for name, blocks in repeated_block_lists(transformer).items()}
    assert len(set(classes.values())) == len(classes), f"two block lists of one class: {classes}"
    return classes


def _config(name: str) -> str:
    return f"config.{name}.json" if name else "config.json"


def _package(cls: str, name: str) -> str:
    return f"{cls}.{name}/{PACKAGE}" if name else f"{cls}/{PACKAGE}"


def layout(key: dict, blocks: dict[str, str]) -> dict[str, str]:
    """A regional entry's packages and where they go in the repo: entry file -> repo file."""
    return {f"submodules/{name}/{PACKAGE}": _package(cls, variant(key)) for name, cls in blocks.items()}


def _stage_blocks(cache_dir: Path, digests: list[str], blocks: dict[str, str], staged: Path) -> list[str]:
    """Links the entries' packages into `staged` in spaces' layout, beside each variant's config (the manifest and
    its "files"). Returns the repo files."""
    files = []
    for digest in digests:
        manifest = json.loads((cache_dir / digest / "manifest.json").read_text())
        mapping = layout(manifest["key"], blocks)
        assert set(mapping) == set(manifest["sha256"]), f"{digest} holds {sorted(manifest['sha256'])}, not {mapping}"
        for source, target in mapping.items():
            (staged / target).parent.mkdir(parents=True, exist_ok=True)
            try:
                (staged / target).hardlink_to(cache_dir / digest / source)
            except OSError:  # another file system, or no hard links there
                shutil.copyfile(cache_dir / digest / source, staged / target)
        config = _config(variant(manifest["key"]))
        (staged / config).write_text(json.dumps({**manifest, "files": mapping}, indent=1))
        files += [config, *mapping.values()]
    return files


def upload_to_hub(hub_repo: str, cache_dir: Path, digests: list[str], report: Report, api=None,
                  blocks: dict[str, str] | None = None) -> str | None:
    """Uploads the cache entries `digests` to the model repo `hub_repo` in one commit, with the token in HF_TOKEN:
    whole-model entries as their folders (manifest and packages), regional ones (`blocks`: block_classes) in spaces'
    layout. Returns the commit to pin in AOT_HUB_REPO, or None after a failure, which is reported as a fallback: the
    Space serves what it compiled. `api`: a `huggingface_hub.HfApi`, or an object with its `create_repo` and
    `upload_folder`."""
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi()
    with tempfile.TemporaryDirectory(prefix="upload.", dir=cache_dir) as staged:  # beside the entries: hard links
        if blocks:
            folder, files = Path(staged), _stage_blocks(cache_dir, digests, blocks, Path(staged))
        else:
            folder = cache_dir
            files = [f"{digest}/{name}" for digest in digests for name in entry_files(cache_dir / digest)]
        try:
            api.create_repo(hub_repo, repo_type="model", private=True, exist_ok=True)
            commit = api.upload_folder(repo_id=hub_repo, repo_type="model", folder_path=folder, allow_patterns=files,
                                       commit_message=f"AoT programs {', '.join(digests)}")
            revision = commit.oid
        except Exception as err:  # noqa: BLE001 - no token, no write access, offline: keep serving, and say so
            report.fallback("hub upload", f"could not upload {', '.join(digests)} to {hub_repo} "
                                          f"({type(err).__name__}: {err}); they stay in {cache_dir} only")
            return None
    pin = f"{hub_repo}@{revision}"
    log.info("AoT programs uploaded to %s: set AOT_HUB_REPO=%s to download them instead of compiling", hub_repo, pin)
    report.hub_upload = {"repo": hub_repo, "commit": revision, "pin": f"AOT_HUB_REPO={pin}", "entries": digests,
                         "files": files}
    if blocks:
        report.hub_upload["variants"] = [f[len("config."):-len(".json")] for f in files if f.startswith("config.")]
        log.info("in another Space: spaces.aoti_blocks_load(pipe.transformer, %r, variant) with variant one of %s",
                 hub_repo, report.hub_upload["variants"])
    return revision


def fetch_from_hub(hub_repo: str, digests: list[str], cache_dir: Path, report: Report) -> None:
    """Downloads the whole-model cache entries `digests` from a revision-pinned Hub repo into the cache, in one call.
    They are checked against their manifests like any cached entry; anything missing or wrong is compiled."""
    from huggingface_hub import snapshot_download

    repo, _, revision = hub_repo.partition("@")
    try:
        snapshot_download(repo, revision=revision, allow_patterns=[f"{d}/*" for d in digests], local_dir=cache_dir)
    except Exception as err:  # noqa: BLE001 - offline, missing or gated: compile instead, and say so
        report.fallback("compiled packages", f"could not fetch {', '.join(digests)} from {hub_repo} "
                                             f"({type(err).__name__}: {err}); compiling here")


@dataclass(frozen=True)
class Foreign:
    """Packages in spaces' layout without the template's manifest: one per block list, downloaded."""

    repo: str
    packages: dict  # block list name -> (repo file, local path)

    @property
    def name(self) -> str:
        return ", ".join(f"{self.repo}/{file}" for file, _ in self.packages.values())


def _differences(built: dict, here: dict) -> str:
    """What a package's key says against this start's, field by field, what most often differs first:
    "arch sm_90, this is sm_120; torch 2.10.0, this is 2.11.0"."""
    first = ["arch", "torch", "cuda", "quantization", "fp8_scales", "dtype"]
    fields = first + sorted((set(built) | set(here)) - set(first))
    return "; ".join(f"{name} {built.get(name)}, this is {here.get(name)}" for name in fields
                     if built.get(name) != here.get(name))


def fetch_blocks(hub_repo: str, wanted: list[tuple[dict, Path]], blocks: dict[str, str], report: Report) -> list:
    """Regional programs from a revision-pinned repo in spaces' layout: each (key, entry directory) in `wanted` whose
    variant's config holds that very key becomes a cache entry (its manifest and packages, verified later as any
    entry is). A config built under another key (architecture, torch, CUDA, quantization, ...) is refused with the
    fields that differ. Returns the foreign candidates for the rest: `<Class>/package.pt2`, or `<Class>.<v>/...`
    beside a config without the template's manifest (spaces' own)."""
    from huggingface_hub import snapshot_download

    repo, _, revision = hub_repo.partition("@")
    try:
        snapshot = Path(snapshot_download(repo, revision=revision, allow_patterns=["config*.json"]))
        configs = {path.name.removeprefix("config").removesuffix(".json").removeprefix("."):
                   json.loads(path.read_text()) for path in snapshot.glob("config*.json")}
        ours = {name: config for name, config in configs.items() if "key" in config}
        found, missing = {}, []
        for key, root in wanted:
            key, name = json.loads(json.dumps(key)), variant(key)
            config = ours.get(name)
            if config is not None and config["key"] == key and config.get("files") == layout(key, blocks):
                found[root] = config
                continue
            missing.append(key)
            if config is not None:
                why = _differences(config["key"], key)
                report.fallback("compiled packages", f"{repo}'s {_config(name)} refused: " + (
                    f"built for {why}" if why else "its files are not this transformer's block classes"))
            elif ours:
                nearest = min(ours, key=lambda other: len(_differences(ours[other]["key"], key).split(";")))
                report.fallback("compiled packages", f"{repo} has no package for this start; the nearest, built for "
                                f"{_differences(ours[nearest]['key'], key)}, is refused ({_config(nearest)}; this "
                                f"start's: {_config(name)})")
        candidates = sorted({"", *(name for name in configs if name not in ours)}) if missing else []
        files = [f for config in found.values() for f in config["files"].values()]
        files += [_package(cls, name) for name in candidates for cls in blocks.values()]
        snapshot = Path(snapshot_download(repo, revision=revision, allow_patterns=files)) if files else snapshot
        for root, config in found.items():
            _write_entry({entry_file: snapshot / repo_file for entry_file, repo_file in config["files"].items()},
                         {name: config[name] for name in ("key", "signatures", "sha256")}, root)
    except Exception as err:  # noqa: BLE001 - offline, missing or gated: compile instead, and say so
        report.fallback("compiled packages", f"could not fetch from {hub_repo} ({type(err).__name__}: {err}); "
                                             "compiling here")
        return []
    foreign = [Foreign(repo, {list_name: (_package(cls, name), snapshot / _package(cls, name))
                                    for list_name, cls in blocks.items()}) for name in candidates]
    foreign = [f for f in foreign if all(path.is_file() for _, path in f.packages.values())]
    if missing and not foreign and not ours:
        report.fallback("compiled packages", f"{hub_repo} has no {', '.join(_config(variant(k)) for k in missing)} "
                                             "and no package without the template's manifest; compiling here")
    return foreign


def _write_entry(files: dict[str, Path], manifest: dict, root: Path) -> None:
    """A downloaded entry, with the uploader's manifest (read_cached checks the files against its checksums), renamed
    into place whole; a leftover `<root>.download` is a stale staging directory, as compile_into_cache's are."""
    staging = root.with_name(root.name + ".download")
    shutil.rmtree(staging, ignore_errors=True)
    _copy_entry(files, staging)
    (staging / "manifest.json").write_text(json.dumps(manifest, indent=1))
    shutil.rmtree(root, ignore_errors=True)
    staging.rename(root)


def _copy_entry(files: dict[str, Path], out: Path) -> None:
    for entry_file, path in files.items():
        (out / entry_file).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, out / entry_file)


def adopt_foreign(model, candidates: list[Foreign], presets: list, dynamic: bool, key: dict, root: Path,
                  refusals: list) -> str:
    """The first foreign candidate that runs at every preset of one program and matches the eager block there, made
    the cache entry `root` under this start's `key` (its manifest names where it came from). Runs on the device.
    A refused candidate is removed from `candidates` (every preset or none) and its reason appended to `refusals`.
    Returns the entry's source, or "" if none was accepted."""
    if dynamic or model.family.text is Text.DYNAMIC:
        axis = "DYNAMIC_SHAPES=1's image axis" if dynamic else f"{model.family.name}'s text axis"
        refusals += [f"{c.name} refused: {axis} is dynamic, and a foreign package's ranges cannot be known"
                     for c in candidates]
        candidates.clear()
        return ""
    lists = repeated_block_lists(model.pipe.transformer)
    for candidate in list(candidates):
        signatures, file = {}, ""
        try:
            for name, (file, path) in candidate.packages.items():
                block = lists[name][0]
                for preset in presets:
                    args, kwargs = capture_inputs(model, block, preset)
                    with torch.inference_mode():
                        want = tree_leaves(block(*args, **kwargs))
                        aoti_patch(block, LazyAOTIModel(path))
                        try:
                            got = tree_leaves(block(*args, **kwargs))
                        finally:
                            block.__dict__.pop("forward", None)
                    for w, g in zip(want, got, strict=True):
                        err = float((g.float() - w.float()).norm() / w.float().norm())
                        if not err <= FOREIGN_TOLERANCE.get(w.dtype, 1e-2):
                            raise ValueError(f"{name} at {preset.name} is off the eager block by {err:.1e}")
                    signatures.setdefault(name, signature(named_inputs(block, args, kwargs)))
        except Exception as err:  # noqa: BLE001 - another architecture's or torch's package fails to load or run
            refusals.append(f"foreign package {candidate.repo}/{file} refused: {type(err).__name__}: "
                            f"{(str(err).splitlines() or [''])[0][:200]}")
            candidates.remove(candidate)
            continue
        source = f"foreign package {candidate.name}, checked at presets {', '.join(p.name for p in presets)}"
        files = {f"submodules/{name}/{PACKAGE}": path for name, (_, path) in candidate.packages.items()}
        compile_into_cache(lambda out, files=files: _copy_entry(files, out) or signatures, root, key, source=source)
        return source
    return ""
