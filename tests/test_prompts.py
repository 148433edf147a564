"""The prompt cache (aot/prompts.py, PROMPT_CACHE) on every family's tiny pipeline, eager: a repeated prompt runs no
text encoder (counted by forward hooks on each) and gives the very latents of an uncached run; another prompt, or
another negative prompt, runs them again; the least recently used entry is evicted at the bound; a result handed out
cannot change an entry. Then the app: each image's details give the text encoders' seconds or say the prompt came
from the cache, and /status adds them up."""
import importlib.util
import pickle

import pytest
import torch
from PIL import Image

from aot.prompts import PromptCache, cache_prompts_
from conftest import ROOT, TEXT_FAMILIES, tiny_model
from settings import PROMPT_CACHE_DEFAULT, Settings

PROMPT, OTHER, THIRD = "a red cube", "a blue sphere on a table", "a green cone"
NEGATIVE = "blurry, low quality"
STEPS = 1  # the cache acts before the first step


class EncoderCalls:
    """Counts the forward calls of every text encoder of a pipeline: what runs, observed, not stubbed."""

    def __init__(self, pipe):
        self.calls = 0
        for name, module in pipe.components.items():
            if name.startswith("text_encoder") and module is not None:
                module.register_forward_hook(self._count)

    def _count(self, *_):
        self.calls += 1

    def take(self) -> int:
        calls, self.calls = self.calls, 0
        return calls


def _model(name: str):
    return tiny_model(model_id=f"tiny-{name}", compile="none")


def _latents(model, prompt: str, **kwargs) -> torch.Tensor:
    generator = torch.Generator().manual_seed(5)
    with torch.inference_mode():
        return model(prompt, model.presets[0], steps=STEPS, generator=generator, output_type="latent", **kwargs).images


def _encode(model, prompt: str):
    """The pipeline's own encode_prompt, called as every family's takes it: the prompt and the text length."""
    with torch.inference_mode():
        return model.pipe.encode_prompt(prompt=prompt, max_sequence_length=model.defaults.max_sequence_length)


def _tensors(result) -> list[torch.Tensor]:
    return [leaf for leaf in torch.utils._pytree.tree_leaves(result) if isinstance(leaf, torch.Tensor)]


@pytest.mark.parametrize("name", [family.name for family in TEXT_FAMILIES])
def test_a_repeated_prompt_runs_no_text_encoder_and_gives_the_uncached_latents(name):
    model = _model(name)
    encoders = EncoderCalls(model.pipe)
    uncached = _latents(model, PROMPT)
    encoder_calls = encoders.take()
    cache = cache_prompts_(model.pipe, PROMPT_CACHE_DEFAULT)

    with cache.counting() as first:
        assert torch.equal(_latents(model, PROMPT), uncached)
    assert encoders.take() == encoder_calls and first.hits == 0 and first.seconds > 0
    assert first.misses == (2 if model.does_cfg(model.defaults.guidance) else 1)  # true CFG: the negative prompt too
    with cache.counting() as again:
        assert torch.equal(_latents(model, PROMPT), uncached)
    assert encoders.take() == 0 and (again.misses, again.hits) == (0, first.misses) and again.seconds == 0
    assert str(again) == "prompt embeddings from the cache" and str(first).startswith("text encoding ")

    # another prompt is encoded; under true CFG the negative prompt (blank, or klein's empty one) still comes cached
    with cache.counting() as other:
        _latents(model, OTHER)
    assert encoders.take() > 0 and (other.misses, other.hits) == (1, first.misses - 1)
    assert other.entries == first.misses + 1
    if model.family.negative_prompt_arg:  # another negative prompt is encoded too, alone
        with cache.counting() as negative:
            _latents(model, PROMPT, negative_prompt=NEGATIVE)
        assert encoders.take() > 0 and (negative.misses, negative.hits) == (1, 1)
        assert str(negative).endswith(", 1 of 2 from the cache")


@pytest.mark.parametrize("name", [family.name for family in TEXT_FAMILIES])
def test_the_bound_evicts(name):
    model = _model(name)
    encoders = EncoderCalls(model.pipe)
    cache = cache_prompts_(model.pipe, 1)
    for prompt, runs in ((PROMPT, True), (OTHER, True), (PROMPT, True), (PROMPT, False)):
        with cache.counting() as encodings:
            _encode(model, prompt)
        assert (encoders.take() > 0) == runs and encodings.misses == runs and encodings.entries == 1, prompt


def test_the_least_recently_used_prompt_goes_first():
    encoded = []
    cache = PromptCache(lambda prompt, max_sequence_length=512: encoded.append(prompt) or [torch.zeros(1)], 2)
    for prompt in (PROMPT, OTHER, PROMPT, THIRD, PROMPT, OTHER):  # PROMPT used again before THIRD: OTHER goes first
        cache(prompt)
    cache(prompt=OTHER, max_sequence_length=512)  # the same call, its default given by name
    assert encoded == [PROMPT, OTHER, THIRD, OTHER]


def test_a_result_handed_out_cannot_change_an_entry():
    """The pipelines do not write their embeddings in place, but a cached prompt must not depend on that."""
    model = _model("qwen-image")  # embeddings and a mask
    expected = [t.clone() for t in _tensors(_encode(model, PROMPT))]
    cache_prompts_(model.pipe, PROMPT_CACHE_DEFAULT)
    for _ in range(3):  # the result of a miss, then of hits
        result = _tensors(_encode(model, PROMPT))
        assert all(torch.equal(t, e) for t, e in zip(result, expected, strict=True))
        with torch.inference_mode():
            for tensor in result:
                tensor.add_(1)


def test_size_0_keeps_nothing_and_still_times_each_encoding_and_given_embeddings_pass_through():
    model = _model("flux")
    encoders = EncoderCalls(model.pipe)
    cache = cache_prompts_(model.pipe, 0)
    with cache.counting() as encodings:
        embeds, pooled, _ = _encode(model, PROMPT)
        _encode(model, PROMPT)
    assert (encodings.misses, encodings.hits, encodings.entries) == (2, 0, 0) and encoders.take() == 4  # CLIP, T5
    with cache.counting() as given, torch.inference_mode():
        model.pipe.encode_prompt(prompt=None, prompt_embeds=embeds, pooled_prompt_embeds=pooled)
    assert (given.misses, given.hits) == (0, 0) and encoders.take() == 0 and str(given) == "no prompt encoded"


@pytest.mark.parametrize("value, message", [("-1", "PROMPT_CACHE=-1"), ("many", "PROMPT_CACHE='many'")])
def test_prompt_cache_setting(value, message):
    assert Settings.from_env({}, has_cuda=False).prompt_cache == PROMPT_CACHE_DEFAULT
    assert Settings.from_env({"PROMPT_CACHE": "0"}, has_cuda=False).prompt_cache == 0
    with pytest.raises(ValueError, match=message):
        Settings.from_env({"PROMPT_CACHE": value}, has_cuda=False)


def test_the_app_details_give_the_encoding_seconds_or_the_cache_and_status_adds_them_up(monkeypatch):
    """Qwen-Image, true CFG: every request also encodes a negative prompt, blank unless one is given."""
    monkeypatch.setenv("MODEL_ID", "tiny-qwen-image")
    monkeypatch.setenv("COMPILE", "none")  # eager: the cache acts on text encoding alone
    spec = importlib.util.spec_from_file_location("app_prompt_cache", ROOT / "app.py")
    app = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(app)
    request = dict(prompt=PROMPT, resolution=app.MODEL.presets[0].name, seed=3, steps=1)
    assert app.status()["prompt_cache"] == {"size": PROMPT_CACHE_DEFAULT, "entries": 0, "hits": 0, "misses": 0,
                                            "seconds_per_prompt": None}
    first, _, first_details = app.generate(**request)
    again, _, again_details = app.generate(**request)
    _, _, negative_details = app.generate(**request, negative_prompt=NEGATIVE)
    # "64x64, 1 steps, 0.21 s, text encoding 0.05 s"
    assert first_details.split(", ")[3].startswith("text encoding ") and first_details.endswith(" s")
    assert again_details.endswith(", prompt embeddings from the cache")
    assert ", 1 of 2 from the cache" in negative_details
    with Image.open(first) as one, Image.open(again) as other:
        assert one.tobytes() == other.tobytes()
    # on ZeroGPU `_image` runs in the GPU worker, and its image (the record in its info) comes back pickled
    image = pickle.loads(pickle.dumps(app._image(PROMPT, 64, 64, 3, 1, app.DEFAULTS.guidance)))
    assert str(image.info["encodings"]) == "prompt embeddings from the cache"
    counts = app.status()["prompt_cache"]
    assert {key: counts[key] for key in ("size", "entries", "hits", "misses")} == {
        "size": PROMPT_CACHE_DEFAULT, "entries": 3, "hits": 3, "misses": 3}  # prompt, blank, NEGATIVE
    assert counts["seconds_per_prompt"] > 0
