"""A whole training step: AdamW alone against AdamW + EMA (`pytest perf/bench_step.py`),
and the host-side check every step makes that no averaged tensor's storage moved."""

import pytest
import torch
from conftest import DEVICE, TINY, cases, run_case

from triton_ema import EMAOptimizer


@pytest.mark.parametrize("provider, workload, dtype", cases("step"))
def bench_step(benchmark, provider, workload, dtype):
    run_case(benchmark, "step", provider, workload, dtype)


def bench_storage_check(benchmark):
    n = 40 if TINY else 1000
    params = [torch.nn.Parameter(torch.zeros(16, device=DEVICE)) for _ in range(n)]
    opt = EMAOptimizer(torch.optim.SGD(params, lr=0.0), momentum=1e-3)
    benchmark.extra_info.update(job="storage check", tensors=n)
    benchmark(opt._store.refresh)
