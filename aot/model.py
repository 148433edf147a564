"""The pipeline a Space serves: loaded from MODEL_ID (or built tiny and offline), its family, its presets, and
how to call it the family's way."""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

import torch

from aot.families import FAMILIES, Defaults, Family, Guidance, family_named
from aot.hardware import Hardware, detect
from settings import (DEFAULT_MODEL_ID, DEMO_MODEL_DIR, DEMO_MODEL_ID, DEMO_PRESETS, Preset, Settings, check_frames,
                      parse_presets)

log = logging.getLogger("aot-space")
# Two diffusers warnings at start-up that no one running this template can act on, dropped at their own loggers
# by their text, nothing else:
# - "modules in X that should be kept in float32: []" comes with every dtype cast, whether or not the list is
#   empty; empty, no module is kept in float32 (a tiny Qwen-Image logged it four times: two models, cast twice
#   on the way to fp32).
# - "Unable to import `torchao` Tensor objects": diffusers 0.42 looks for NF4 and uintx classes that the pinned
#   torchao 0.18 no longer has. Only those formats' pickled checkpoints need them, and this template serves
#   neither; its fp8 `.bin` checkpoints load without them (tests/test_prequantized.py).
logging.getLogger("diffusers.models.modeling_utils").addFilter(
    lambda record: "should be kept in float32: []" not in record.getMessage())
logging.getLogger("diffusers.quantizers.torchao.torchao_quantizer").addFilter(
    lambda record: not record.getMessage().startswith("Unable to import `torchao` Tensor objects"))


@dataclass
class Model:
    pipe: object  # a diffusers pipeline
    family: Family
    defaults: Defaults
    presets: tuple[Preset, ...]
    load_seconds: float = 0.0  # loading (or building) the pipeline, for the start-up breakdown

    def __call__(self, prompt: str, preset: Preset, steps: int, guidance: float | None = None,
                 negative_prompt: str | None = None, generator: torch.Generator | None = None,
                 images: tuple = (), **kwargs):
        """One pipeline call with the family's arguments: guidance under its own name (a second expert's too: its
        own default at the default guidance, else the same), the text length, a video's frames, a
        negative prompt where the family does true CFG (a blank one when none is given, as the families'
        own examples do: the pipelines skip CFG without one), and an editing family's input images (RGB, checked
        by aot/images.py), each resized to its preset (`input_preset`). Its result's `images` or `frames`: `outputs`."""
        guidance = self.defaults.guidance if guidance is None else guidance
        extra = {self.family.guidance_arg: guidance}
        if self.family.guidance_2_arg and self.defaults.guidance_2 is not None:
            extra[self.family.guidance_2_arg] = (self.defaults.guidance_2 if guidance == self.defaults.guidance
                                                 else guidance)
        if preset.frames:
            extra["num_frames"] = preset.frames
            kwargs = {"output_type": "np", **kwargs}  # frames as floats in [0, 1] (LTX-2's default is PIL images)
        if self.family.call_args:
            extra.update(self.family.call_args(preset.width, preset.height))
        if self.does_cfg(guidance) and self.family.negative_prompt_arg:
            extra[self.family.negative_prompt_arg] = negative_prompt or " "
        if images:
            resized = [self.resized(image, preset) for image in images]
            extra[self.family.image_arg] = resized[0] if self.family.max_images == 1 else resized
        return self.pipe(prompt=prompt, width=preset.width, height=preset.height, num_inference_steps=steps,
                         max_sequence_length=self.defaults.max_sequence_length, generator=generator, **extra, **kwargs)

    def outputs(self, result):
        """A pipeline result's batch: its images, or a video family's frames (each video an array of frames)."""
        return result.frames if self.family.video else result.images

    def sound(self, result):
        """A video family's sound track for the batch's first video: (samples as (channels, count) floats in [-1, 1],
        sample rate), or None where its pipeline makes a silent video."""
        video = self.family.video
        if not (video and video.audio_rate):
            return None
        return result.audio[0].float().cpu().numpy(), video.audio_rate(self.pipe)

    def does_cfg(self, guidance: float) -> bool:
        """Whether a call at `guidance` runs true classifier-free guidance: the transformer on a negative prompt too."""
        return self.defaults.guidance_kind is Guidance.CFG and (guidance > 1 or self.family.cfg_always is not None)

    def step_calls(self, guidance: float) -> tuple[int, int]:
        """The transformer calls a step makes at `guidance`, and each call's batch: (2, 1) under CFG, (1, 2) where
        the family batches it (`cfg_batched`), (1, 1) without it."""
        if not self.does_cfg(guidance):
            return 1, 1
        return (1, 2) if self.family.cfg_batched else (2, 1)

    def batch_one_calls(self, guidance: float) -> int:
        """A step's transformer work at `guidance` in calls of batch one, what the request durations count: a call
        of batch two counts as two (twice the tokens through every layer; the H100 estimate is a batch-one call)."""
        calls, batch = self.step_calls(guidance)
        return calls * batch

    def input_preset(self, width: int, height: int, output: Preset | None = None) -> Preset:
        """The served preset an input image of `width` x `height` is resized to: the request's `output` where the input
        is its video's first frame (`first_frame`), else the family's own rule (`image_size`)."""
        if self.family.first_frame:
            return output
        return self.family.image_size(width, height, self.presets)

    def resized(self, image, output: Preset):
        """`image` at its preset's size (`input_preset`, for a request of preset `output`), resized as the pipeline's
        own image processor resizes; as it is where the pipeline resizes it itself (`resizes_inputs`)."""
        preset = self.input_preset(*image.size, output)
        if self.family.resizes_inputs or image.size == (preset.width, preset.height):
            return image
        return self.pipe.image_processor.resize(image, preset.height, preset.width)

    def sample_images(self) -> tuple:
        """Input images at the largest preset, as many as the family takes (none for a text-to-image family)."""
        from PIL import Image

        largest = max(self.presets, key=self.family.tokens)
        return (Image.new("RGB", (largest.width, largest.height), (128, 128, 128)),) * self.family.max_images

    def needed_images(self) -> tuple:
        """The sample inputs a call cannot do without (Qwen-Image-Edit's one): what start-up captures and times with."""
        return self.sample_images()[:self.family.min_images]

    def input_tokens(self, images) -> int:
        """The image tokens inputs of these (width, height) sizes add to a call: none for a video's first frame."""
        if self.family.first_frame:
            return 0
        return sum(self.family.image_tokens(p.width, p.height) for p in (self.input_preset(*size) for size in images))

    @property
    def max_image_tokens(self) -> int:
        """The most image tokens a call carries: its output's, and an editing family's inputs' (each at the size
        `image_size` maps it to, at most `max_input_tokens`)."""
        tokens = max(map(self.family.tokens, self.presets))
        return tokens + self.family.max_images * self.max_input_tokens

    @property
    def max_input_tokens(self) -> int:
        """The most image tokens one input image maps to: where the pipeline caps an input's area and only cuts its
        sides (FLUX.2), that area's tokens; else the most over the aspect ratios aot/images.py lets in (1:4 to 4:1)
        in steps of a thousandth: a preset (Kontext), or the pipeline's own size (Qwen-Image-Edit). That size's sides
        round to 32 pixels, and a ratio between two steps can round a side up where neither step did: one such
        step (two token rows of the longer side) is added for those families."""
        if not self.family.max_images or self.family.first_frame:
            return 0
        if self.family.input_area:
            return self.family.input_area // self.family.multiple**2
        from aot.images import MAX_ASPECT

        steps = int((MAX_ASPECT - 1 / MAX_ASPECT) * 1000)
        sizes = [self.input_preset(round(1000 / MAX_ASPECT) + i, 1000) for i in range(steps + 1)]
        tokens = max(self.family.image_tokens(s.width, s.height) for s in sizes)
        if self.family.resizes_inputs:
            tokens += 2 * max(max(s.width, s.height) for s in sizes) // self.family.multiple
        return tokens

    @property
    def max_text_tokens(self) -> int:
        """The most text tokens a call carries: the prompt's, and what its input images add to the text stream."""
        per_image = self.family.image_text_tokens(self.pipe) if self.family.image_text_tokens else 0
        return self.defaults.max_sequence_length + self.family.max_images * per_image


def build_tiny(family: Family):
    """The family's tiny random-weight pipeline: seeded, in eval mode, fp32, on the CPU."""
    state = torch.random.get_rng_state()
    torch.manual_seed(0)
    try:
        pipe = family.build_tiny()
    finally:
        torch.random.set_rng_state(state)
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.eval()  # built from configs, they start in training mode: dropout would make outputs random
    return pipe.to(torch.float32)


def repeated_block_lists(transformer: torch.nn.Module) -> dict[str, torch.nn.ModuleList]:
    """The transformer's lists of repeated blocks, by attribute name: its ModuleList children of the classes
    diffusers declares repeated (`_repeated_blocks`). Regional compilation builds one program per list, and
    low-VRAM mode streams blocks from these lists, so the blocks that stream are blocks that compile."""
    repeated = getattr(transformer, "_repeated_blocks", ())
    return {name: module for name, module in transformer.named_children()
            if isinstance(module, torch.nn.ModuleList) and len(module) and type(module[0]).__name__ in repeated}


def experts(pipe) -> list[torch.nn.Module]:
    """The pipeline's denoisers: `transformer`, and `transformer_2` where a second expert takes the low-noise steps
    (Wan 2.2 A14B). Each is placed, quantized, compiled and installed alike; the compiled work is shared between them
    (one architecture: the same programs, each reading its own expert's weights)."""
    return [module for name, module in pipe.components.items()
            if name.startswith("transformer") and isinstance(module, torch.nn.Module)]


def family_of(pipe) -> Family:
    name = type(pipe).__name__
    for family in FAMILIES:
        if name in family.pipelines and (family.serves is None or family.serves(pipe)):
            why = family.unserved and family.unserved(pipe)
            if why:
                raise SystemExit(f"{name}: {why}")
            return family
    supported = ", ".join(f"{p} ({f.name})" for f in FAMILIES for p in f.pipelines)
    raise SystemExit(f"{name} is not a supported pipeline. This template serves: {supported}. "
                     "Adding one is one entry in aot/families/ (README: Add a model family).")


def _first_line(err: Exception) -> str:
    # diffusers' loading errors point at "the stacktrace above", which this message replaces
    return (str(err).splitlines() or [""])[0].replace(" Please check out the root cause in the stacktrace above.", "")


def _stored_quantization(source: str, revision: str | None) -> dict:
    """The `quantization_config` the transformer's checkpoint was saved with ({} for plain weights), read before
    loading it: it decides the dtype, and a format this template does not serve stops startup before the download."""
    import diffusers

    config = diffusers.DiffusionPipeline.load_config(source, revision=revision)
    library, name = config.get("transformer") or (None, None)
    transformer_class = getattr(diffusers, name, None) if library == "diffusers" else None
    if transformer_class is None:
        return {}  # no transformer this diffusers has: loading, or `family_of`, says what is wrong
    return transformer_class.load_config(source, subfolder="transformer", revision=revision).get(
        "quantization_config") or {}


def load_pipeline(settings: Settings, hardware: Hardware):
    """The pipeline named by MODEL_ID, in host memory: bf16 when a GPU will run it or its transformer is stored
    quantized by torchao, else fp32. `optimization.optimize_pipeline_` puts it on the GPU (whole, or in low-VRAM
    mode part by part). A model that cannot be loaded stops startup with one message that says which setting to
    change."""
    if settings.tiny_family:
        log.warning("Running the built-in tiny random-weight %s pipeline (%s). Its images are noise. "
                    "Set MODEL_ID (e.g. %s) to serve a real model.", settings.tiny_family, settings.demo_model_reason,
                    DEFAULT_MODEL_ID)
        return build_tiny(family_named(settings.tiny_family))
    from diffusers import DiffusionPipeline

    source = settings.model_id
    if settings.model_id == DEMO_MODEL_ID:
        if not os.path.isfile(os.path.join(DEMO_MODEL_DIR, "model_index.json")):
            raise SystemExit(f"The demo model is missing from {DEMO_MODEL_DIR} ({settings.demo_model_reason}). "
                             "Restore assets/demo-model, or rebuild it on a GPU with `python assets/train_demo.py`; "
                             f"or set MODEL_ID=tiny (random weights) or a real model such as {DEFAULT_MODEL_ID}.")
        log.warning("Running the built-in demo model (%s): a tiny FLUX.1-family model trained on plain shapes, from "
                    "%s. Set MODEL_ID (e.g. %s) to serve a real model.", settings.demo_model_reason, DEMO_MODEL_DIR,
                    DEFAULT_MODEL_ID)
        source = DEMO_MODEL_DIR
    try:
        method = _stored_quantization(source, settings.revision).get("quant_method")
        if method not in (None, "torchao"):
            raise SystemExit(
                f"MODEL_ID={settings.model_id!r} holds a transformer quantized with {method}. This template serves "
                "pre-quantized transformers saved by torchao only (README: Pre-quantized checkpoints); other formats "
                f"are not installed or tested here. Point MODEL_ID at the unquantized model (e.g. {DEFAULT_MODEL_ID}) "
                "and set QUANTIZATION=fp8, int8 or int4 to quantize it at startup.")
        # A torchao checkpoint is made from bf16 weights (its fp8 per-row format takes nothing else, diffusers warns
        # against other dtypes for its int formats) and its weights compute in that dtype: the whole pipeline takes
        # it, even on a CPU, since the pipeline feeds the transformer in its text encoders' dtype.
        dtype = torch.bfloat16 if hardware.device == "cuda" or method else torch.float32
        pipe = DiffusionPipeline.from_pretrained(source, revision=settings.revision, dtype=dtype)
        if method:  # diffusers makes stored weights Parameters that require grad: AOTInductor unwraps an int8 one
            pipe.transformer.requires_grad_(False)  # into int8 data that requires grad, which torch refuses
        return pipe
    except Exception as err:  # noqa: BLE001 - any failure here means the same thing to the user
        raise SystemExit(
            f"Could not load MODEL_ID={settings.model_id!r}"
            f"{f' at MODEL_REVISION={settings.revision!r}' if settings.revision else ''}: "
            f"{type(err).__name__}: {_first_line(err)}\n"
            "Check the id and revision, that the hub is reachable and that HF_TOKEN can read the repo (gated "
            "models such as FLUX.1-dev need their license accepted), or unset MODEL_ID to run the tiny demo."
        ) from None


def load_model(settings: Settings, pipe=None, hardware: Hardware | None = None) -> Model:
    """The pipeline (loaded here unless given), its family and defaults, and the presets it serves: PRESETS
    if set, else the family's native resolutions (its tiny ones for a tiny pipeline, the demo model's own).
    `hardware`: where it will run (detected here unless given)."""
    start = time.perf_counter()
    pipe = load_pipeline(settings, hardware or detect()) if pipe is None else pipe
    family = family_of(pipe)
    native = (DEMO_PRESETS if settings.model_id == DEMO_MODEL_ID else family.tiny_presets if settings.tiny_family
              else family.presets)
    presets = parse_presets(settings.presets_text or native, family.multiple)
    check_frames(presets, family.video, family.name)
    return Model(pipe, family, family.defaults(pipe), presets, round(time.perf_counter() - start, 2))
