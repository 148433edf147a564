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
from settings import MAX_GUIDANCE, MAX_PROMPT_CHARS, MAX_SEED, MAX_STEPS, Settings, load_pipeline, model_defaults

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
log = logging.getLogger("aot-space")

SETTINGS = Settings.from_env()
pipe = load_pipeline(SETTINGS)
DEFAULTS = model_defaults(pipe)
REPORT = optimization.optimize_pipeline_(pipe, SETTINGS, DEFAULTS.max_sequence_length)
PRESETS = {preset.name: preset for preset in SETTINGS.presets}
CLIP_TOKENS = pipe.tokenizer.model_max_length
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
        "demo_model": SETTINGS.is_tiny,
        "resolutions": list(PRESETS),
        "defaults": {"steps": DEFAULTS.steps, "guidance": DEFAULTS.guidance},
        **REPORT.as_dict(),
    }


def _integer(value, name: str, low: int, high: int) -> int:
    # is_integer() is False for nan and inf; an int of any size is whole (math.isfinite would overflow on it)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (isinstance(value, float) and not value.is_integer()):
        raise gr.Error(f"{name} must be a whole number from {low} to {high}; got {value!r}.")
    if not low <= int(value) <= high:
        raise gr.Error(f"{name} must be from {low} to {high}; got {int(value)}.")
    return int(value)


def validate(prompt, resolution, seed, randomize_seed, steps, guidance):
    """Checks every request before it can reach the GPU. Returns the cleaned values and notes for the user."""
    notes = []
    if prompt is not None and not isinstance(prompt, str):
        raise gr.Error(f"Prompt must be text; got {type(prompt).__name__}.")
    if prompt is None or not prompt.strip():
        raise gr.Error("Prompt is empty: describe the image you want.")
    prompt = prompt.strip()
    if len(prompt) > MAX_PROMPT_CHARS:
        raise gr.Error(f"Prompt is {len(prompt)} characters; the limit is {MAX_PROMPT_CHARS}.")
    t5_tokens = len(pipe.tokenizer_2(prompt).input_ids)
    if t5_tokens > DEFAULTS.max_sequence_length:
        raise gr.Error(f"Prompt is {t5_tokens} tokens; this model reads at most {DEFAULTS.max_sequence_length}. Shorten it.")
    if len(pipe.tokenizer(prompt).input_ids) > CLIP_TOKENS:
        notes.append(f"the CLIP encoder reads only the first {CLIP_TOKENS} tokens; T5 reads the whole prompt")
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
    if guidance and not DEFAULTS.uses_guidance:
        notes.append("this model ignores guidance")
    return prompt, PRESETS[resolution], seed, steps, float(guidance), notes


def gpu_seconds(prompt, width, height, seed, steps, guidance) -> int:
    """ZeroGPU quota to reserve, from H100 step times at 1024x1024 (benchmarks/RESULTS.md: 98-109 ms
    compiled, 183 ms eager) with a 1.4-1.5x margin, plus 10 s for text encoders, VAE and first loads."""
    step_seconds = 0.25 if REPORT.compile == "none" else 0.15
    # On ZeroGPU a shape's program is loaded in the GPU worker on its first request (61 s measured on an H100)
    first_load = 90 if REPORT.compile == "aoti" and (width, height) not in SERVED_SHAPES else 0
    return int(10 + first_load + steps * step_seconds * width * height / 1024**2)


@spaces.GPU(duration=gpu_seconds)
def run_pipeline(prompt: str, width: int, height: int, seed: int, steps: int, guidance: float):
    """The only GPU work per request. Arguments and result are plain, picklable CPU values."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return pipe(prompt, width=width, height=height, num_inference_steps=steps, guidance_scale=guidance,
                generator=generator, max_sequence_length=DEFAULTS.max_sequence_length).images[0]


def generate(prompt, resolution=SETTINGS.presets[0].name, seed=0, randomize_seed=False, steps=DEFAULTS.steps,
             guidance=DEFAULTS.guidance, progress=gr.Progress(track_tqdm=True)):
    """Text to image. Returns the image, the seed used and a one-line summary with the time taken."""
    prompt, preset, seed, steps, guidance, notes = validate(prompt, resolution, seed, randomize_seed, steps, guidance)
    start = time.perf_counter()
    try:
        image = run_pipeline(prompt, preset.width, preset.height, seed, steps, guidance)
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
    if SETTINGS.is_tiny:
        lines.append("**Demo model:** this is the built-in tiny FLUX-shaped pipeline with *random weights*, so "
                     "images are noise. Set the `MODEL_ID` variable (e.g. `black-forest-labs/FLUX.1-dev`) to serve "
                     "a real model.")
    keys = ", ".join(f"`{key}`" for key in REPORT.cache_keys)
    compiled = (f"AoT compiled ({REPORT.compile_scope}), {REPORT.compile_source} in {REPORT.compile_seconds} s "
                f"(cache keys {keys}), {len(REPORT.programs)} program(s) for {', '.join(PRESETS)}"
                if REPORT.compile == "aoti" else "eager (not compiled)")
    lines.append(f"`{SETTINGS.model_id}` on {REPORT.device}, {REPORT.dtype}, attention `{REPORT.attention}`, "
                 f"quantization `{REPORT.quantization}`, {compiled}.")
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
    resolution = gr.Radio(choices=[(p.choice, p.name) for p in SETTINGS.presets], value=SETTINGS.presets[0].name,
                          label="Resolution", elem_id="resolution")
    with gr.Accordion("Advanced", open=False, elem_id="advanced"):
        seed = gr.Number(label="Seed", value=0, minimum=0, maximum=MAX_SEED, precision=0, elem_id="seed")
        randomize_seed = gr.Checkbox(label="Randomize seed", value=True, elem_id="randomize")
        steps = gr.Slider(label="Steps", minimum=1, maximum=MAX_STEPS, step=1, value=DEFAULTS.steps)
        guidance = gr.Slider(label="Guidance", minimum=0, maximum=MAX_GUIDANCE, step=0.1, value=DEFAULTS.guidance,
                             interactive=DEFAULTS.uses_guidance)
    image = gr.Image(label="Image", type="pil", format="png", elem_id="image")
    with gr.Row():
        used_seed = gr.Number(label="Seed used", precision=0, interactive=False, elem_id="used-seed")
        details = gr.Textbox(label="Details", interactive=False, elem_id="details")
    with gr.Accordion("Optimization status", open=False):
        status_json = gr.JSON(label="status")
    inputs = [prompt, resolution, seed, randomize_seed, steps, guidance]
    outputs = [image, used_seed, details]
    gr.Examples(examples=[[text] for text in EXAMPLES], inputs=[prompt], outputs=outputs, fn=generate,
                cache_examples=True, cache_mode="lazy")
    # preprocess=False: API payloads reach validate() as sent, so a wrong type gets its clear message rather than
    # failing inside a component's preprocess, which Gradio reports only as an opaque "upstream" error.
    gr.on([run_button.click, prompt.submit], generate, inputs, outputs, api_name="generate", preprocess=False)
    demo.load(status, None, status_json, api_name="status", queue=False)  # cheap: never waits behind images

demo.queue(default_concurrency_limit=1, max_size=SETTINGS.queue_size)

if __name__ == "__main__":
    demo.launch()
