"""The trained demo model (assets/demo-model), served when no MODEL_ID, GPU or Space is set: loaded through the
app's own path, it draws what it is asked (judged by assets/shapes.py), the same seed gives the same image, and
its AoT-compiled transformer draws what the eager one does."""
import os

import numpy as np
import pytest
import torch

import optimization
from aot import model as model_module
from aot.families import Guidance
from conftest import cpu
from aot.model import load_model, load_pipeline
from assets import shapes
from settings import DEMO_MODEL_DIR, DEMO_MODEL_ID, DEMO_PRESETS, Settings

SQUARE = "square=128x128"


def demo_settings(**env) -> Settings:
    """The settings of a fresh CPU machine: no MODEL_ID, no GPU, no Space (plus `env`)."""
    return Settings.from_env({"AOT_CACHE_DIR": os.environ["AOT_CACHE_DIR"], **env}, has_cuda=False)


@pytest.fixture(scope="module")
def demo():
    return load_model(demo_settings(COMPILE="none"))


def draw(model, prompt: str, seed: int = 0, preset=None) -> np.ndarray:
    generator = torch.Generator().manual_seed(seed)
    image = model(prompt, preset or model.presets[0], model.defaults.steps, generator=generator).images[0]
    return np.asarray(image)


def test_no_model_id_on_a_cpu_serves_the_demo_model_at_its_own_presets(demo):
    settings = demo_settings()
    assert settings.model_id == DEMO_MODEL_ID and settings.demo_model and settings.tiny_family is None
    assert "no MODEL_ID" in settings.demo_model_reason
    assert type(demo.pipe).__name__ == "FluxPipeline" and demo.family.name == "flux"
    assert ",".join(p.label + "=" + p.name for p in demo.presets) == DEMO_PRESETS
    # schnell-like: 4 steps, no guidance, and no more text than its T5 tokenizer reads
    assert (demo.defaults.steps, demo.defaults.guidance_kind) == (4, Guidance.NONE)
    assert demo.defaults.max_sequence_length == demo.pipe.tokenizer_2.model_max_length == 48
    assert all(p.dtype == torch.float32 for p in demo.pipe.transformer.parameters())


@pytest.mark.parametrize("prompt", [
    "a red circle on the left",
    "a blue square at the top",
    "a green triangle on the right",
    "a yellow triangle in the centre on a purple background",
    "a white square in the middle on a black background",
])
def test_it_draws_the_asked_shape_in_the_asked_colour_at_the_asked_position(demo, prompt):
    asked = shapes.things_in(prompt)[0]
    found = shapes.find_objects(draw(demo, prompt))
    assert found, f"{prompt!r}: no object found"
    assert (found[0].colour, found[0].shape, found[0].position) == (asked.colour, asked.shape, asked.position), \
        (prompt, found)


def test_it_draws_held_out_combinations_it_never_trained_on(demo):
    """(colour, shape, position) triples that no training scene had: every fourth held-out prompt, at the
    square preset. The issue's bars (colour >= 90%, shape >= 80%, position >= 80%) over these 12 images; the
    full evaluation (288 images) is assets/evaluate_demo.py."""
    held_out = shapes.evaluation_set(shapes.held_out())[::4]
    assert len(held_out) == 12
    right = [shapes.judge(draw(demo, prompt), things) for prompt, things in held_out]
    share = {fact: sum(r[fact] for r in right) / len(right) for fact in ("colour", "shape", "position")}
    assert share["colour"] >= 0.9 and share["shape"] >= 0.8 and share["position"] >= 0.8, share


def test_its_examples_are_drawn_right(demo):
    """examples.txt, which the app shows: prompts the judge found drawn right (colour, shape and position)."""
    with open(os.path.join(DEMO_MODEL_DIR, "examples.txt")) as examples:
        prompts = examples.read().splitlines()
    assert prompts
    for prompt in prompts:
        assert all(shapes.judge(draw(demo, prompt), shapes.things_in(prompt)).values()), prompt


def test_its_saved_tokenizers_are_the_ones_training_built(demo):
    from assets.train_demo import build_tokenizers

    clip, t5 = build_tokenizers()
    for text in ["a red circle on the left", "A Yellow triangle, at the top. zebra 42", *shapes.VOCABULARY]:
        assert demo.pipe.tokenizer(text).input_ids == clip(text).input_ids, text
        assert demo.pipe.tokenizer_2(text).input_ids == t5(text).input_ids, text
    assert all(len(demo.pipe.tokenizer_2(word).input_ids) == 2 for word in shapes.VOCABULARY)  # a word and </s>


def test_each_preset_draws_the_object_where_asked(demo):
    for preset in demo.presets:
        found = shapes.find_objects(draw(demo, "a purple circle at the bottom", preset=preset))
        assert (found[0].colour, found[0].position) == ("purple", "bottom"), preset


def test_same_seed_same_image_and_another_seed_another(demo):
    one, again, other = (draw(demo, "an orange square on the right", seed) for seed in (3, 3, 4))
    assert np.array_equal(one, again)
    assert not np.array_equal(one, other)


def test_a_missing_demo_model_stops_with_a_clear_message(monkeypatch, tmp_path):
    monkeypatch.setattr(model_module, "DEMO_MODEL_DIR", str(tmp_path / "demo-model"))
    with pytest.raises(SystemExit, match="demo model is missing.*train_demo.py.*MODEL_ID=tiny"):
        load_pipeline(demo_settings(), cpu())


def test_aot_compiled_draws_what_eager_draws(demo):
    settings = demo_settings(COMPILE="aoti", PRESETS=SQUARE)
    model = load_model(settings)
    prompt = "a white square in the middle on a black background"
    eager = draw(model, prompt)
    report = optimization.optimize_pipeline_(model, settings)
    assert report.compile == "aoti", report.fallbacks
    compiled = draw(model, prompt)
    assert np.abs(compiled.astype(int) - eager.astype(int)).max() <= 2  # 8-bit pixels, fp32 both ways
    assert shapes.find_objects(compiled)[0] == shapes.find_objects(eager)[0]
