"""Regional programs on the Hub in spaces' per-block layout, both ways, offline: the template's upload loads through
`spaces.aoti_blocks_load`, and a package made by spaces' `aoti_compile_and_save` loads in the template once checked.
The "Hub" is a real local Hub cache (models--owner--name/refs/main and snapshots/<commit>/) read with HF_HUB_OFFLINE=1:
spaces' loader and the template's download both go through huggingface_hub, unstubbed."""
import json
import shutil
from pathlib import Path

import pytest
import spaces
import torch

import optimization
from aot.hub import block_classes, fetch_blocks, upload_to_hub, variant
from aot.model import repeated_block_lists
from aot.panel import startup_line
from aot.programs import capture_inputs, restore_eager_
from aot.report import Report
from conftest import Compiled, eager_outputs, rel_err
from test_startup import RecordingHub

REGIONAL = {"presets": "small=32x32", "aot_scope": "blocks"}  # one 4-token program of two block classes


@pytest.fixture
def compile_calls(monkeypatch):
    calls = []
    real = optimization.compile_program
    monkeypatch.setattr(optimization, "compile_program", lambda *args: calls.append(args[2]) or real(*args))
    return calls


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty local Hub cache that huggingface_hub (offline) reads; `publish` puts a repo's files in it."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))

    def publish(repo: str, files: Path, commit: str) -> str:
        storage = tmp_path / "hub-cache" / f"models--{repo.replace('/', '--')}"
        shutil.copytree(files, storage / "snapshots" / commit)
        (storage / "refs").mkdir(parents=True, exist_ok=True)
        (storage / "refs" / "main").write_text(commit)
        return f"{repo}@{commit}"

    return publish


@pytest.fixture(scope="module")
def regional(tmp_path_factory):
    """A regional start that compiled its program, uploaded (to a recording stand-in) in spaces' layout."""
    start = Compiled(aot_cache_dir=tmp_path_factory.mktemp("regional-cache"), **REGIONAL)
    start.repo = tmp_path_factory.mktemp("repo")
    start.hub = RecordingHub(start.repo)
    start.upload = Report(device="cpu", dtype="float32")
    start.revision = upload_to_hub("someone/aot-blocks", Path(start.settings.cache_dir), start.report.cache_keys,
                                   start.upload, api=start.hub, blocks=block_classes(start.pipe.transformer))
    return start


def _key(start: Compiled) -> dict:
    [digest] = start.report.cache_keys
    return json.loads((Path(start.settings.cache_dir) / digest / "manifest.json").read_text())["key"]


def test_upload_writes_spaces_layout_with_the_manifest_in_the_config(regional):
    key = _key(regional)
    name = variant(key)
    assert name.startswith("fp32-cpu_") and f"-torch{'.'.join(torch.__version__.split('.')[:2])}-t4-" in name
    assert regional.revision and regional.upload.hub_upload["variants"] == [name]
    [_, (_, _, patterns, _)] = regional.hub.calls
    assert patterns == [f"config.{name}.json", f"FluxTransformerBlock.{name}/package.pt2",
                        f"FluxSingleTransformerBlock.{name}/package.pt2"]
    assert sorted(p.relative_to(regional.repo).as_posix() for p in regional.repo.rglob("*") if p.is_file()) == sorted(
        patterns)
    config = json.loads((regional.repo / f"config.{name}.json").read_text())
    assert config["key"] == key and "kernels" not in config  # spaces reads "kernels" only
    assert config["files"] == {"submodules/transformer_blocks/package.pt2": f"FluxTransformerBlock.{name}/package.pt2",
                               "submodules/single_transformer_blocks/package.pt2":
                               f"FluxSingleTransformerBlock.{name}/package.pt2"}
    assert set(config["sha256"]) == set(config["files"]) and set(config["signatures"]) == {
        "transformer_blocks", "single_transformer_blocks"}
    # a different key never shares a variant, even where the readable part is the same
    assert variant({**key, "weights": "0" * 16}) != name and variant({**key, "weights": "0" * 16})[:-8] == name[:-8]


def test_a_template_package_loads_through_spaces_own_loader(regional, hub_cache):
    hub_cache("someone/aot-blocks", regional.repo, regional.revision)
    template = regional.run()["32x32"]
    transformer = regional.pipe.transformer
    restore_eager_(transformer)
    try:
        spaces.aoti_blocks_load(transformer, "someone/aot-blocks", variant(_key(regional)))
        patched = [m for m in transformer.modules() if "forward" in m.__dict__]
        assert len(patched) == sum(len(blocks) for blocks in repeated_block_lists(transformer).values())
        loaded = eager_outputs(regional.pipe, regional.inputs)["32x32"]
    finally:
        restore_eager_(transformer)
    assert rel_err(loaded, template) <= 1e-5 and rel_err(loaded, regional.eager["32x32"]) <= 1e-4


def test_a_start_downloads_its_variant_and_verifies_it(regional, hub_cache, tmp_path, compile_calls):
    pin = hub_cache("someone/aot-blocks", regional.repo, regional.revision)
    fetched = Compiled(aot_hub_repo=pin, aot_cache_dir=tmp_path / "cache", **REGIONAL)
    assert compile_calls == [] and fetched.report.fallbacks == []
    [program] = fetched.report.startup["programs"]
    assert program["source"] == "downloaded" and program["cache_key"] == regional.report.cache_keys[0]
    assert rel_err(fetched.run()["32x32"], fetched.eager["32x32"]) <= 1e-4


def _with_key(repo: Path, out: Path, **fields) -> Path:
    """A copy of the uploaded repo whose config says the package was built under other key fields, filed under the
    variant that key names (as another machine's upload would be)."""
    [config_path] = repo.glob("config.*.json")
    config = json.loads(config_path.read_text())
    old, new = variant(config["key"]), variant({**config["key"], **fields})
    config["key"].update(fields)
    config["files"] = {entry: file.replace(old, new) for entry, file in config["files"].items()}
    for file in repo.rglob("package.pt2"):
        target = out / file.relative_to(repo).as_posix().replace(old, new)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(file, target)
    (out / f"config.{new}.json").write_text(json.dumps(config))
    return out


def test_a_package_built_for_another_arch_or_torch_is_refused_with_the_reason(regional, hub_cache, tmp_path,
                                                                              compile_calls):
    arch = regional.report.hardware.arch
    other = _with_key(regional.repo, tmp_path / "other", arch="sm_90", torch="2.10.0+cu128", cuda="12.8")
    pin = hub_cache("someone/aot-sm90", other, "d" * 40)
    # under its own variant: this start finds no config of its own and names what the nearest was built for
    started = Compiled(aot_hub_repo=pin, aot_cache_dir=tmp_path / "cache", **REGIONAL)
    assert len(compile_calls) == 1 and started.report.startup["programs"][0]["source"] == "compiled"
    [refused] = [f for f in started.report.fallbacks if f.startswith("compiled packages")]
    assert f"arch sm_90, this is {arch}; torch 2.10.0+cu128, this is {torch.__version__}; cuda 12.8" in refused
    assert refused.count("arch sm_90") == 1
    assert rel_err(started.run()["32x32"], started.eager["32x32"]) <= 1e-4
    # filed under this start's own variant, its config still says sm_90: refused, never installed
    [config] = other.glob("config.*.json")
    mine = variant(_key(regional))
    config.rename(other / f"config.{mine}.json")
    hub_cache("someone/aot-renamed", other, "e" * 40)
    report = Report(device="cpu", dtype="float32")
    root = tmp_path / "entry"
    assert fetch_blocks("someone/aot-renamed@" + "e" * 40, [(_key(regional), root)], block_classes(
        regional.pipe.transformer), report) == [] and not root.exists()
    [refused] = report.fallbacks
    assert f"config.{mine}.json refused: built for arch sm_90, this is {arch}" in refused


@pytest.fixture(scope="module")
def foreign_repo(regional, tmp_path_factory):
    """A repo as spaces' own Spaces publish it: each block class exported at the 32x32 preset and compiled by spaces'
    `aoti_compile_and_save`, filed as `<Class>/package.pt2`, with no template manifest (Inductor's cache, which the
    regional start filled, makes the compile quick)."""
    out, repo = tmp_path_factory.mktemp("spaces-compiled"), tmp_path_factory.mktemp("foreign-repo")
    [preset] = regional.model.presets
    for name, blocks in repeated_block_lists(regional.pipe.transformer).items():
        # the block as the model defines it: `regional` installed its program's dispatcher over it, which export
        # cannot trace (another test may have put the eager blocks back first: this fixture must not depend on it)
        dispatch = blocks[0].__dict__.pop("forward", None)
        try:
            args, kwargs = capture_inputs(regional.model, blocks[0], preset)
            exported = torch.export.export(blocks[0], args=args, kwargs=kwargs)
        finally:
            if dispatch is not None:
                blocks[0].forward = dispatch
        spaces.aoti_compile_and_save(out / name, exported, inductor_configs=optimization.INDUCTOR_CONFIGS)
        (repo / type(blocks[0]).__name__).mkdir()
        shutil.copy(out / name / "root" / "package.pt2", repo / type(blocks[0]).__name__ / "package.pt2")
    return repo


def test_a_package_made_by_spaces_loads_in_the_template_once_checked(foreign_repo, hub_cache, tmp_path,
                                                                     compile_calls):
    pin = hub_cache("someone/foreign-blocks", foreign_repo, "f" * 40)
    started = Compiled(aot_hub_repo=pin, aot_cache_dir=tmp_path / "cache", **REGIONAL)
    assert compile_calls == [] and started.report.fallbacks == []
    [program] = started.report.startup["programs"]
    assert program["source"] == ("foreign package someone/foreign-blocks/FluxTransformerBlock/package.pt2, "
                                 "someone/foreign-blocks/FluxSingleTransformerBlock/package.pt2, checked at presets "
                                 "32x32")
    assert program["source"] in startup_line(started.report.startup)  # the status panel says so
    assert rel_err(started.run()["32x32"], started.eager["32x32"]) <= 1e-4
    # a restart takes it from the cache, still named
    again = Compiled(aot_hub_repo=pin, aot_cache_dir=tmp_path / "cache", **REGIONAL)
    assert again.report.startup["programs"][0]["source"] == f"cached, {program['source']}" and compile_calls == []


def test_a_foreign_package_that_does_not_run_is_refused_and_compiled_afresh(foreign_repo, hub_cache, tmp_path,
                                                                             compile_calls):
    broken = tmp_path / "broken"
    shutil.copytree(foreign_repo, broken)
    package = broken / "FluxSingleTransformerBlock" / "package.pt2"
    package.write_bytes(package.read_bytes()[:4096])  # as a package for another machine: it does not load
    pin = hub_cache("someone/broken-blocks", broken, "0" * 40)
    started = Compiled(aot_hub_repo=pin, aot_cache_dir=tmp_path / "cache", **REGIONAL)
    assert len(compile_calls) == 1 and started.report.startup["programs"][0]["source"] == "compiled"
    [refused] = [f for f in started.report.fallbacks if f.startswith("compiled packages")]
    assert refused.startswith("compiled packages: foreign package "
                              "someone/broken-blocks/FluxSingleTransformerBlock/package.pt2 refused: ")
    assert rel_err(started.run()["32x32"], started.eager["32x32"]) <= 1e-4
