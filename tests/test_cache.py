"""Compiled artifacts are saved, keyed and reused; bad ones are rebuilt, never trusted."""
import json
import logging
import os
import shutil
import subprocess
import sys

import pytest
import torch

import optimization
from conftest import ROOT, SESSION_DIR, Compiled, eager_outputs, rel_err

SMALL = {"presets": "small=32x32", "aot_scope": "model"}  # one 4-token program: the cheapest compile


@pytest.fixture
def compile_calls(monkeypatch):
    """Counts real compiles (the function still runs)."""
    calls = []
    real = optimization.compile_programs
    monkeypatch.setattr(optimization, "compile_programs", lambda *a, **k: (calls.append(a[1]), real(*a, **k))[1])
    return calls


@pytest.fixture(scope="module")
def int8_small():
    return Compiled(quantization="int8", aot_cache_dir=SESSION_DIR / "int8-cache", **SMALL)


def test_second_start_loads_from_cache_and_compiles_nothing(compiled_model, compile_calls):
    again = Compiled()
    assert compile_calls == []
    assert again.report.compile_source == "loaded from cache"
    assert again.report.cache_key == compiled_model.report.cache_key
    for name, out in again.run().items():
        assert rel_err(out, again.eager[name]) <= 1e-4, name


def test_changed_key_recompiles_and_int8_stays_close(int8_small, compiled_blocks):
    report = int8_small.report
    assert (report.compile_source, report.quantization) == ("compiled now", "int8")
    assert report.cache_key != compiled_blocks.report.cache_key
    compiled = int8_small.run()["32x32"]
    assert rel_err(compiled, int8_small.eager["32x32"]) <= 2e-2  # int8 weights vs fp32 eager
    optimization.restore_eager_(int8_small.pipe.transformer)  # the same int8 weights, run eagerly
    eager_int8 = eager_outputs(int8_small.pipe, int8_small.inputs)["32x32"]
    assert rel_err(compiled, eager_int8) <= 1e-4


def _copy_entry(source: Compiled, tmp_path):
    entry = tmp_path / source.report.cache_key
    shutil.copytree(source.settings.cache_dir + "/" + source.report.cache_key, entry)
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


@pytest.mark.parametrize("damage", ["other key", "no manifest", "missing program", "bad json"])
def test_damaged_entries_are_not_trusted(int8_small, tmp_path, caplog, damage):
    entry = _copy_entry(int8_small, tmp_path)
    key = optimization.cache_key(int8_small.pipe, int8_small.settings, int8_small.report, [4], 512)
    assert optimization.read_cached(entry, key) is not None  # intact: usable
    manifest = entry / "manifest.json"
    if damage == "other key":
        data = json.loads(manifest.read_text())
        data["key"]["torch"] = "0.0.0"
        manifest.write_text(json.dumps(data))
    elif damage == "no manifest":
        manifest.unlink()
    elif damage == "missing program":
        shutil.rmtree(entry / "tokens-4")
    else:
        manifest.write_text("{not json")
    with caplog.at_level(logging.WARNING, logger="aot-space"):
        assert optimization.read_cached(entry, key) is None
    assert "unusable" in caplog.text


def test_cache_key_names_everything_that_makes_a_program_valid(compiled_blocks):
    key = optimization.cache_key(compiled_blocks.pipe, compiled_blocks.settings, compiled_blocks.report, [15, 16], 512)
    assert {"model_id", "revision", "torch", "arch", "quantization", "attention", "image_tokens", "text_tokens",
            "scope", "dtype"} <= set(key)
    assert key["torch"] == torch.__version__ and key["arch"].startswith("cpu-")


def test_precompile_command_fills_a_cache_the_app_then_loads(tmp_path):
    env = {**os.environ, "MODEL_ID": "tiny", "PRESETS": "small=32x32", "AOT_SCOPE": "model"}
    result = subprocess.run([sys.executable, "optimization.py", "--precompile", "--out", str(tmp_path)],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    printed = json.loads(result.stdout.strip().splitlines()[-1])
    assert printed["source"] == "compiled now"
    assert "manifest.json" in printed["files"] and "tokens-4/root/package.pt2" in printed["files"]
    loaded = Compiled(aot_cache_dir=tmp_path, **SMALL)
    assert loaded.report.compile_source == "loaded from cache"
    assert loaded.report.cache_key == printed["key"]


def test_hub_repo_must_be_pinned_and_an_unreachable_one_falls_back_to_compiling(tmp_path):
    from settings import Settings

    with pytest.raises(ValueError, match="40-hex commit"):
        Settings.from_env({"MODEL_ID": "tiny", "AOT_HUB_REPO": "someone/aot-packages"}, has_cuda=False)
    with pytest.raises(ValueError, match="40-hex commit"):
        Settings.from_env({"MODEL_ID": "tiny", "AOT_HUB_REPO": "someone/aot-packages@main"}, has_cuda=False)
    pinned = Compiled(aot_hub_repo="someone/aot-packages@" + "a" * 40, aot_cache_dir=tmp_path, **SMALL)
    assert pinned.report.compile_source == "compiled now"  # offline in tests: nothing fetched, compiled instead
    assert any(f.startswith("compiled packages: could not fetch") for f in pinned.report.fallbacks)
