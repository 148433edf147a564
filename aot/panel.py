"""What the page says about what runs: the title, the status banner's one line and the details it opens to, written
from the settings and the start-up Report (which `/status` serves as data)."""
from __future__ import annotations

from aot import parallel
from aot.report import Report
from aot.zerogpu import MARGIN, MAX_TASK_SECONDS
from settings import Settings

STARTUP_STEPS = {"model_load_s": "model load", "place_s": "placement", "quantize_s": "quantization",
                 "download_s": "download", "upload_s": "upload", "install_s": "install", "warm_up_s": "warm-up"}


def model_name(settings: Settings) -> str:
    if settings.tiny_family:
        return f"tiny-{settings.tiny_family}, random weights"
    if settings.demo_model:
        return "the built-in demo model"
    return settings.model_id.rstrip("/").rsplit("/", 1)[-1]


def title(settings: Settings) -> str:
    """What the Space does and with which model; non-breaking hyphens keep a model's name on one line."""
    return f"Text to image with {model_name(settings)}".replace("-", "\u2011")


def headline(report: Report) -> str:
    """The banner's one line, most telling first (a phone cuts the end): compiled or not, where, how many
    fallbacks, then the programs; the details open below it."""
    where = "GPU" if report.hardware.device == "cuda" else report.hardware.device.upper()
    parts = [f"AoT compiled on {where}" if report.compile == "aoti" else f"Not compiled, so slower, on {where}"]
    if report.fallbacks:
        parts.append(f"{len(report.fallbacks)} fallback{'s' if len(report.fallbacks) > 1 else ''}")
    if report.compile == "aoti":
        parts.append(f"{len(report.programs)} program(s), {report.compile_source}")
    return " · ".join(parts)


def startup_line(startup: dict) -> str:
    """Where start-up went (Report.startup), in one line: each step, and each program with how it came."""
    parts = [f"{label} {startup[key]} s" for key, label in STARTUP_STEPS.items() if key in startup]
    for program in startup.get("programs", []):
        seconds = program.get("compile_s", program["verify_s"])
        parts.append(f"{program['resolutions']} {program['source']} {seconds} s")
    return ", ".join(parts)


def lora_lines(report: Report) -> list[str]:
    """LORAS fused at startup and LORA_CHOICES, each with its scale and file's hash (and its host memory)."""
    def entry(lora: dict) -> str:
        extra = "".join(f", also {name}" for name in lora.get("text_encoders", []))
        extra += "".join(f", default {key} {value}" for key, value in lora.get("defaults", {}).items())
        extra += f", {lora['host_bytes'] / 2**30:.2f} GiB of host memory" if "host_bytes" in lora else ""
        return f"`{lora['name']}` (scale {lora['scale']:g}, rank {lora['rank']}, sha256 {lora['sha256'][:12]}{extra})"

    lines = []
    if report.loras:
        lines.append("LoRAs fused: " + ", ".join(map(entry, report.loras)) + ".")
    if report.lora_choices:
        lines.append("LoRAs to switch per request: " + ", ".join(map(entry, report.lora_choices)) + "; nothing "
                     "recompiles, a switch copies their weights in.")
    return lines


def details(settings: Settings, report: Report, resolutions: list[str], default_request_s: int,
            durations_source: str) -> str:
    """The banner's details: the model, how it runs, choices expected on this hardware, then every fallback.
    `default_request_s`: the GPU seconds a default image asks ZeroGPU for, found `durations_source`."""
    lines = []
    if settings.tiny_family:
        lines.append(f"**Demo model:** this is the built-in tiny {report.family} pipeline with *random weights*, so "
                     "images are noise. Set the `MODEL_ID` variable (e.g. `black-forest-labs/FLUX.1-dev`) to serve "
                     "a real model.")
    elif settings.demo_model:
        lines.append("**Demo model:** a tiny model trained here on plain shapes, to try the Space offline. Set the "
                     "`MODEL_ID` variable (e.g. `black-forest-labs/FLUX.1-dev`) to serve a real model.")
    keys = ", ".join(f"`{key}`" for key in report.cache_keys)
    compiled = (f"AoT compiled ({report.compile_scope}), {report.compile_source} in {report.compile_seconds} s "
                f"(cache keys {keys}), {len(report.programs)} program(s) for {', '.join(resolutions)}"
                if report.compile == "aoti" else "eager (not compiled)")
    lines.append(f"`{settings.model_id}` ({report.family} family) on {report.device}, {report.dtype}, attention "
                 f"`{report.attention}`, step cache `{report.step_cache}`, quantization `{report.quantization}`, "
                 f"{compiled}.")
    if report.recipe != "standard":
        lines.append(f"Recipe `{report.recipe}`: {report.recipe_reason}.")
    if report.cuda_graphs == "on":
        kept = [check["shape"] for check in report.graphs.values() if check["kept"]]
        lines.append(f"CUDA graphs: replayed at {len(kept)} of {len(report.graphs)} call shape(s)"
                     + (f" ({', '.join(kept)})" if kept else "") + ".")
    lines += lora_lines(report)
    if report.parallel:
        lines.append(parallel.describe(report.parallel))
    if report.zerogpu_size:
        lines.append(f"ZeroGPU size `{report.zerogpu_size}` ({report.zerogpu_size_reason}); memory: "
                     f"{report.memory.get('layout')}.")
    if report.hardware.zerogpu:
        lines.append(f"A default image asks ZeroGPU for {default_request_s} s of GPU ({durations_source}, x{MARGIN}; "
                     f"at most {MAX_TASK_SECONDS} s a request).")
    if report.startup:
        lines.append(f"Start-up: {startup_line(report.startup)}.")
    if report.hub_upload:
        lines.append(f"Compiled programs uploaded: set `{report.hub_upload['pin']}` to download them next time.")
    text = "\n\n".join(lines)
    if report.notes:
        text += "\n\nAs expected on this hardware:\n\n" + "\n".join(f"- {item}" for item in report.notes)
    if report.fallbacks:
        text += "\n\nFell back:\n\n" + "\n".join(f"- fallback: {item}" for item in report.fallbacks)
    return text
