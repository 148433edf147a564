"""Gradio front end: load the pipeline, make it fast once at startup, then validate and serve requests.

Everything about speed lives in optimization.py, every setting in settings.py.
"""
import logging
import math
import random
import time

import gradio as gr
import spaces
import torch

import optimization
from aot import parallel
from aot.families import Guidance
from aot.model import load_model
from settings import MAX_GUIDANCE, MAX_PROMPT_CHARS, MAX_SEED, MAX_STEPS, Settings

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
log = logging.getLogger("aot-space")

SETTINGS = Settings.from_env()
RANKS = parallel.join(SETTINGS)  # None in one process; one of several ranks: README "Several GPUs"
MODEL = load_model(SETTINGS)
DEFAULTS, FAMILY = MODEL.defaults, MODEL.family
REPORT = optimization.optimize_pipeline_(MODEL, SETTINGS, RANKS)
PRESETS = {preset.name: preset for preset in MODEL.presets}
USES_GUIDANCE = DEFAULTS.guidance_kind is not Guidance.NONE
TAKES_NEGATIVE_PROMPT = DEFAULTS.guidance_kind is Guidance.CFG and FAMILY.negative_prompt_arg is not None
SERVED_SHAPES: set[tuple[int, int]] = set()  # shapes generated at least once by this process
EXAMPLES = [
    "a tiny astronaut hatching from an egg on the moon",
    "a watercolor fox in a snowy birch forest, morning light",
    "a neon sign that says 'AoT' in a rainy alley, cinematic",
]


def status() -> dict:
    """What runs and how it was optimized, fallbacks included. Also served as the /status API."""
    return {
        "model_id": SETTINGS.model_id,
        "demo_model": SETTINGS.tiny_family is not None,
        "resolutions": list(PRESETS),
        "defaults": {"steps": DEFAULTS.steps, "guidance": DEFAULTS.guidance, "guidance_kind": DEFAULTS.guidance_kind.value,
                     "max_prompt_tokens": DEFAULTS.max_sequence_length},
        **REPORT.as_dict(),
    }


def _integer(value, name: str, low: int, high: int) -> int:
    # is_integer() is False for nan and inf; an int of any size is whole (math.isfinite would overflow on it)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (isinstance(value, float) and not value.is_integer()):
        raise gr.Error(f"{name} must be a whole number from {low} to {high}; got {value!r}.")
    if not low <= int(value) <= high:
        raise gr.Error(f"{name} must be from {low} to {high}; got {int(value)}.")
    return int(value)


def _text(value, name: str, notes: list[str], required: bool) -> str:
    if value is not None and not isinstance(value, str):
        raise gr.Error(f"{name} must be text; got {type(value).__name__}.")
    if required and (value is None or not value.strip()):
        raise gr.Error("Prompt is empty: describe the image you want.")
    value = (value or "").strip()
    if len(value) > MAX_PROMPT_CHARS:
        raise gr.Error(f"{name} is {len(value)} characters; the limit is {MAX_PROMPT_CHARS}.")
    if not value:
        return value
    tokens = FAMILY.prompt_tokens(MODEL.pipe, value)
    if tokens > DEFAULTS.max_sequence_length:
        raise gr.Error(f"{name} is {tokens} tokens; this model reads at most {DEFAULTS.max_sequence_length}. Shorten it.")
    note = FAMILY.prompt_note and FAMILY.prompt_note(MODEL.pipe, value)
    if note:
        notes.append(note)
    return value


def validate(prompt, resolution, seed, randomize_seed, steps, guidance, negative_prompt=""):
    """Checks every request before it can reach the GPU. Returns the cleaned values and notes for the user."""
    notes = []
    prompt = _text(prompt, "Prompt", notes, required=True)
    if negative_prompt and not TAKES_NEGATIVE_PROMPT:
        raise gr.Error(f"This {FAMILY.name} model takes no negative prompt; leave it empty.")
    negative_prompt = _text(negative_prompt, "Negative prompt", notes, required=False)
    if not isinstance(resolution, str) or resolution not in PRESETS:
        raise gr.Error(f"Unknown resolution {resolution!r}. Allowed: {', '.join(PRESETS)}.")
    if not isinstance(randomize_seed, bool):
        raise gr.Error(f"randomize_seed must be true or false; got {randomize_seed!r}.")
    seed = random.randint(0, MAX_SEED) if randomize_seed else _integer(seed, "Seed", 0, MAX_SEED)
    steps = _integer(steps, "Steps", 1, MAX_STEPS)
    if (isinstance(guidance, bool) or not isinstance(guidance, (int, float))
            or (isinstance(guidance, float) and not math.isfinite(guidance))):
        raise gr.Error(f"Guidance must be a finite number from 0 to {MAX_GUIDANCE}; got {guidance!r}.")
    if not 0 <= guidance <= MAX_GUIDANCE:
        raise gr.Error(f"Guidance must be from 0 to {MAX_GUIDANCE}; got {guidance}.")
    if guidance != DEFAULTS.guidance and not USES_GUIDANCE:
        raise gr.Error(f"This {FAMILY.name} model is guidance-distilled and takes no guidance; use {DEFAULTS.guidance}.")
    return prompt, PRESETS[resolution], seed, steps, float(guidance), negative_prompt, notes


def gpu_seconds(prompt, width, height, seed, steps, guidance, negative_prompt="") -> int:
    """ZeroGPU quota to reserve, from FLUX.1-dev's H100 step times at 1024x1024 (benchmarks/RESULTS.md: 98-109 ms
    compiled, 183 ms eager) with a 1.4-1.5x margin, scaled by the family's measured step cost, plus 10 s for
    text encoders, VAE and first loads."""
    step_seconds = (0.25 if REPORT.compile == "none" else 0.15) * FAMILY.step_cost
    # On ZeroGPU a shape's program is loaded in the GPU worker on its first request (61 s measured on an H100)
    first_load = 90 if REPORT.compile == "aoti" and (width, height) not in SERVED_SHAPES else 0
    calls = 2 if MODEL.does_cfg(guidance) else 1  # true CFG: two transformer calls per step
    return int(10 + first_load + calls * steps * step_seconds * width * height / 1024**2)


def _image(prompt: str, width: int, height: int, seed: int, steps: int, guidance: float, negative_prompt: str = ""):
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return MODEL(prompt, PRESETS[f"{width}x{height}"], steps, guidance, negative_prompt, generator).images[0]


@spaces.GPU(duration=gpu_seconds)
def run_pipeline(prompt: str, width: int, height: int, seed: int, steps: int, guidance: float,
                 negative_prompt: str = ""):
    """The only GPU work per request. Arguments and result are plain, picklable CPU values."""
    if RANKS:  # every rank runs the same call, in lockstep
        return RANKS.run(_image, prompt=prompt, width=width, height=height, seed=seed, steps=steps,
                         guidance=guidance, negative_prompt=negative_prompt)
    return _image(prompt, width, height, seed, steps, guidance, negative_prompt)


def generate(prompt, resolution=MODEL.presets[0].name, seed=0, randomize_seed=False, steps=DEFAULTS.steps,
             guidance=DEFAULTS.guidance, negative_prompt="", progress=gr.Progress(track_tqdm=True)):
    """Text to image. Returns the image, the seed used and a one-line summary with the time taken."""
    prompt, preset, seed, steps, guidance, negative_prompt, notes = validate(
        prompt, resolution, seed, randomize_seed, steps, guidance, negative_prompt)
    start = time.perf_counter()
    try:
        image = run_pipeline(prompt, preset.width, preset.height, seed, steps, guidance, negative_prompt)
    except optimization.UnsupportedShape as err:
        raise gr.Error(f"{err}. Allowed resolutions: {', '.join(PRESETS)}.") from None
    except torch.OutOfMemoryError:
        log.exception("out of memory")
        torch.cuda.empty_cache()
        raise gr.Error("The GPU ran out of memory for this request. Try a smaller resolution or fewer steps.") from None
    except gr.Error:
        raise
    except Exception as err:  # noqa: BLE001 - the user gets a readable error and the server keeps serving
        log.exception("generation failed")
        raise gr.Error(f"Generation failed: {type(err).__name__}: {err}") from None
    seconds = time.perf_counter() - start
    SERVED_SHAPES.add((preset.width, preset.height))
    details = f"{preset.width}x{preset.height}, {steps} steps, {seconds:.2f} s"
    if notes:
        details += " | note: " + "; ".join(notes)
    return image, seed, details


def _status_markdown() -> str:
    lines = []
    if SETTINGS.tiny_family:
        lines.append(f"**Demo model:** this is the built-in tiny {FAMILY.name} pipeline with *random weights*, so "
                     "images are noise. Set the `MODEL_ID` variable (e.g. `black-forest-labs/FLUX.1-dev`) to serve "
                     "a real model.")
    keys = ", ".join(f"`{key}`" for key in REPORT.cache_keys)
    compiled = (f"AoT compiled ({REPORT.compile_scope}), {REPORT.compile_source} in {REPORT.compile_seconds} s "
                f"(cache keys {keys}), {len(REPORT.programs)} program(s) for {', '.join(PRESETS)}"
                if REPORT.compile == "aoti" else "eager (not compiled)")
    lines.append(f"`{SETTINGS.model_id}` ({FAMILY.name} family) on {REPORT.device}, {REPORT.dtype}, attention `{REPORT.attention}`, "
                 f"quantization `{REPORT.quantization}`, {compiled}.")
    if REPORT.parallel:
        lines.append(parallel.describe(REPORT.parallel))
    text = "\n\n".join(lines)
    if REPORT.fallbacks:
        text += "\n\n" + "\n".join(f"- fallback: {item}" for item in REPORT.fallbacks)
    return text


with gr.Blocks(title="AoT diffusion Space") as demo:
    gr.Markdown(f"# {SETTINGS.model_id}\nAhead-of-time compiled text-to-image.")
    gr.Markdown(_status_markdown(), elem_id="status-banner")
    with gr.Row():
        prompt = gr.Textbox(label="Prompt", placeholder="Describe an image and press Enter", scale=4,
                            max_lines=4, elem_id="prompt")
        run_button = gr.Button("Generate", variant="primary", scale=1, elem_id="generate")
    resolution = gr.Radio(choices=[(p.choice, p.name) for p in MODEL.presets], value=MODEL.presets[0].name,
                          label="Resolution", elem_id="resolution")
    negative_prompt = gr.Textbox(value="", label="Negative prompt", placeholder="What the image should not show", max_lines=2,
                                 visible=TAKES_NEGATIVE_PROMPT, elem_id="negative-prompt")
    with gr.Accordion("Advanced", open=False, elem_id="advanced"):
        seed = gr.Number(label="Seed", value=0, minimum=0, maximum=MAX_SEED, precision=0, elem_id="seed")
        randomize_seed = gr.Checkbox(label="Randomize seed", value=True, elem_id="randomize")
        steps = gr.Slider(label="Steps", minimum=1, maximum=MAX_STEPS, step=1, value=DEFAULTS.steps)
        guidance = gr.Slider(label="Guidance", minimum=0, maximum=MAX_GUIDANCE, step=0.1, value=DEFAULTS.guidance,
                             interactive=USES_GUIDANCE)
    image = gr.Image(label="Image", type="pil", format="png", elem_id="image")
    with gr.Row():
        used_seed = gr.Number(label="Seed used", precision=0, interactive=False, elem_id="used-seed")
        details = gr.Textbox(label="Details", interactive=False, elem_id="details")
    with gr.Accordion("Optimization status", open=False):
        status_json = gr.JSON(label="status")
    inputs = [prompt, resolution, seed, randomize_seed, steps, guidance, negative_prompt]
    outputs = [image, used_seed, details]
    gr.Examples(examples=[[text] for text in EXAMPLES], inputs=[prompt], outputs=outputs, fn=generate,
                cache_examples=True, cache_mode="lazy")
    # preprocess=False: API payloads reach validate() as sent, so a wrong type gets its clear message rather than
    # failing inside a component's preprocess, which Gradio reports only as an opaque "upstream" error.
    gr.on([run_button.click, prompt.submit], generate, inputs, outputs, api_name="generate", preprocess=False)
    demo.load(status, None, status_json, api_name="status", queue=False)  # cheap: never waits behind images

demo.queue(default_concurrency_limit=1, max_size=SETTINGS.queue_size)

if __name__ == "__main__":
    if RANKS and RANKS.rank:
        RANKS.follow(_image)  # ranks 1..N-1 serve no page
    demo.launch()
