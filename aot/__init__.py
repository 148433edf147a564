"""The machinery behind `optimization.py`, one job per file:

- `families/`: what differs between model families (one entry each);
- `model.py`: loading a pipeline (or building a tiny one) and calling it the family's way;
- `decisions.py`: attention, quantization and compilation chosen from the hardware;
- `memory.py`: whether the pipeline fits the GPU, and the low-VRAM layout when it does not;
- `quantize.py`: fp8 (torchao) and the template's int8/int4 weight-only layers;
- `programs.py`: capture, export, AOT-compile, install, and the shape dispatcher;
- `cache.py`: the keyed artifact cache and the pinned Hub download;
- `report.py`: what was done and what fell back, for the UI and `/status`.
"""
