"""Shared fixtures. Everything runs offline on the built-in tiny pipelines; each AoT compile happens once
per session and later fixtures reuse it through the real artifact cache."""
import os
import sys
import tempfile
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
from aot.model import Model, load_model  # noqa: E402
from aot.programs import capture_inputs  # noqa: E402
from settings import Preset, Settings  # noqa: E402

SEQ = 512  # the tiny FLUX model embeds guidance, so it follows FLUX.1-dev's text length
LATENTS_PRESET = Preset("landscape", 80, 48)  # where `Compiled.latents` runs the whole tiny FLUX pipeline


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
        self.report = optimization.optimize_pipeline_(self.model, self.settings)
        assert self.report.compile == "aoti", self.report.fallbacks

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
    """The app's default settings (whole-model scope, one program per preset token count), so the app
    later loads these very programs from the cache."""
    return Compiled()


@pytest.fixture(scope="session")
def compiled_blocks():
    """Regional scope: one program per repeated block class and token count."""
    return Compiled(aot_scope="blocks")


@pytest.fixture(scope="session")
def app(compiled_model):
    """The app module; it finds the session's compiled programs in the cache and loads them."""
    import app as app_module

    return app_module


@pytest.fixture(scope="session")
def client(app):
    from gradio_client import Client

    app.demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", quiet=True, css=app.CSS)  # as `python app.py`
    yield Client(app.demo.local_url, verbose=False)
    app.demo.close()
