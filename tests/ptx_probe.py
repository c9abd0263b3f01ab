"""Triton's specialisation keys for the update kernel across changing momenta, row strides and
table lengths, as its launcher computes them for Hopper (sm_90) on any machine. Run as a script,
never under TRITON_INTERPRET (the interpreter specialises nothing); prints JSON. Registers, spills
and access widths of every launch: perf/occupancy.py (tests/test_occupancy.py)."""

import json
import sys

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import make_backend
from triton.runtime.jit import create_function_from_signature

from triton_ema.kernels import ema
from triton_ema.triton_backend import BLOCK

TARGET = GPUTarget("cuda", 90, 32)


def specialisation_keys(kernel, args_list, **constexprs):
    binder = create_function_from_signature(kernel.signature, kernel.params, make_backend(TARGET))
    return sorted({repr(binder(*args, BLOCK=BLOCK, CHECK_SKIP=False, MOMENTA_IN_MEMORY=False, FULL=True,
                               ROUND_BY_HAND=False, **constexprs)[1]) for args in args_list})


def main():
    shadow, param = torch.zeros(32), torch.zeros(32, dtype=torch.bfloat16)
    tables = [torch.zeros(n, 3, dtype=torch.int64) for n in (1, 2, 16, 1000)]  # a launch per table: its rows
    report = {
        "update_keys": specialisation_keys(ema._ema_update_kernel, [
            (table, shadow, param, table, (m,), stride) for m in (0.0, 1e-4, 0.5, 1.0) for table in tables
            for stride in (16, 4096, 2**20 + 16)], PROFILES=1),
        "update_keys_2_profiles": specialisation_keys(ema._ema_update_kernel, [
            (table, shadow, param, table, (m, 1 - m), 32) for m in (0.0, 1e-4, 0.5, 1.0) for table in tables],
            PROFILES=2),
        "triton": triton.__version__,
    }
    json.dump(report, sys.stdout)


if __name__ == "__main__":
    main()
