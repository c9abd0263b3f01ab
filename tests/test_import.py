"""Importing the package is light and works on a CPU-only machine."""

import subprocess
import sys

HEAVY = ("triton", "torch.distributed.tensor", "lightning", "transformers", "accelerate", "mmengine", "deepspeed")


def test_import_loads_neither_triton_nor_dtensor_nor_a_framework():
    code = ("import sys, triton_ema, triton_ema.integrations; from triton_ema import EMAOptimizer, attach, schedules, "
            f"__version__; print(sorted(m for m in {HEAVY!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "[]"
