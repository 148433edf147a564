"""Compiled artifacts are saved, keyed and reused; bad ones are rebuilt, never trusted."""
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import optimization
from aot.cache import cache_key, entry_files, key_digest, read_cached
from aot.programs import restore_eager_
from conftest import ROOT, SESSION_DIR, Compiled, eager_outputs, rel_err

SMALL = {"presets": "small=32x32", "aot_scope": "model"}  # one 4-token program: the cheapest compile


@pytest.fixture
def compile_calls(monkeypatch):
    """Records the preset of every real compile, one per program (the function still runs)."""
    calls = []
    real = optimization.compile_program

    def compile_program(model, scope, preset, served, out_dir, inductor_configs):
        calls.append(preset)
        return real(model, scope, preset, served, out_dir, inductor_configs)

    monkeypatch.setattr(optimization, "compile_program", compile_program)
    return calls


@pytest.fixture(scope="module")
def int8_small():
    return Compiled(quantization="int8", aot_cache_dir=SESSION_DIR / "int8-cache", **SMALL)


def entries(cache: Path) -> list[str]:
    """A cache directory's program entries: beside them, Inductor's cache and this card's measurements."""
    return sorted(p.name for p in cache.iterdir() if p.name not in ("inductor", "measured"))


def test_second_start_loads_from_cache_and_compiles_nothing(compiled_blocks, compile_calls, monkeypatch):
    calls = []
    monkeypatch.setattr(optimization, "time_presets", lambda *args: calls.append(args))
    monkeypatch.setattr(optimization, "first_call", lambda *args: calls.append(args))
    again = Compiled()
    assert compile_calls == []
    assert again.report.compile_source == "loaded from cache"
    assert again.report.cache_keys == compiled_blocks.report.cache_keys
    # and this card's timings from the earlier start: no preset timed or called at start-up, the programs' first
    # calls are the first requests' (below)
    assert again.report.startup["timings"] == "this card's, kept from an earlier start" and calls == []
    assert again.report.timings == compiled_blocks.report.timings
    for name, out in again.run().items():
        assert rel_err(out, again.eager[name]) <= 1e-4, name


def test_adding_a_preset_compiles_only_its_program(tmp_path, compile_calls):
    first = Compiled(aot_cache_dir=tmp_path, **SMALL)  # 32x32: 4 image tokens
    assert [p.name for p in compile_calls] == ["32x32"] and first.report.compile_source == "compiled now"
    [small_key] = first.report.cache_keys
    small_package = tmp_path / small_key / "root" / "package.pt2"
    written = small_package.stat().st_mtime_ns
    compile_calls.clear()

    both = Compiled(aot_cache_dir=tmp_path, presets="small=32x32,wide=48x32", aot_scope="model")  # + 6 tokens
    assert [p.name for p in compile_calls] == ["48x32"]  # only the new program
    assert both.report.compile_source == "1 of 2 programs compiled now, the rest loaded from cache"
    assert both.report.cache_keys[0] == small_key and len(set(both.report.cache_keys)) == 2
    assert small_package.stat().st_mtime_ns == written  # the cached program was loaded, not rewritten
    # no staging left; beside the entries, Inductor's own cache (kernels a later key can reuse) and the timings
    assert sorted(entries(tmp_path)) == sorted(both.report.cache_keys)
    assert [p["image_tokens"] for p in both.report.programs] == [4, 6]
    outputs = both.run()
    assert set(outputs) == {"32x32", "48x32"}
    for name, out in outputs.items():
        assert rel_err(out, both.eager[name]) <= 1e-4, name


def test_changed_key_recompiles_and_int8_stays_close(int8_small, compiled_blocks):
    report = int8_small.report
    assert (report.compile_source, report.quantization) == ("compiled now", "int8")
    assert len(report.cache_keys) == 1 and not set(report.cache_keys) & set(compiled_blocks.report.cache_keys)
    compiled = int8_small.run()["32x32"]
    assert rel_err(compiled, int8_small.eager["32x32"]) <= 2e-2  # int8 weights vs fp32 eager
    restore_eager_(int8_small.pipe.transformer)  # the same int8 weights, run eagerly
    eager_int8 = eager_outputs(int8_small.pipe, int8_small.inputs)["32x32"]
    assert rel_err(compiled, eager_int8) <= 1e-4


def _key(compiled: Compiled, shape) -> dict:
    """The cache key of `compiled`'s program for `shape` (its image tokens), as optimization computes it."""
    settings = compiled.settings
    return cache_key(compiled.pipe, compiled.model.family.name, settings.model_id, settings.revision, compiled.report,
                     compiled.report.hardware, settings.aot_scope, shape, settings.dynamic_shapes, compiled.report.text,
                     optimization.INDUCTOR_CONFIGS)


def _copy_entry(source: Compiled, tmp_path):
    [digest] = source.report.cache_keys  # one preset: one program, one entry
    entry = tmp_path / digest
    shutil.copytree(source.settings.cache_dir + "/" + digest, entry)
    return entry


def test_truncated_artifact_is_rebuilt_with_a_warning(int8_small, tmp_path, caplog, compile_calls):
    entry = _copy_entry(int8_small, tmp_path)
    package = next(entry.rglob("package.pt2"))
    package.write_bytes(package.read_bytes()[: package.stat().st_size // 2])
    with caplog.at_level(logging.WARNING, logger="aot-space"):
        rebuilt = Compiled(quantization="int8", aot_cache_dir=tmp_path, **SMALL)
    assert "does not match its checksum" in caplog.text and "recompiling" in caplog.text
    assert len(compile_calls) == 1 and rebuilt.report.compile_source == "compiled now"
    # the rebuilt program computes what the original int8 model computes, on the same inputs
    reference = eager_outputs(int8_small.pipe, rebuilt.inputs)["32x32"]
    assert rel_err(rebuilt.run()["32x32"], reference) <= 1e-4


@pytest.mark.parametrize("damage", ["other key", "no manifest", "missing program", "no program", "bad json"])
def test_damaged_entries_are_not_trusted(int8_small, tmp_path, caplog, damage):
    entry = _copy_entry(int8_small, tmp_path)
    key = _key(int8_small, 4)  # 32x32: 4 image tokens
    assert key_digest(key) == entry.name
    manifest_data = read_cached(entry, key)  # intact: usable
    assert manifest_data is not None and manifest_data["key"] == key and set(manifest_data["signatures"]) == {""}
    manifest = entry / "manifest.json"
    if damage == "other key":
        data = json.loads(manifest.read_text())
        data["key"]["torch"] = "0.0.0"
        manifest.write_text(json.dumps(data))
    elif damage == "no manifest":
        manifest.unlink()
    elif damage == "missing program":
        shutil.rmtree(entry / "root")
    elif damage == "no program":
        data = json.loads(manifest.read_text())
        data["sha256"] = {}
        manifest.write_text(json.dumps(data))
    else:
        manifest.write_text("{not json")
    with caplog.at_level(logging.WARNING, logger="aot-space"):
        assert read_cached(entry, key) is None
    assert "unusable" in caplog.text
    if damage == "no program":
        assert "it holds no program" in caplog.text


def test_cache_key_names_everything_that_makes_a_program_valid(compiled_blocks):
    settings, report = compiled_blocks.settings, compiled_blocks.report
    key = _key(compiled_blocks, 16)
    assert {"family", "model_id", "revision", "torch", "arch", "quantization", "attention", "image_tokens",
            "text_tokens", "scope", "dtype", "weights"} <= set(key)
    assert key["torch"] == torch.__version__ and key["arch"].startswith("cpu-") and key["image_tokens"] == 16
    assert (key["family"], key["model_id"], key["scope"]) == ("flux", "tiny-flux", "blocks")
    assert key["text_tokens"] == report.text and "512 tokens" in key["text_tokens"]
    # one entry per program, in image-token order; the programs' keys differ only in their token count
    assert report.cache_keys == [key_digest(_key(compiled_blocks, tokens)) for tokens in (15, 16)]
    for digest in report.cache_keys:  # blocks scope: <digest>/manifest.json and submodules/<name>/package.pt2
        entry = Path(settings.cache_dir) / digest
        files = entry_files(entry)
        assert files[0] == "manifest.json" and files[1:]
        assert all(f.startswith("submodules/") and f.endswith("/package.pt2") for f in files[1:]), files


def test_precompile_command_fills_a_cache_the_app_then_loads(tmp_path):
    env = {**os.environ, "MODEL_ID": "tiny", "PRESETS": "small=32x32", "AOT_SCOPE": "model"}
    result = subprocess.run([sys.executable, "optimization.py", "--precompile", "--out", str(tmp_path)],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    printed = json.loads(result.stdout.strip().splitlines()[-1])
    assert printed["source"] == "compiled now"
    [digest] = printed["keys"]
    assert printed["dir"] == str(tmp_path)
    assert printed["files"] == [f"{digest}/manifest.json", f"{digest}/root/package.pt2"]
    loaded = Compiled(aot_cache_dir=tmp_path, **SMALL)
    assert loaded.report.compile_source == "loaded from cache"
    assert loaded.report.cache_keys == printed["keys"]


def test_hub_repo_must_be_pinned_and_an_unreachable_one_falls_back_to_compiling(tmp_path):
    from settings import Settings

    with pytest.raises(ValueError, match="40-hex commit"):
        Settings.from_env({"MODEL_ID": "tiny", "AOT_HUB_REPO": "someone/aot-packages"}, has_cuda=False)
    with pytest.raises(ValueError, match="40-hex commit"):
        Settings.from_env({"MODEL_ID": "tiny", "AOT_HUB_REPO": "someone/aot-packages@main"}, has_cuda=False)
    pinned = Compiled(aot_hub_repo="someone/aot-packages@" + "a" * 40, aot_cache_dir=tmp_path, **SMALL)
    assert pinned.report.compile_source == "compiled now"  # offline in tests: nothing fetched, compiled instead
    assert any(f.startswith("compiled packages: could not fetch") for f in pinned.report.fallbacks)


def test_a_hub_repo_holds_programs_for_several_architectures_and_a_start_takes_its_own(tmp_path, monkeypatch,
                                                                                        compile_calls):
    """An entry compiled here, beside the same entry as an sm_120 start would key it: a start downloads only its own;
    with only the other architecture's there, it compiles and says so. A stand-in for `snapshot_download` copies what
    the start asks for out of a local folder (tests never reach the Hub)."""
    import huggingface_hub

    here = Compiled(aot_cache_dir=tmp_path / "compiled-here", **SMALL)
    [digest] = here.report.cache_keys
    hub = tmp_path / "hub"
    shutil.copytree(tmp_path / "compiled-here" / digest, hub / digest)
    manifest = json.loads((hub / digest / "manifest.json").read_text())
    other = {**manifest, "key": {**manifest["key"], "arch": "sm_120", "cuda": "13.0"}}
    other_digest = key_digest(other["key"])
    shutil.copytree(hub / digest, hub / other_digest)
    (hub / other_digest / "manifest.json").write_text(json.dumps(other))
    asked = []

    def snapshot_download(repo, revision, allow_patterns, local_dir):
        asked.append(allow_patterns)
        for pattern in allow_patterns:
            entry = hub / pattern.removesuffix("/*")
            if entry.exists():
                shutil.copytree(entry, Path(local_dir) / entry.name)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    compile_calls.clear()
    pinned = "someone/aot-packages@" + "b" * 40
    fetched = Compiled(aot_hub_repo=pinned, aot_cache_dir=tmp_path / "start-1", **SMALL)
    assert asked == [[f"{digest}/*"]] and compile_calls == []
    assert fetched.report.startup["programs"][0]["source"] == "downloaded" and fetched.report.fallbacks == []
    assert entries(tmp_path / "start-1") == [digest]
    shutil.rmtree(hub / digest)  # the repo now holds the other architecture's entry only
    compiled = Compiled(aot_hub_repo=pinned, aot_cache_dir=tmp_path / "start-2", **SMALL)
    assert compiled.report.compile_source == "compiled now" and len(compile_calls) == 1
    [fallback] = [f for f in compiled.report.fallbacks if f.startswith("compiled packages")]
    assert f"has no entry for {compiled.report.hardware.arch}" in fallback and "compiling here" in fallback
    assert not (tmp_path / "start-2" / other_digest).exists()  # never downloaded, never loaded
