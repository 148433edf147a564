"""Gradio front end: load the pipeline, make it fast once at startup, then validate and serve requests.

Everything about speed lives in optimization.py, every setting in settings.py.
"""
import dataclasses
import inspect
import logging
import math
import random
import re
import time
from pathlib import Path

import gradio as gr
import spaces
import torch
from gradio.processing_utils import save_pil_to_cache
from gradio.utils import get_upload_folder

import optimization
from aot import images, lora, panel, parallel, programs, prompts, step_cache, video, zerogpu
from aot.families import Guidance
from aot.graphs import GraphedForward
from aot.hardware import detect
from aot.memory import resident_bytes
from aot.model import load_model
from assets import shapes
from settings import (DEMO_MODEL_ID, LORA_NONE, MAX_FPS, MAX_GUIDANCE, MAX_PROMPT_CHARS, MAX_SEED, MAX_STEPS,
                      Settings, frames_refused)

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
log = logging.getLogger("aot-space")

HARDWARE = detect()  # once: on ZeroGPU, spaces' card (aot/hardware.py)
SETTINGS = Settings.from_env(has_cuda=HARDWARE.device == "cuda")
RANKS = parallel.join(SETTINGS)  # None in one process; one of several ranks: README "Several GPUs"
MODEL = load_model(SETTINGS, hardware=HARDWARE)
REPORT = optimization.optimize_pipeline_(MODEL, SETTINGS, RANKS, HARDWARE)
DEFAULTS, FAMILY = MODEL.defaults, MODEL.family  # the defaults after optimizing: a fused LoRA may change them
LORA_NAMES = [LORA_NONE, *(choice["name"] for choice in REPORT.lora_choices)]  # what a request may pick (LORA_CHOICES)
# repeated prompts skip the text encoders; in host memory under a low-VRAM layout, whose plan does not count them
PROMPT_CACHE = prompts.cache_prompts_(MODEL.pipe, SETTINGS.prompt_cache, host=REPORT.memory.get("low_vram", False))
# Every image's prompt encodings, for /status: added up here, since on ZeroGPU the cache lives in the GPU worker
ENCODINGS = prompts.Encodings()
PRESETS = {preset.name: preset for preset in MODEL.presets}
VIDEO = FAMILY.video  # None for an image family; a video family's presets also carry their frame counts
MADE = "a video" if VIDEO else "an image"  # what a request makes, in the page's words
# What a request's `resolution` names (WIDTHxHEIGHT), and the presets at each size: a video's frame count picks one
SIZES: dict[str, list] = {}
for _preset in MODEL.presets:
    SIZES.setdefault(_preset.size, []).append(_preset)


def _longest(size: str):
    """The preset a request for `size` that names no frame count gets: the most frames that size serves."""
    return max(SIZES[size], key=lambda preset: preset.frames)


DEFAULT_PRESET = _longest(MODEL.presets[0].size)  # a request that names neither resolution nor frames
# What each request asks ZeroGPU for: the preset's time measured on this device at startup, with a margin, for its
# steps and transformer calls, plus a new worker's start and a program's first load (aot/zerogpu.py)
DURATIONS = zerogpu.durations(REPORT, FAMILY, resident_bytes(MODEL.pipe, MODEL.extra_modules) / 2**30,
                              MODEL.input_tokens(image.size for image in MODEL.needed_images()), MODEL.stages,
                              bool(DEFAULTS.fixed_steps))
SIZE = REPORT.hardware.size.value if REPORT.hardware.size else None  # ZeroGPU's task size, passed to every task


def _calls(guidance: float) -> int:
    return MODEL.batch_one_calls(guidance)  # with two experts, each step runs one of them


# A default request must fit ZeroGPU's per-call maximum: the family's default steps, fewer where they would not
_steps, _lowered = DURATIONS.default_steps(DEFAULT_PRESET, DEFAULTS.steps, _calls(DEFAULTS.guidance))
if _lowered:
    REPORT.fallback("default steps", _lowered)
    MODEL.defaults = DEFAULTS = dataclasses.replace(DEFAULTS, steps=_steps)
USES_GUIDANCE = DEFAULTS.guidance_kind is not Guidance.NONE
TAKES_NEGATIVE_PROMPT = DEFAULTS.guidance_kind is Guidance.CFG and FAMILY.negative_prompt_arg is not None
# /generate's image arguments, one per image the family takes: `image` (the first slice's, kept for its callers),
# then `image_2`, `image_3`, ... trailing, each optional; gradio_client callers pass them by name
IMAGE_ARGS = [f"image_{i}" if i > 1 else "image" for i in range(1, FAMILY.max_images + 1)]
MIN_IMAGE_SIDE = max(images.MIN_SIDE, FAMILY.min_image_side)  # the pipeline's own, where it refuses more
SERVED_SHAPES: set[tuple[int, int]] = set()  # shapes the current GPU worker has generated (gpu_seconds)
# The page and the API start from this seed with randomize_seed off, so a seed sent is the seed used.
DEFAULT_SEED = 0
REAL_MODEL_EXAMPLES = [
    "a tiny astronaut hatching from an egg on the moon",
    "a watercolor fox in a snowy birch forest, morning light",
    "a neon sign that says 'AoT' in a rainy alley, cinematic",
]


def _example_prompts() -> list[str]:
    """The served model's own prompts when its folder has an `examples.txt` (one per line, as the demo model
    ships), else prompts for a real text-to-image model. Read once here; no request reads a file."""
    folder = getattr(MODEL.pipe, "name_or_path", None)  # diffusers: the folder or hub id it was loaded from
    path = Path(folder, "examples.txt") if folder else None
    if path is not None and path.is_file():
        prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if prompts:
            return prompts
    return REAL_MODEL_EXAMPLES


# An editing family's examples: one of the demo's pictures (DEMO_THUMBNAILS) as the input, and an edit of it that any
# editing model can follow (the tiny random-weight families draw noise); picking one fills both and makes the edit
EDIT_EXAMPLES = [
    ("example-1.png", "make the circle blue"),
    ("example-2.png", "move the square to the bottom"),
    ("example-3.png", "make the background white"),
    ("example-7.png", "swap the places of the triangle and the circle"),
    ("example-5.png", "turn it into a watercolour painting"),
]
# An image-to-video family's: the same pictures as first frames, and how they move
FIRST_FRAME_EXAMPLES = [
    ("example-1.png", "the red circle rolls slowly to the right"),
    ("example-2.png", "the blue square drops to the bottom and bounces"),
    ("example-3.png", "the yellow triangle spins in place"),
    ("example-7.png", "the triangle and the circle swap places"),
]
INPUT_EXAMPLES = FIRST_FRAME_EXAMPLES if FAMILY.first_frame else EDIT_EXAMPLES
EXAMPLES = [prompt for _, prompt in INPUT_EXAMPLES] if FAMILY.max_images else _example_prompts()
# The demo model knows only its training captions' words (assets/shapes.py); other models list none
VOCABULARY = frozenset(shapes.VOCABULARY) if SETTINGS.model_id == DEMO_MODEL_ID else frozenset()


def _vocabulary_hint() -> str | None:
    """The demo model's words by kind, shown under the prompt's label; None for any other model."""
    if not VOCABULARY:
        return None
    positions = ", ".join(phrases[0] for phrases in shapes.POSITION_WORDS.values())
    backgrounds = ", ".join(c for c in shapes.COLOURS if c not in shapes.OBJECT_COLOURS)
    background = shapes.BACKGROUND_TEMPLATES[0].format(text="", bg="a blue").strip()
    return (f"The demo model knows only these words. Shapes: {', '.join(shapes.SHAPES)}. Colours: "
            f"{', '.join(shapes.OBJECT_COLOURS)}. Positions: {positions}. Background: \"{background}\" (those "
            f"colours or {backgrounds}). Two objects: join them with \"and\".")


def _unknown_words(text: str) -> list[str]:
    """The words of `text` the demo model never saw in training, each once, in order; none for any other model."""
    if not VOCABULARY:
        return []
    return [word for word in dict.fromkeys(re.findall(r"[^\W_]+", text.lower())) if word not in VOCABULARY]


# The demo model's examples as picking one draws them at its own first preset, default seed and steps:
# `python assets/evaluate_demo.py --examples assets/examples --no-figures` remakes them, tests/test_browser.py checks
# them. No other model ships pictures, and none is drawn at start-up (a real model's would be slow): text only.
DEMO_THUMBNAILS = Path(__file__).parent / "assets" / "examples"


def _thumbnails() -> list[str | None]:
    """Each example's picture, or None: only the demo model at its own presets, unquantized and with no step cache,
    draws what the shipped ones show."""
    shipped = (SETTINGS.model_id == DEMO_MODEL_ID and not SETTINGS.presets_text and REPORT.quantization == "none"
               and REPORT.step_cache == "off")
    return [str(DEMO_THUMBNAILS / f"example-{i}.png") if shipped else None for i in range(1, len(EXAMPLES) + 1)]


def _examples() -> list[list]:
    """The examples' rows: an editing family's input picture and edit, else the prompt with its picture (or None)."""
    if FAMILY.max_images:
        return [[str(DEMO_THUMBNAILS / name), prompt] for name, prompt in INPUT_EXAMPLES]
    return [[picture, text] for picture, text in zip(_thumbnails(), EXAMPLES)]


def _output() -> dict:
    """What a request returns: an image, or a video with the frame counts each size serves (one compiled program
    each: README "Video") and its frame rate."""
    if not VIDEO:
        return {"kind": "image", "format": "png"}
    audio = f", {video.AUDIO_CODEC.upper()} at {VIDEO.audio_rate(MODEL.pipe)} Hz" if VIDEO.audio_rate else ""
    return {"kind": "video", "format": f"mp4 (H.264, yuv420p{audio})",
            "frames": {size: [p.frames for p in presets] for size, presets in SIZES.items()},
            "max_frames": VIDEO.max_frames, "frame_step": VIDEO.frame_step, "fps": VIDEO.fps, "max_fps": MAX_FPS}


def _default_request_seconds() -> int:
    """The GPU seconds a default request (DEFAULT_PRESET) gets (after spaces' factor), on a warm worker."""
    seconds = DURATIONS.task_seconds(DEFAULT_PRESET, DEFAULTS.steps, _calls(DEFAULTS.guidance), False, False)
    return DURATIONS.granted(seconds)


def _inputs() -> dict:
    """What a request brings beside its settings, and an input image's limits (aot/images.py)."""
    if not FAMILY.max_images:
        return {"text": True, "images": 0}
    return {"text": True, "images": FAMILY.max_images, "image_args": IMAGE_ARGS,
            "image_required": FAMILY.min_images > 0, "formats": list(images.FORMATS),
            "max_pixels": images.MAX_PIXELS, "min_side": MIN_IMAGE_SIDE, "max_aspect": images.MAX_ASPECT,
            "alpha_background": list(images.BACKGROUND), "resized_to": _resized_to()}


def _resized_to() -> str:
    """Where an input image is resized to, in words: a first frame under a two-stage recipe to its first stage's size,
    the one stage whose pipeline reads it."""
    if MODEL.recipe and FAMILY.first_frame:
        return f"stage 1's size, 1/{MODEL.recipe.scale} of each side of {FAMILY.resized_to}"
    return FAMILY.resized_to


def status() -> dict:
    """What runs and how it was optimized: fallbacks, and choices expected on this hardware (`notes`).
    Also served as the /status API."""
    return {
        "model_id": SETTINGS.model_id,
        "demo_model": SETTINGS.demo_model,  # a built-in stand-in: the trained demo or a tiny model that draws noise
        "weights": "random" if SETTINGS.tiny_family else "trained",
        "resolutions": list(SIZES),
        "inputs": _inputs(),
        "output": _output(),
        "defaults": {"steps": DEFAULTS.steps, "guidance": DEFAULTS.guidance,
                     "guidance_kind": DEFAULTS.guidance_kind.value, "max_prompt_tokens": DEFAULTS.max_sequence_length,
                     "seed": DEFAULT_SEED, "randomize_seed": False,
                     **({"fixed_steps": DEFAULTS.fixed_steps} if DEFAULTS.fixed_steps else {})},
        **REPORT.as_dict(),
        "compiles": sum(programs.COMPILES.values()),  # programs compiled by this process since it started
        "durations": {**DURATIONS.as_dict(), "default_request_s": _default_request_seconds()},
        "prompt_cache": {"size": SETTINGS.prompt_cache, **ENCODINGS.as_dict()},
    }


def user_error(message: str) -> gr.Error:
    """The error shown for a request the user can fix, logged as one line. Gradio prints the traceback of every
    gr.Error a handler raises unless print_exception is off, and a user's mistake has nothing in it to debug."""
    log.info("user error: %s", message)
    return gr.Error(message, print_exception=False)


def _integer(value, name: str, low: int, high: int) -> int:
    # is_integer() is False for nan and inf; an int of any size is whole (math.isfinite would overflow on it)
    if (isinstance(value, bool) or not isinstance(value, (int, float))
            or (isinstance(value, float) and not value.is_integer())):
        raise user_error(f"{name} must be a whole number from {low} to {high}; got {value!r}.")
    if not low <= int(value) <= high:
        raise user_error(f"{name} must be from {low} to {high}; got {int(value)}.")
    return int(value)


def _text(value, name: str, notes: list[str], required: bool) -> str:
    if value is not None and not isinstance(value, str):
        raise user_error(f"{name} must be text; got {type(value).__name__}.")
    if required and (value is None or not value.strip()):
        raise user_error("Prompt is empty: describe the image you want.")
    value = (value or "").strip()
    if len(value) > MAX_PROMPT_CHARS:
        raise user_error(f"{name} is {len(value)} characters; the limit is {MAX_PROMPT_CHARS}.")
    if not value:
        return value
    tokens = FAMILY.prompt_tokens(MODEL.pipe, value)
    if tokens > DEFAULTS.max_sequence_length:
        raise user_error(f"{name} is {tokens} tokens; this model reads at most {DEFAULTS.max_sequence_length}. "
                         "Shorten it.")
    note = FAMILY.prompt_note and FAMILY.prompt_note(MODEL.pipe, value)
    if note:
        notes.append(note)
    unknown = _unknown_words(value)
    if unknown:
        notes.append(f"not in the demo's vocabulary: {', '.join(unknown)}")
    return value


def _preset(resolution: str, frames):
    """The preset a request asks for: its size, and for a video its frame count (None: the most that size serves).
    Each frame count has its own compiled program (Wan's blocks see frames x height x width tokens), so a count is
    served only where a preset gives it; PRESETS adds more."""
    presets = SIZES[resolution]
    if not VIDEO:
        if frames is not None:
            raise user_error(f"This {FAMILY.name} model makes images; leave frames out.")
        return presets[0]
    if frames is None:
        return _longest(resolution)
    frames = _integer(frames, "Frames", 1, VIDEO.max_frames)
    why = frames_refused(frames, VIDEO.max_frames, VIDEO.frame_step)
    if why:
        raise user_error(f"Frames: {why}.")
    served = [p.frames for p in presets]
    if frames not in served:
        raise user_error(f"Frames: {resolution} is served at {', '.join(map(str, served))} frames, each a compiled "
                         f"program of its own; got {frames}. PRESETS=label={resolution}x{frames} adds it.")
    return next(p for p in presets if p.frames == frames)


def _fps(fps) -> int:
    if fps is None:
        return VIDEO.fps
    fps = _integer(fps, "fps", 1, MAX_FPS)
    if VIDEO.audio_rate and fps != VIDEO.fps:  # the sound track's length is the clip's at the model's frame rate
        raise user_error(f"fps: this {FAMILY.name} model's sound track is made for {VIDEO.fps} fps; give "
                         f"{VIDEO.fps} or leave fps out. Got {fps}.")
    return fps


def validate(prompt, resolution, seed, randomize_seed, steps, guidance, negative_prompt="", lora_choice=LORA_NONE,
             frames=None):
    """Checks every request before it can reach the GPU. Returns the cleaned values and notes for the user."""
    notes = []
    if not isinstance(lora_choice, str) or lora_choice not in LORA_NAMES:
        raise user_error(f"Unknown LoRA {lora_choice!r}. Choices: {', '.join(LORA_NAMES)}.")
    prompt = _text(prompt, "Prompt", notes, required=True)
    if negative_prompt and not TAKES_NEGATIVE_PROMPT:
        raise user_error(f"This {FAMILY.name} model takes no negative prompt; leave it empty.")
    negative_prompt = _text(negative_prompt, "Negative prompt", notes, required=False)
    if not isinstance(resolution, str) or resolution not in SIZES:
        raise user_error(f"Unknown resolution {resolution!r}. Allowed: {', '.join(SIZES)}.")
    preset = _preset(resolution, frames)
    if not isinstance(randomize_seed, bool):
        raise user_error(f"randomize_seed must be true or false; got {randomize_seed!r}.")
    seed = random.randint(0, MAX_SEED) if randomize_seed else _integer(seed, "Seed", 0, MAX_SEED)
    steps = _integer(steps, "Steps", 1, MAX_STEPS)
    if DEFAULTS.fixed_steps and steps != DEFAULTS.steps:
        raise user_error(f"Steps: {DEFAULTS.fixed_steps}; give {DEFAULTS.steps} or leave steps out. Got {steps}.")
    if (isinstance(guidance, bool) or not isinstance(guidance, (int, float))
            or (isinstance(guidance, float) and not math.isfinite(guidance))):
        raise user_error(f"Guidance must be a finite number from 0 to {MAX_GUIDANCE}; got {guidance!r}.")
    if not 0 <= guidance <= MAX_GUIDANCE:
        raise user_error(f"Guidance must be from 0 to {MAX_GUIDANCE}; got {guidance}.")
    if guidance != DEFAULTS.guidance and not USES_GUIDANCE:
        raise user_error(f"This {FAMILY.name} model is guidance-distilled and takes no guidance; "
                         f"use {DEFAULTS.guidance}.")
    if negative_prompt and not MODEL.does_cfg(guidance):  # the pipeline would drop it without a word
        raise user_error(f"This {FAMILY.name} model reads a negative prompt only at guidance above 1 (true CFG); "
                         f"raise the guidance or leave the negative prompt empty. Got guidance {guidance}.")
    too_long = DURATIONS.too_long(MODEL.presets, preset, steps, _calls(guidance))
    if too_long:
        raise user_error(f"{too_long}.")
    return prompt, preset, seed, steps, float(guidance), negative_prompt, lora_choice, notes


def _input_images(given: dict, output, notes: list[str]) -> tuple:
    """The request's input images, by argument name (Gradio's file records of uploads, already in its cache; None
    for an input left empty), checked and normalised (aot/images.py), in order; each conversion and the size each
    is resized to for a request of preset `output` added to `notes`, named by its argument where the family takes
    several."""
    given = {name: value for name, value in given.items() if value is not None}
    for name, value in given.items():
        if not (isinstance(value, dict) and isinstance(value.get("path"), str)):
            raise user_error(f"{name} must be an image file: gradio_client.handle_file(path or URL) in the API.")
    try:
        images.check_count(len(given), FAMILY.max_images, FAMILY.name, FAMILY.min_images, video=bool(VIDEO))
    except images.BadImage as err:
        raise user_error(str(err)) from None
    checked = {}
    for name, value in given.items():
        try:
            checked[name] = images.load(value["path"], MIN_IMAGE_SIDE)
        except images.BadImage as err:
            raise user_error(f"{name}: {err}" if FAMILY.max_images > 1 else str(err)) from None
    read_at = MODEL.stages(output)[0][0]  # a first frame's size: the first stage's, the one whose pipeline reads it
    for name, one in checked.items():
        preset = MODEL.input_preset(*one.image.size, read_at)
        label = name.replace("image", "input") if FAMILY.max_images > 1 else "input"
        notes += [*one.notes, f"{label} {one.image.width}x{one.image.height} resized to {preset.size}"]
    return tuple(one.image for one in checked.values())


def _shape(width: int, height: int, frames: int) -> tuple:
    return (width, height, frames) if frames else (width, height)


def _served_preset(width: int, height: int, frames: int):
    return PRESETS["x".join(map(str, _shape(width, height, frames)))]


def gpu_seconds(prompt, width, height, seed, steps, guidance, negative_prompt="", lora_choice=LORA_NONE,
                images=(), frames=0) -> int:
    """Seconds of GPU to ask ZeroGPU for, before spaces multiplies them by its factor. ZeroGPU ends a task at its
    duration, so it covers the slowest case; asking more spends the visitor's quota (a request asking more than is
    left is refused before it starts). A new worker's start and a program's first load count when this worker has
    not run the shape yet. An edit's input images add the work of their tokens (`Durations.task_seconds`)."""
    seconds = DURATIONS.task_seconds(_served_preset(width, height, frames), steps, _calls(guidance),
                                     new_worker=not SERVED_SHAPES,
                                     first_shape=_shape(width, height, frames) not in SERVED_SHAPES,
                                     input_tokens=MODEL.input_tokens(image.size for image in images))
    return DURATIONS.requested(seconds)


def _image(prompt: str, width: int, height: int, seed: int, steps: int, guidance: float, negative_prompt: str = "",
           lora_choice: str = LORA_NONE, images: tuple = (), frames: int = 0):
    """One request's image, or a video family's `video.Clip`, with what travels back beside it in its `info`."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    # the switch happens here, where the pipeline runs (on ZeroGPU the GPU worker, on every rank), under a lock
    # held until the image is made
    with (lora.using(MODEL, lora_choice), step_cache.counting(MODEL.pipe.transformer) as counts,
          PROMPT_CACHE.counting() as encodings):
        result = MODEL(prompt, _served_preset(width, height, frames), steps, guidance, negative_prompt, generator,
                       images)
    image = MODEL.outputs(result)[0]
    if VIDEO:
        image = video.Clip.of(image, MODEL.sound(result))
    # these travel with the image: on ZeroGPU this runs in the GPU worker, another process, which checks its own CUDA
    # graphs at its first requests
    image.info["encodings"] = encodings
    if counts is not None:
        image.info["step_cache"] = str(counts)
    graphed = MODEL.pipe.transformer.__dict__.get("forward")
    if isinstance(graphed, GraphedForward):
        image.info["graph_failures"] = graphed.failures()
    return image


@spaces.GPU(duration=gpu_seconds, size=SIZE)
def run_pipeline(prompt: str, width: int, height: int, seed: int, steps: int, guidance: float,
                 negative_prompt: str = "", lora_choice: str = LORA_NONE, images: tuple = (), frames: int = 0):
    """The only GPU work per request. Arguments and result are plain, picklable CPU values. On ZeroGPU it runs in
    the GPU worker, which hands the main process a gr.Error whole but any other error as its class name alone
    ("OutOfMemoryError"), so its errors are made readable here."""
    try:
        if RANKS:  # every rank runs the same call, in lockstep
            return RANKS.run(_image, prompt=prompt, width=width, height=height, seed=seed, steps=steps,
                             guidance=guidance, negative_prompt=negative_prompt, lora_choice=lora_choice,
                             images=images, frames=frames)
        return _image(prompt, width, height, seed, steps, guidance, negative_prompt, lora_choice, images, frames)
    except optimization.UnsupportedShape as err:
        raise user_error(f"{err}. Allowed resolutions: {', '.join(SIZES)}.") from None
    except torch.OutOfMemoryError:
        log.exception("out of memory")
        torch.cuda.empty_cache()
        raise gr.Error("The GPU ran out of memory for this request. Try a smaller resolution or fewer steps.",
                       print_exception=False) from None
    except gr.Error:
        raise
    except Exception as err:  # the user gets a readable error and the server keeps serving
        log.exception("generation failed")
        raise gr.Error(f"Generation failed: {type(err).__name__}: {err}", print_exception=False) from None


def _slug(text: str) -> str:
    """The first words of `text` in lower case, letters and digits only, joined by "-": a safe file name (at most
    100 bytes, well inside the file systems' 255)."""
    slug = "-".join(re.findall(r"[^\W_]+", text.lower())[:8]).encode()[:100].decode(errors="ignore")
    return slug.strip("-") or "image"


def generate(prompt, resolution=MODEL.presets[0].size, seed=DEFAULT_SEED, randomize_seed=False, steps=DEFAULTS.steps,
             guidance=DEFAULTS.guidance, negative_prompt="", lora=LORA_NONE, image=None,
             progress=gr.Progress(track_tqdm=True), frames=None, fps=None, **more_images):
    """Text to image (or video, VIDEO), or with an editing family an edit of `image` (the page's upload; in the API
    `gradio_client.handle_file(...)`; none: text to image) and, where the family takes several, of `image_2`,
    `image_3`, ... (IMAGE_ARGS). Returns the image's PNG or the video's MP4 (named after prompt and seed),
    the seed used and a one-line summary with the time taken and any conversion of the input. The seed is used as
    given unless randomize_seed is true; both default as in the page.
    `lora`: one of LORA_CHOICES by name, or "none". A video family's `frames` (None: the most its resolution
    serves) and `fps` (None: the model's own) are in the API by name; an image family takes neither."""
    prompt, preset, seed, steps, guidance, negative_prompt, lora_choice, notes = validate(
        prompt, resolution, seed, randomize_seed, steps, guidance, negative_prompt, lora, frames)
    if fps is not None and not VIDEO:
        raise user_error(f"This {FAMILY.name} model makes images; leave fps out.")
    fps = _fps(fps) if VIDEO else None
    # Gradio passes IMAGE_ARGS alone; called directly, image_4 and on count as images (refused past the family's)
    unknown = [name for name in more_images if not re.fullmatch(r"image_\d+", name)]
    if unknown:
        raise user_error(f"Unknown argument {', '.join(unknown)}; input images are {', '.join(IMAGE_ARGS) or 'none'}.")
    inputs = _input_images({"image": image, **more_images}, preset, notes)
    too_long = inputs and DURATIONS.too_long(MODEL.presets, preset, steps, _calls(guidance),
                                             MODEL.input_tokens(one.size for one in inputs))
    if too_long:
        raise user_error(f"{too_long}.")
    start = time.perf_counter()
    try:
        image = run_pipeline(prompt, preset.width, preset.height, seed, steps, guidance, negative_prompt, lora_choice,
                             inputs, preset.frames)
    except Exception as err:  # ZeroGPU's own errors too (no GPU, quota, task aborted): keep serving
        if not zerogpu.answered_before_gpu_work(err):
            SERVED_SHAPES.clear()  # spaces replaces a GPU worker whose task failed; the new one loads every program
        if isinstance(err, gr.Error):
            raise
        log.exception("generation failed")
        raise gr.Error(f"Generation failed: {type(err).__name__}: {err}", print_exception=False) from None
    seconds = time.perf_counter() - start
    skipped = image.info.pop("step_cache", None)  # what the step cache skipped (_image), not kept in the PNG
    for failure in image.info.pop("graph_failures", ()):  # a GPU worker's graph that failed its check
        REPORT.fallback("cuda graphs", failure)
    encodings = image.info.pop("encodings")
    ENCODINGS.add_(encodings)
    SERVED_SHAPES.add(_shape(preset.width, preset.height, preset.frames))
    name = f"{_slug(prompt)}-seed{seed}"
    if VIDEO:
        path = video.save(image, get_upload_folder(), name, fps, title=prompt, comment=f"seed {seed}")
        size = f"{preset.size}, {preset.frames} frames at {fps} fps"
    else:
        image.info.update(prompt=prompt, seed=str(seed))  # kept in the PNG as text
        # Gradio names an image it saves "image.png"; saved here into its cache, the download is named after the image
        path = save_pil_to_cache(image, get_upload_folder(), name=name, format="png")
        size = preset.size
    details = f"{size}, {_steps_in_words(preset, steps)}, {seconds:.2f} s, {encodings}"
    if lora_choice != LORA_NONE:
        details += f", LoRA {lora_choice}"
    if skipped:
        details += f", {skipped}"
    if notes:
        details += " | note: " + "; ".join(notes)
    return path, seed, details


def _steps_in_words(preset, steps: int) -> str:
    """A request's steps, each stage's at its size under a two-stage recipe: "11 steps (8 at 96x64, 3 at 192x128)"."""
    stages = MODEL.stages(preset, steps)
    if len(stages) == 1:
        return f"{steps} steps"
    return f"{steps} steps ({', '.join(f'{n} at {size.size}' for size, n in stages)})"


# Gradio and gradio_client read an argument's default from the signature, which names no **more_images: the later
# images as optional keyword arguments there, so that a caller may leave them out; an image family's has no frames
# or fps
_signature = inspect.signature(generate)
generate.__signature__ = _signature.replace(parameters=[
    *(p for p in _signature.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD
      and (VIDEO or p.name not in ("frames", "fps"))),
    *(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None) for name in IMAGE_ARGS[1:])])

EXAMPLE_RESULTS: dict[tuple[int, str], tuple] = {}  # (example, resolution) -> what generate() returned


def example(picked: tuple[int, list], resolution):
    """The picked example's prompt at the chosen resolution, with the default seed, steps and guidance. Made once
    per resolution by this process, then shown again: the record lives in this process only, so it always matches
    this start's model, presets and settings (a changed Space never shows an older image), and it holds at most
    one image per example and preset."""
    index, _ = picked
    key = (index, resolution)
    if key in EXAMPLE_RESULTS:
        path, seed, details = EXAMPLE_RESULTS[key]
        return path, seed, f"{details}, example shown again"
    picture = {"path": str(DEMO_THUMBNAILS / INPUT_EXAMPLES[index][0])} if FAMILY.max_images else None
    # an unknown resolution raises: nothing is kept
    EXAMPLE_RESULTS[key] = generate(EXAMPLES[index], resolution, image=picture)
    return EXAMPLE_RESULTS[key]


def _status_markdown() -> str:
    """The banner's details (aot/panel.py)."""
    return panel.details(SETTINGS, REPORT, list(PRESETS), _default_request_seconds(), DURATIONS.as_dict()["source"])


# Desktop: prompt and settings on the left, the result on the right, fitted to the window. Phone (one column):
# prompt, Generate, result, then the settings. The image never grows past the window, so seed and details stay in
# view under it.
CSS = """
#main { display: grid; grid-template-columns: minmax(300px, 2fr) 3fr;
        grid-template-areas: "ask result" "settings result"; grid-template-rows: auto 1fr; align-items: start; }
#ask { grid-area: ask; } #result { grid-area: result; } #settings { grid-area: settings; }
#image .image-frame { width: 100%; }
#image img { width: 100%; height: auto; max-height: calc(100dvh - 310px); object-fit: contain; }
#status-banner .label-wrap span { white-space: nowrap; overflow: hidden; text-overflow: ellipsis; }
@media (max-width: 767px) {
  #main { grid-template-columns: 100%; grid-template-areas: "ask" "result" "settings"; }
  #title h1 { font-size: 1.4rem; }
  #image img { max-height: calc(100dvh - 340px); }
  #main:has(#prompt .info-text) #image img { max-height: calc(100dvh - 440px); }  /* the demo's words, 5 lines */
}
"""

CLOSE_ERRORS = "() => document.querySelectorAll('[data-testid=\"toast-close\"]').forEach(button => button.click())"
SHOW_RESULT = "() => document.getElementById('result').scrollIntoView({block: 'start'})"

with gr.Blocks(title=panel.title(SETTINGS)) as demo:
    gr.Markdown(f"# {panel.title(SETTINGS)}", elem_id="title")
    with gr.Accordion(panel.headline(REPORT), open=False, elem_id="status-banner"):
        gr.Markdown(_status_markdown(), elem_id="status-details")
        status_json = gr.JSON(label="/status API", elem_id="status-json")
    with gr.Row(elem_id="main"):
        with gr.Column(min_width=300, elem_id="ask"):
            prompt = gr.Textbox(label="Prompt", placeholder=("Describe how the picture moves and press Enter"
                                                             if FAMILY.first_frame else
                                                             "Describe the edit, or an image, and press Enter"
                                                             if FAMILY.max_images else
                                                             f"Describe {MADE} and press Enter"),
                                max_lines=4, info=_vocabulary_hint(), elem_id="prompt")
            # An editing family's input, left of the result: upload, paste or webcam; the request checks it
            input_images = [gr.Image(label=f"Input image{f' {i}' if FAMILY.max_images > 1 else ''}"
                                           f"{'' if i <= FAMILY.min_images else ' (optional)'}",
                                     sources=["upload", "clipboard", "webcam"], type="filepath",
                                     elem_id="input-image" + (f"-{i}" if i > 1 else ""))
                            for i in range(1, FAMILY.max_images + 1)]
            run_button = gr.Button("Generate", variant="primary", elem_id="generate")
        with gr.Column(min_width=300, elem_id="result"):
            # no label drawn: on a phone the image fills the width, and the label covered its corner. An MP4 in
            # H.264 plays as it is (aot/video.py): gr.Video re-encodes only what a browser cannot play
            image = (gr.Video(label="Video", show_label=False, interactive=False, autoplay=True, loop=True,
                              elem_id="video") if VIDEO else
                     gr.Image(label="Image", show_label=False, type="filepath", format="png", interactive=False,
                              elem_id="image"))
            with gr.Row(visible=False) as facts:  # shown with the first image: no seed is used before one
                used_seed = gr.Number(label="Seed used", precision=0, interactive=False, elem_id="used-seed")
                details = gr.Textbox(label="Details", interactive=False, scale=3, elem_id="details")
        with gr.Column(min_width=300, elem_id="settings"):
            resolution = gr.Radio(choices=[(f"{presets[0].label} {size}", size) for size, presets in SIZES.items()],
                                  value=MODEL.presets[0].size, label="Resolution", elem_id="resolution")
            # a video's length: the frame counts the presets serve, and the frame rate it is encoded at
            video_inputs = {"frames": gr.Dropdown(choices=sorted({p.frames for p in MODEL.presets}),
                                                  value=DEFAULT_PRESET.frames, label="Frames", elem_id="frames"),
                            "fps": gr.Slider(label="Frames per second", minimum=1, maximum=MAX_FPS, step=1,
                                             value=VIDEO.fps, elem_id="fps",
                                             interactive=not VIDEO.audio_rate)} if VIDEO else {}  # _fps says why
            negative_prompt = gr.Textbox(value="", label="Negative prompt",
                                         placeholder=f"What {MADE} should not show", max_lines=2,
                                         visible=TAKES_NEGATIVE_PROMPT, elem_id="negative-prompt")
            lora_choice = gr.Dropdown(choices=LORA_NAMES, value=LORA_NONE, label="LoRA", visible=len(LORA_NAMES) > 1,
                                      elem_id="lora")
            with gr.Accordion("Advanced", open=False, elem_id="advanced"):
                randomize_seed = gr.Checkbox(label="Randomize seed", value=False, elem_id="randomize")
                seed = gr.Number(label="Seed", value=DEFAULT_SEED, minimum=0, maximum=MAX_SEED, precision=0,
                                 elem_id="seed")
                steps = gr.Slider(label="Steps", minimum=1, maximum=MAX_STEPS, step=1, value=DEFAULTS.steps,
                                  interactive=not DEFAULTS.fixed_steps, info=DEFAULTS.fixed_steps or None)
                guidance = gr.Slider(label="Guidance", minimum=0, maximum=MAX_GUIDANCE, step=0.1,
                                     value=DEFAULTS.guidance, interactive=USES_GUIDANCE)
            # A picked example's picture lands in the input image of an editing family, else here, unseen (and without
            # pictures this column is left out)
            picture = input_images[0] if FAMILY.max_images else gr.Image(type="filepath", visible=False)
            examples = gr.Examples(examples=_examples(), inputs=[picture, prompt], cache_examples=False,
                                   api_visibility="private", elem_id="examples")
    # the first image positionally, the others by name (generate's **more_images): the API lists them last, in order
    inputs = [prompt, resolution, seed, randomize_seed, steps, guidance, negative_prompt, lora_choice,
              *input_images[:1]]
    outputs = [image, used_seed, details]
    # In the browser alone: a new request closes the last one's error, which would cover the next image and the
    # title; a picked example (below the settings) brings its result into view, off-screen above on a phone or a
    # laptop's window. Declared before the requests: declared after, the page ran them once a request had failed,
    # closing its own error.
    gr.on([run_button.click, prompt.submit, examples.dataset.click], None, js=CLOSE_ERRORS, queue=False,
          show_progress="hidden", api_visibility="private")
    examples.dataset.click(None, js=SHOW_RESULT, queue=False, show_progress="hidden", api_visibility="private")
    # preprocess=False: API payloads reach validate() as sent, so a wrong type gets its clear message rather than
    # failing inside a component's preprocess, which Gradio reports only as an opaque "upstream" error.
    # Both make images on the one pipeline, so they share one queue: one image at a time.
    made = [gr.on([run_button.click, prompt.submit], generate, inputs, outputs, api_name="generate", preprocess=False,
                  inputs_kwargs={**dict(zip(IMAGE_ARGS[1:], input_images[1:])),
                                 **video_inputs}, show_progress_on=[image],
                  concurrency_id="pipeline"),
            # Picking an example fills the prompt and shows that example at the chosen resolution.
            examples.dataset.click(example, [examples.dataset, resolution], outputs, show_progress_on=[image],
                                   concurrency_id="pipeline", api_visibility="private")]
    for event in made:
        event.success(lambda: gr.Row(visible=True), None, facts, queue=False, show_progress="hidden",
                      api_visibility="private")
    randomize_seed.change(lambda on: gr.Number(interactive=not on), randomize_seed, seed, queue=False,
                          show_progress="hidden", api_visibility="private")
    demo.load(status, None, status_json, api_name="status", queue=False)  # cheap: never waits behind images

demo.queue(default_concurrency_limit=1, max_size=SETTINGS.queue_size)

if __name__ == "__main__":
    if RANKS and RANKS.rank:
        RANKS.follow(_image)  # ranks 1..N-1 serve no page
    demo.launch(css=CSS)
