"""Importing the package is light and works on a CPU-only machine."""

import subprocess
import sys


def test_import_loads_neither_triton_nor_dtensor():
    code = ("import sys, triton_ema; from triton_ema import EMAOptimizer, schedules, __version__; "
            "print(sorted(m for m in ('triton', 'torch.distributed.tensor') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "[]"
