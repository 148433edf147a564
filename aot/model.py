"""The pipeline a Space serves: loaded from MODEL_ID (or built tiny and offline), its family, its presets, and
how to call it the family's way."""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import dataclass

import torch

from aot.families import FAMILIES, Defaults, Family, Guidance, family_named
from aot.family import TwoStage
from aot.hardware import Hardware, detect
from aot.images import check_count
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
    presets: tuple[Preset, ...]  # what a request asks for: the output's sizes
    load_seconds: float = 0.0  # loading (or building) the pipeline, for the start-up breakdown
    recipe: TwoStage | None = None  # RECIPE=distilled: the family's two-stage recipe; None: one pipeline call
    upsampler: object | None = None  # that recipe's latent upsampling pipeline, over the pipeline's VAE

    def __call__(self, prompt: str, preset: Preset, steps: int, guidance: float | None = None,
                 negative_prompt: str | None = None, generator: torch.Generator | None = None,
                 images: tuple = (), **kwargs):
        """A request: one pipeline call at `preset` (`stage`), or under a two-stage recipe its chain (the family's
        `TwoStage.run`), which takes its fixed steps, no guidance, and the input images the family takes (an
        image-to-video family's first frame). Its result's `images` or `frames`: `outputs`."""
        if not self.recipe:
            return self.stage(prompt, preset, steps, guidance, negative_prompt, generator, images, **kwargs)
        if steps != self.defaults.steps or guidance not in (None, self.defaults.guidance) or negative_prompt:
            raise ValueError(f"RECIPE=distilled takes {self.defaults.steps} steps, no guidance or negative prompt; got "
                             f"{steps} steps, guidance {guidance}, negative prompt {negative_prompt!r}")
        # the page checks the count first: a direct call gets the same refusal, not an error from inside a stage
        check_count(len(images), self.family.max_images, self.family.name, self.family.min_images,
                    video=bool(self.family.video))
        return self.recipe.run(self, prompt, preset, generator, images=images, **kwargs)

    def stage(self, prompt: str | None, preset: Preset, steps: int, guidance: float | None = None,
              negative_prompt: str | None = None, generator: torch.Generator | None = None,
              images: tuple = (), **kwargs):
        """One pipeline call with the family's arguments: a whole request, or one stage of a two-stage recipe (and the
        call that start-up captures and times each transformer shape with). Guidance under its own name (a second
        expert's too: its own default at the default guidance, else the same), the text length, a video's frames, a
        negative prompt where the family does true CFG (a blank one when none is given, as the families'
        own examples do: the pipelines skip CFG without one), and an editing family's input images (RGB, checked
        by aot/images.py), each resized to its preset (`input_preset`). `kwargs` win over all of these."""
        guidance = self.defaults.guidance if guidance is None else guidance
        extra = {self.family.guidance_arg: guidance}
        if self.family.guidance_2_arg and self.defaults.guidance_2 is not None:
            extra[self.family.guidance_2_arg] = (self.defaults.guidance_2 if guidance == self.defaults.guidance
                                                 else guidance)
        if preset.frames:
            extra["num_frames"] = preset.frames
            extra["output_type"] = "np"  # frames as floats in [0, 1] (LTX-2's default is PIL images)
        if self.family.call_args:
            extra.update(self.family.call_args(preset.width, preset.height))
        if self.recipe:
            extra.update(self.recipe.call_args)
        if self.does_cfg(guidance) and self.family.negative_prompt_arg:
            extra[self.family.negative_prompt_arg] = negative_prompt or " "
        if images:
            resized = [self.resized(image, preset) for image in images]
            extra[self.family.image_arg] = resized[0] if self.family.max_images == 1 else resized
        return self.pipe(prompt=prompt, width=preset.width, height=preset.height, num_inference_steps=steps,
                         max_sequence_length=self.defaults.max_sequence_length, generator=generator,
                         **{**extra, **kwargs})

    def stages(self, preset: Preset, steps: int | None = None) -> list[tuple[Preset, int]]:
        """The transformer's work in a request for `preset`: each stage's size and steps. One stage of `steps`, or a
        two-stage recipe's fixed steps at 1/scale of each side, then at `preset`."""
        if not self.recipe:
            return [(preset, self.defaults.steps if steps is None else steps)]
        first, second = self.recipe.steps
        scale = self.recipe.scale
        smaller = dataclasses.replace(preset, label=f"{preset.label}, stage 1", width=preset.width // scale,
                                      height=preset.height // scale)
        return [(smaller, first), (preset, second)]

    @property
    def stage_presets(self) -> tuple[Preset, ...]:
        """Every size the transformer is called at, each once: the presets, and a two-stage recipe's first stages
        (a preset that is also another's first stage keeps its own label). What programs are compiled and timed for."""
        sizes = {stage.name: stage for preset in self.presets for stage, _ in self.stages(preset)[:-1]}
        sizes.update({preset.name: preset for preset in self.presets})
        return tuple(sizes.values())

    @property
    def extra_modules(self) -> tuple[torch.nn.Module, ...]:
        """Models a request runs beside the pipeline's own: a two-stage recipe's latent upsampler (eager). The memory
        plan counts them, and placing the pipeline places them."""
        if self.upsampler is None:
            return ()
        mine = [module for module in self.pipe.components.values() if isinstance(module, torch.nn.Module)]
        return tuple(module for module in self.upsampler.components.values()
                     if isinstance(module, torch.nn.Module) and all(module is not m for m in mine))

    def upsample(self, latents: torch.Tensor) -> torch.Tensor:
        """Stage 1's video latents `scale` times larger on each side, by the recipe's latent upsampler."""
        return self.upsampler(latents=latents, output_type="latent", return_dict=False)[0]

    def recipe_summary(self) -> str:
        """What a request runs, in words, for /status and the page: each size's stages under a two-stage recipe."""
        if not self.recipe:
            return "one pipeline call at the requested size"
        per_size = {}
        for preset in self.presets:
            (first, steps_1), (second, steps_2) = self.stages(preset)
            per_size[second.size] = (f"{steps_1} steps at {first.size}, x{self.recipe.scale} upsampled (eager), "
                                     f"{steps_2} steps at {second.size}")
        return "; ".join(per_size.values())

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


def recipe_of(settings: Settings, family: Family) -> TwoStage | None:
    """RECIPE's two-stage recipe for `family` (None: the standard one call); a family without one is refused."""
    if settings.recipe == "standard":
        return None
    if family.distilled is None:
        having = ", ".join(f.name for f in FAMILIES if f.distilled) or "none"
        raise ValueError(f"RECIPE={settings.recipe}: the {family.name} family has no distilled recipe (families with "
                         f"one: {having}); set RECIPE=standard, or unset it")
    return family.distilled


def load_upsampler(settings: Settings, recipe: TwoStage, pipe):
    """The recipe's latent upsampler: the tiny pipeline's own, built here, or loaded from UPSAMPLER_ID (else MODEL_ID
    at MODEL_REVISION); one that is missing or does not fit the pipeline stops startup, saying which setting to
    change."""
    if settings.tiny_family:
        state = torch.random.get_rng_state()
        torch.manual_seed(1)
        try:
            return recipe.build_tiny_upsampler(pipe)
        finally:
            torch.random.set_rng_state(state)
    source = settings.upsampler_id or settings.model_id
    revision = None if settings.upsampler_id else settings.revision
    try:
        return recipe.load_upsampler(pipe, source, revision)
    except Exception as err:  # noqa: BLE001 - a missing folder, a bad config or an unfit upsampler: one message
        raise SystemExit(
            f"RECIPE={settings.recipe} needs a latent upsampler in the `{recipe.upsampler_folder}` folder of "
            f"{'UPSAMPLER_ID' if settings.upsampler_id else 'MODEL_ID'}={source!r}, and none that fits could be "
            f"loaded: {type(err).__name__}: {_first_line(err)}\nSet UPSAMPLER_ID to a repo or folder that holds one"
            f"{f' (e.g. {recipe.upsampler_repo})' if recipe.upsampler_repo else ''}, or RECIPE=standard."
        ) from None


def load_model(settings: Settings, pipe=None, hardware: Hardware | None = None, upsampler=None) -> Model:
    """The pipeline (loaded here unless given), its family and defaults, and the presets it serves: PRESETS
    if set, else the family's native resolutions (its tiny ones for a tiny pipeline, the demo model's own); under a
    two-stage recipe (RECIPE) the recipe's own, and its latent upsampler (loaded here unless given). `hardware`:
    where it will run (detected here unless given)."""
    start = time.perf_counter()
    pipe = load_pipeline(settings, hardware or detect()) if pipe is None else pipe
    family = family_of(pipe)
    recipe = recipe_of(settings, family)
    own = recipe or family  # whose native presets
    native = (DEMO_PRESETS if settings.model_id == DEMO_MODEL_ID else own.tiny_presets if settings.tiny_family
              else own.presets)
    # a two-stage recipe's presets are its outputs, stage 1 runs at 1/scale of each side: still whole tokens
    multiple, why = family.multiple, ""
    if recipe:
        multiple *= recipe.scale
        why = (f"RECIPE={settings.recipe}: a preset is the output, and stage 1 runs at 1/{recipe.scale} of each side, "
               f"in multiples of {family.multiple}")
    presets = parse_presets(settings.presets_text or native, multiple, why)
    check_frames(presets, family.video, family.name)
    if recipe and upsampler is None:
        upsampler = load_upsampler(settings, recipe, pipe)
    return Model(pipe, family, (recipe or family).defaults(pipe), presets, round(time.perf_counter() - start, 2),
                 recipe, upsampler)
