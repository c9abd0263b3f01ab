"""Shared set-up of the benchmark suites.

TRITON_EMA_BENCH=tiny runs every case on tiny stand-in workloads (a smoke
test of the suites); by default the workloads are those of the bench
command: 2000x4096 and gpt2-small, and 1b on a GPU.
"""

import os

import pytest
import torch

from triton_ema.bench.measure import WORKLOADS, job_bytes
from triton_ema.bench.providers import DTYPES, make_job, providers

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TINY = os.environ.get("TRITON_EMA_BENCH") == "tiny"
NAMES = ["tiny-many", "tiny-gpt2"] if TINY else [
    w for w in ("2000x4096", "gpt2-small", "1b") if DEVICE.type == "cuda" or not WORKLOADS[w].gpu_only]


def cases(job, names=None):
    """(provider, workload, dtype) parameters for ``job`` on the workloads ``names`` (default:
    ``NAMES``); absent peers are skipped with their reason."""
    out = []
    for provider in providers():
        if job not in provider.jobs:
            continue
        marks = [pytest.mark.skip(reason=provider.absent)] if provider.absent else []
        for name in names or NAMES:
            for dtype in DTYPES:
                out.append(pytest.param(provider, WORKLOADS[name], dtype, marks=marks,
                                        id=f"{name}-{dtype}-{provider.name}"))
    return out


def run_case(benchmark, job, provider, workload, dtype_name):
    param_dtype, shadow_dtype = DTYPES[dtype_name]
    fn = make_job(provider, job, workload, dtype_name, DEVICE)

    def call():
        fn()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()

    benchmark.extra_info.update(job=job, workload=workload.name, numel=workload.numel, dtype=dtype_name,
                                bytes_per_element=job_bytes(job, param_dtype.itemsize, shadow_dtype.itemsize))
    benchmark.pedantic(call, rounds=1 if TINY else 10, warmup_rounds=0 if TINY else 1)  # tiny: the times mean nothing
    nbytes = benchmark.extra_info["bytes_per_element"]
    if nbytes:
        benchmark.extra_info["gbps"] = nbytes * workload.numel / benchmark.stats.stats.median / 1e9
