"""The machinery behind `optimization.py`, one job per file:

- `family.py`: the types of a family entry (`Family`, `Guidance`, `Text`, `Defaults`, `TwoStage`, `RealSize`);
- `families/`: what differs between model families (one entry each, or a mode built from another's: Kontext from
  FLUX.1's, Qwen-Image-Edit from Qwen-Image's; an editing family declares its input images, a video family its
  frames);
- `images.py`: an input image checked and normalised (untrusted: size, format, mode, orientation, frames);
- `video.py`: a video family's frames, and its sound track if it has one, encoded as an MP4 (PyAV);
- `model.py`: loading a pipeline (or building a tiny one) and calling it the family's way;
- `decisions.py`: attention, quantization and compilation chosen from the hardware;
- `memory.py`: whether the pipeline fits the GPU, and the low-VRAM layout when it does not;
- `quantize.py`: fp8 (torchao), the template's int8/int4 weight-only layers, and pre-quantized checkpoints;
- `streaming.py`: streamed blocks' weights copied through fixed rings of GPU buffers (low-VRAM mode);
- `programs.py`: capture, export, AOT-compile, install, and the shape dispatcher;
- `graphs.py`: CUDA graph replay of the compiled transformer, one graph per call shape, checked before it is kept;
- `cache.py`: the keyed artifact cache;
- `hub.py`: the pinned Hub download and the upload, regional programs in spaces' per-block layout;
- `step_cache.py`: STEP_CACHE, diffusers' cache hooks around the block programs;
- `lora.py`: LORAS fused before quantizing and compiling, LORA_CHOICES switched per request in place;
- `prompts.py`: PROMPT_CACHE, repeated prompts' embeddings and the text encoders' seconds;
- `parallel.py`: several ranks, one image split across them (context parallelism);
- `panel.py`: the page's title, its status banner's one line and the details under it, from the settings and report;
- `report.py`: what was done and what fell back, for the UI and `/status`.
"""
