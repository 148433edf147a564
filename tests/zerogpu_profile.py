"""Runs a script (app.py) under spaces' ZeroGPU mode as if the machine's driver named another card: spaces picks
its configuration (`spaces/zero/configs.json`) by the model name in `/proc/driver/nvidia/gpus/*/information`,
and on a machine whose driver names none it knows (a CPU machine, the H100) it takes its first entry, the H200
slice. This makes it take the RTX Pro 6000 Blackwell entry, as on ZeroGPU today.

    python tests/zerogpu_profile.py [--card NAME] [--fail-fp8-rows] app.py

The driver's answer is replaced before spaces is imported: `spaces.zero.config` is loaded first from its own
file, with `_read_gpu_information` answering the card's name; spaces' ZeroGPU modules then import that module,
and the GPU workers they fork inherit it. Nothing else in spaces changes.

`--fail-fp8-rows` makes `torch._scaled_mm` refuse per-row scales as cuBLAS did on an sm_120 card
(pytorch/pytorch#192707), so that the app's fp8 probe meets the failure it must fall back from. Per-tensor
scales still run. Only the Python entry point fails: a compiled program calls the kernel directly.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import runpy
import sys

BLACKWELL = "NVIDIA RTX PRO 6000 Blackwell Server Edition"
ROW_SCALES_REFUSED = "CUBLAS_STATUS_NOT_SUPPORTED when calling cublasLtMatmul with per-row scales (forced by the test)"


def use_card(card: str) -> None:
    spec = importlib.util.find_spec("spaces")
    path = spec.submodule_search_locations[0] + "/zero/config.py"
    config_spec = importlib.util.spec_from_file_location("spaces.zero.config", path)
    config = importlib.util.module_from_spec(config_spec)
    config_spec.loader.exec_module(config)
    config._read_gpu_information = lambda: f"Model: \t {card}\n"
    sys.modules["spaces.zero.config"] = config


def refuse_row_scales() -> None:
    import torch

    scaled_mm = torch._scaled_mm

    def refusing(a, b, scale_a, scale_b, *args, **kwargs):
        if scale_a.numel() > 1 or scale_b.numel() > 1:
            raise RuntimeError(ROW_SCALES_REFUSED)
        return scaled_mm(a, b, scale_a, scale_b, *args, **kwargs)

    torch._scaled_mm = refusing


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--card", default=BLACKWELL, help="the model name spaces reads from the driver")
    parser.add_argument("--fail-fp8-rows", action="store_true", help="torch._scaled_mm refuses per-row scales")
    parser.add_argument("script")
    args, rest = parser.parse_known_args()
    use_card(args.card)
    if args.fail_fp8_rows:
        refuse_row_scales()
    sys.argv = [args.script, *rest]
    sys.path.insert(0, os.path.dirname(os.path.abspath(args.script)))  # as `python app.py` would
    runpy.run_path(args.script, run_name="__main__")


if __name__ == "__main__":
    main()
