"""Shared fixtures. Everything runs offline on the built-in tiny pipelines; each AoT compile happens once
per session and later fixtures reuse it through the real artifact cache.

Also, in one place rather than in the test files: the `slow`, `subprocess` and `browser` markers
(pyproject.toml describes them) and the groups that keep each expensive fixture on one worker under
`pytest -n 2 --dist loadgroup` (pytest_collection_modifyitems below), and the tests that take an earlier
compile of the same program instead of compiling it again (REUSES_COMPILES).
"""
import contextlib
import copy
import os
import platform
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SESSION_DIR = Path(tempfile.mkdtemp(prefix="aot-tests-"))
# Set before anything imports gradio, huggingface_hub or the app.
os.environ.update({
    "HF_HUB_OFFLINE": "1",
    "GRADIO_ANALYTICS_ENABLED": "False",
    "GRADIO_TEMP_DIR": str(SESSION_DIR / "gradio"),
    "GRADIO_EXAMPLES_CACHE": str(SESSION_DIR / "examples"),
    "MODEL_ID": "tiny",
    "COMPILE": "aoti",
    "AOT_CACHE_DIR": str(SESSION_DIR / "aot-cache"),
})
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import optimization  # noqa: E402
from aot.cache import key_digest  # noqa: E402
from aot.families import FAMILIES  # noqa: E402
from aot.hardware import Hardware  # noqa: E402
from aot.model import Model, load_model  # noqa: E402
from aot.programs import capture_inputs  # noqa: E402
from settings import Preset, Settings  # noqa: E402

# The families that draw an image from a prompt alone: the tests that run every family text-only run these. Those
# that need an input image (Qwen-Image-Edit) are tested with images in tests/test_edit_qwen.py, the video families
# (Wan) in tests/test_video.py.
TEXT_FAMILIES = tuple(family for family in FAMILIES if not family.min_images and not family.video)
SEQ = 512  # the tiny FLUX model embeds guidance, so it follows FLUX.1-dev's text length
LATENTS_PRESET = Preset("landscape", 80, 48)  # where `Compiled.latents` runs the whole tiny FLUX pipeline


def cpu(hub: bool = False) -> Hardware:
    """A CPU host, described without detecting: for the functions that take the hardware."""
    return Hardware("cpu", platform.machine(), None, 0, 0, torch.version.cuda, hub)


def settings_for(**overrides) -> Settings:
    env = {key: os.environ[key] for key in ("MODEL_ID", "COMPILE", "AOT_CACHE_DIR")}
    env.update({key.upper(): str(value) for key, value in overrides.items()})
    return Settings.from_env(env, has_cuda=False)


def tiny_model(**overrides) -> Model:
    """A freshly built tiny pipeline (FLUX unless `model_id` says otherwise), not optimized."""
    return load_model(settings_for(**overrides))


def transformer_inputs(model: Model) -> dict:
    """The transformer's real call for each preset, keyed by preset name."""
    return {p.name: capture_inputs(model, model.pipe.transformer, p) for p in model.presets}


def _sample(output) -> torch.Tensor:
    """The transformer's sample: a tensor, or (Z-Image: one tensor per image) its tensors flattened into one."""
    sample = output[0]
    if isinstance(sample, torch.Tensor):
        return sample.clone()
    return torch.cat([t.flatten() for t in torch.utils._pytree.tree_leaves(sample)])


def eager_outputs(pipe, inputs: dict) -> dict:
    with torch.inference_mode():
        return {name: _sample(pipe.transformer(*args, **kwargs)) for name, (args, kwargs) in inputs.items()}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@contextlib.contextmanager
def image_tokens_per_call(transformer: torch.nn.Module):
    """Inside, each call of `transformer` adds its image tokens (an edit's: the output's and its inputs') to the list
    given."""
    lengths = []
    hook = transformer.register_forward_pre_hook(
        lambda _, args, kwargs: lengths.append(kwargs["hidden_states"].shape[1]), with_kwargs=True)
    try:
        yield lengths
    finally:
        hook.remove()


class Compiled:
    """A tiny pipeline after `optimize_pipeline_`, with its eager outputs recorded before compiling."""

    def __init__(self, **overrides):
        self.settings = settings_for(**overrides)
        self.model = load_model(self.settings)
        self.pipe = self.model.pipe
        self.check_model()
        self.inputs = transformer_inputs(self.model)
        self.eager = eager_outputs(self.pipe, self.inputs)
        self.record_eager()
        cache = Path(self.settings.cache_dir)
        before = {entry.name for entry in cache.iterdir()} if cache.is_dir() else set()
        self.report = optimization.optimize_pipeline_(self.model, self.settings)
        assert self.report.compile == "aoti", self.report.fallbacks
        # every program was in the cache already: another fixture of this session compiled them under the same keys
        self.was_cached = set(self.report.cache_keys) <= before

    def check_model(self) -> None:
        assert (self.model.family.name, self.model.defaults.max_sequence_length) == ("flux", SEQ)

    def record_eager(self) -> None:
        self.eager_latents = self.latents()

    def run(self) -> dict:
        """The transformer's output for every preset's captured inputs."""
        return eager_outputs(self.pipe, self.inputs)

    def latents(self) -> torch.Tensor:
        """A whole 3-step pipeline run at one preset, as latents."""
        generator = torch.Generator().manual_seed(5)
        return self.model("a red cube", LATENTS_PRESET, steps=3, generator=generator, output_type="latent").images


@pytest.fixture(scope="session")
def compiled_model():
    """Whole-model scope (AOT_SCOPE=model): one program for the transformer per preset token count."""
    return Compiled(aot_scope="model")


@pytest.fixture(scope="session")
def compiled_blocks():
    """The app's default settings: regional scope, one program per repeated block class and token count, so the app
    later loads these very programs from the cache."""
    return Compiled()


@pytest.fixture(scope="session")
def app(compiled_blocks):
    """The app module; it finds the session's compiled programs in the cache and loads them."""
    import app as app_module

    return app_module


def served_app(name: str, env: dict):
    """(app module, gradio client): a fresh copy of app.py imported under `env` (on top of the session's), as a Space
    starts it, then launched; closed after. A generator, for session fixtures to `yield from`."""
    import importlib.util

    from gradio_client import Client

    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        spec = importlib.util.spec_from_file_location(f"app_for_{name.replace('-', '_')}", ROOT / "app.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    module.demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", quiet=True)
    try:
        yield module, Client(module.demo.local_url, verbose=False)
    finally:
        module.demo.close()


@pytest.fixture(scope="session")
def client(app):
    from gradio_client import Client

    app.demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", quiet=True, css=app.CSS)  # as `python app.py`
    yield Client(app.demo.local_url, verbose=False)
    app.demo.close()


# -- one compile per cache key per session ---------------------------------------------------------------------
# Tests of what a start does around its compiles (which programs it compiles, an entry rebuilt, the Hub's
# fallbacks), not of the compile itself, by module: `compile_program` is still called, and counted, but a program
# compiled earlier in this session under the same cache key is copied in rather than compiled again (20-30 s
# each on 2 CPU cores). Everywhere else every compile is real.
REUSES_COMPILES = {
    "test_cache.py": {"test_adding_a_preset_compiles_only_its_program",
                      "test_truncated_artifact_is_rebuilt_with_a_warning",
                      "test_hub_repo_must_be_pinned_and_an_unreachable_one_falls_back_to_compiling",
                      "test_a_hub_repo_holds_programs_for_several_architectures_and_a_start_takes_its_own"},
    "test_optimization.py": {"test_compile_failure_with_a_custom_attention_backend_retries_with_sdpa"},
    "test_hub_layout.py": {"test_a_package_built_for_another_arch_or_torch_is_refused_with_the_reason",
                           "test_a_foreign_package_that_does_not_run_is_refused_and_compiled_afresh"},
}


class CompileOnce:
    """Keeps a copy of each program compiled in this session, by cache key, and copies it in for a later compile
    of the same key in a test of REUSES_COMPILES. Also warns of a compile in a test not marked slow."""

    def __init__(self, store: Path):
        self.store, self.signatures, self.digest = store, {}, None
        self.test = None  # the test running, fixtures included (pytest_runtest_protocol)
        self.real_compile_into_cache = optimization.compile_into_cache
        self.real_compile_program = optimization.compile_program

    def compile_into_cache(self, compile_to, root: Path, key: dict) -> None:
        """aot.cache's, noting the key being compiled for `compile_program`."""
        self.digest = key_digest(key)
        try:
            self.real_compile_into_cache(compile_to, root, key)
        finally:
            self.digest = None

    def compile_program(self, model, scope, preset, served, out_dir: Path, inductor_configs: dict) -> dict:
        digest, test = self.digest, self.test
        if test is not None and digest in self.signatures and _listed(REUSES_COMPILES, test):
            shutil.copytree(self.store / digest, out_dir, dirs_exist_ok=True)
            return copy.deepcopy(self.signatures[digest])
        if test is not None and not test.get_closest_marker("slow"):
            warnings.warn(f"{test.nodeid} AoT-compiles but is not marked slow: add it to SLOW in tests/conftest.py",
                          pytest.PytestWarning, stacklevel=2)
        signatures = self.real_compile_program(model, scope, preset, served, out_dir, inductor_configs)
        if digest is not None and digest not in self.signatures:
            shutil.copytree(out_dir, self.store / digest)
            self.signatures[digest] = copy.deepcopy(signatures)
        return signatures


COMPILE_ONCE = CompileOnce(SESSION_DIR / "compiled-once")


@pytest.fixture(scope="session", autouse=True)
def _compile_once():
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(optimization, "compile_into_cache", COMPILE_ONCE.compile_into_cache)
        patch.setattr(optimization, "compile_program", COMPILE_ONCE.compile_program)
        yield


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    COMPILE_ONCE.test = item
    try:
        return (yield)
    finally:
        COMPILE_ONCE.test = None


# -- markers and worker groups ---------------------------------------------------------------------------------
# By the module that defines them: the tests that start Python processes (None: all of the module's), and those
# that drive a browser.
SUBPROCESS = {
    "test_cache.py": {"test_precompile_command_fills_a_cache_the_app_then_loads"},
    "test_faults.py": {"test_unloadable_model_id_exits_with_one_clear_message"},
    "test_load.py": {"test_a_full_queue_answers_at_once_with_a_clear_error"},
    "test_parallel.py": {"test_engine_refuses_cpu_ranks_then_matches_one_rank_and_a_hung_rank_fails_fast",
                         "test_app_serves_from_two_ranks_and_a_killed_rank_gives_a_clear_error",
                         "test_aoti_program_carries_the_collectives"},
    "test_startup.py": {"test_cache_key_is_the_same_in_every_process"},
    "test_zerogpu.py": None,
}
BROWSER = {"test_browser.py": None}
# The session fixtures above: the tiny FLUX pipeline compiled at whole-model and block scope, the app serving it.
TINY_FLUX = {"compiled_model", "compiled_blocks", "app", "client"}
# Fixture values that load TINY_FLUX's programs from the session's cache (MODEL_ID=tiny is tiny-flux): where those
# were compiled, they compile nothing.
SAME_PROGRAMS_AS_TINY_FLUX = {"test_families.py:family(family=flux)"}
# Also slow: the tests and the fixtures (a test that uses one is slow) that compile, start a server, or take more
# than about 2 s on 2 CPU cores, by the module that defines them. `pytest -m "not slow"` runs the rest in 20 s.
SLOW = {
    "conftest.py": TINY_FLUX,
    "test_app.py": {"test_a_restart_with_other_presets_shows_examples_at_the_new_sizes"},
    "test_cache.py": {"int8_small", *REUSES_COMPILES["test_cache.py"]},
    "test_demo_model.py": {"test_it_draws_the_asked_shape_in_the_asked_colour_at_the_asked_position",
                           "test_it_draws_held_out_combinations_it_never_trained_on",
                           "test_its_examples_are_drawn_right", "test_each_preset_draws_the_object_where_asked",
                           "test_aot_compiled_draws_what_eager_draws"},
    "test_families.py": {"family", "family_app"},
    "test_edit.py": {"kontext", "kontext_app"},
    "test_edit_qwen.py": {"edit_plus", "edit_plus_app", "test_2511s_zero_timestep_for_references_matches_eager"},
    "test_edit_flux2.py": {"dev", "klein", "klein_app", "test_the_pipeline_gives_each_reference_the_familys_size"},
    "test_faults.py": {"fresh_app"},
    "test_fuzz.py": {"fuzz_client", "test_request_text_reaches_no_file_path_or_shell"},
    "test_hub_layout.py": {"regional", "foreign_repo", *REUSES_COMPILES["test_hub_layout.py"]},
    "test_hardware.py": {"test_a_cpu_programs_arch_is_its_machine_and_vector_isa"},  # Inductor's ISA probes, with g++
    "test_load.py": {"small_queue_app"},
    "test_lora.py": {"served", "lora_app"},
    "test_lowvram.py": {"test_streamed_blocks_stay_compiled_and_read_the_ring", "test_every_family_streams_its_blocks",
                        "test_a_mixed_layout_streams_some_blocks_through_one_ring_per_block_class",
                        "test_tiny_wan_streams_both_experts_compiled_and_matches_eager"},
    "test_optimization.py": {"test_dynamic_shape_program_serves_every_preset_and_refuses_outside_its_range",
                             *REUSES_COMPILES["test_optimization.py"]},
    "test_prequantized.py": {"checkpoint", "int8_checkpoint", "fp8_served", "served"},
    "test_startup.py": {"first_start"},
    "test_step_cache.py": {"compiled", "eager", "uncached"},
    "test_video.py": {"wan", "wan_app", "wan_i2v", "wan_i2v_app",
                      "test_wan_5b_compiled_matches_eager_at_every_preset_and_in_a_run"},
    "test_ltx2.py": {"ltx2", "ltx2_app", "ltx2_i2v", "ltx2_i2v_app", "ltx2_distilled", "ltx2_distilled_app",
                     "ltx2_distilled_i2v", "ltx2_distilled_i2v_app",
                     "test_the_pipeline_makes_one_call_of_batch_two_a_step_at_guidance_1_and_3",
                     "test_a_fused_lora_changes_both_streams_as_diffusers_loading_it_does"},
}


def _listed(table: dict, item) -> bool:
    names = table.get(item.path.name, ())
    return names is None or item.originalname in names


def _fixtures(item) -> dict:
    """The fixtures this test uses, directly or through others: name -> definition (None for pytest's `request`).
    A parameter that names one of TINY_FLUX counts too: test_optimization asks for them by name
    (request.getfixturevalue)."""
    defs = {name: fixturedefs[-1] for name, fixturedefs in item._fixtureinfo.name2fixturedefs.items()}
    params = item.callspec.params if hasattr(item, "callspec") else {}
    named = {value for value in params.values() if isinstance(value, str) and value in TINY_FLUX}
    return {name: defs.get(name) for name in {*item.fixturenames, *named}}


def _module(name: str, fixturedef) -> str:
    """The file in tests/ that defines a fixture, or "" for pytest's own."""
    if name in TINY_FLUX:
        return "conftest.py"
    path = fixturedef.baseid.split("::")[0] if fixturedef else ""
    return "conftest.py" if path == "tests" else Path(path).name if path.startswith("tests/") else ""


def _shared(item, fixtures: dict) -> set[str]:
    """The fixture values (module scope or wider, defined in tests/) this test shares with others, each with the
    parameters it is built for: tests that share one belong on one worker, which builds it once."""
    params = item.callspec.params if hasattr(item, "callspec") else {}

    def needs(name: str, seen: set[str]) -> set[str]:
        for arg in fixtures[name].argnames if fixtures.get(name) else ():
            if arg not in seen:
                seen.add(arg)
                needs(arg, seen)
        return seen

    shared = set()
    for name, fixturedef in fixtures.items():
        if name in TINY_FLUX:
            shared.add("tiny-flux")
        elif _module(name, fixturedef) not in ("", "conftest.py") and fixturedef.scope != "function":
            built_for = ",".join(f"{arg}={params[arg]}" for arg in sorted(needs(name, {name})) if arg in params)
            where = item.path.name if fixturedef.scope == "module" else _module(name, fixturedef)
            key = f"{where}:{name}({built_for})"
            shared.add("tiny-flux" if key in SAME_PROGRAMS_AS_TINY_FLUX else key)
    return shared


def pytest_collection_modifyitems(config, items):
    modules = {item.path.name: item.module for item in items}
    for table in (SUBPROCESS, BROWSER, SLOW, REUSES_COMPILES):  # a renamed test or fixture must not drop out
        for module, names in table.items():
            missing = [name for name in names or () if module in modules and not hasattr(modules[module], name)]
            if missing:
                raise pytest.UsageError(f"tests/conftest.py names {', '.join(sorted(missing))} in {module}, which "
                                        "has no such test or fixture any more")
    parent: dict[str, str] = {}  # union-find: tests that share a fixture value share a group

    def root(key: str) -> str:
        while parent.setdefault(key, key) != key:
            key = parent[key]
        return key

    shared = {}
    for item in items:
        fixtures = _fixtures(item)
        shared[item] = _shared(item, fixtures)
        for key in shared[item]:
            parent[root(key)] = root(min(shared[item]))
        subprocess, browser = _listed(SUBPROCESS, item), _listed(BROWSER, item)
        if subprocess:
            item.add_marker(pytest.mark.subprocess)
        if browser:
            item.add_marker(pytest.mark.browser)
        if subprocess or browser or _listed(SLOW, item) or any(
                name in SLOW.get(_module(name, fixturedef), ()) for name, fixturedef in fixtures.items()):
            item.add_marker(pytest.mark.slow)
    groups: dict[str, set[str]] = {}
    for key in parent:
        groups.setdefault(root(key), set()).add(key)
    names = {group: "tiny-flux" if "tiny-flux" in keys else min(keys) for group, keys in groups.items()}
    for item in items:
        if shared[item]:
            item.add_marker(pytest.mark.xdist_group(names[root(min(shared[item]))]))
