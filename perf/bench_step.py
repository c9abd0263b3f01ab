"""A whole training step: AdamW alone against AdamW + EMA (`pytest perf/bench_step.py`);
the host time of the EMA part of a step and its per-step storage check; and a whole
opt.step() over a base optimizer that does nothing against a bare torch._foreach_lerp_."""

import pytest
import torch
from conftest import DEVICE, TINY, cases, run_case

from triton_ema import EMAOptimizer
from triton_ema.bench.measure import WORKLOADS
from triton_ema.bench.providers import _Idle, providers

HOST_TENSORS = 40 if TINY else 1000


@pytest.mark.parametrize("provider, workload, dtype", cases("step"))
def bench_step(benchmark, provider, workload, dtype):
    run_case(benchmark, "step", provider, workload, dtype)


def _tiny_params():
    """Many 16-element tensors: what is timed is the host's part, not the device's work."""
    return [torch.nn.Parameter(torch.zeros(16, device=DEVICE)) for _ in range(HOST_TENSORS)]


def bench_storage_check(benchmark):
    opt = EMAOptimizer(torch.optim.SGD(_tiny_params(), lr=0.0), momentum=1e-3)
    benchmark.extra_info.update(job="storage check", tensors=HOST_TENSORS)
    benchmark(opt.core.store.refresh)


def bench_host_step(benchmark):
    # Not synchronised: on a GPU, the host time a step spends on the EMA (schedule, checks, launches);
    # on a CPU the foreach work is host work too (bench_host_bare_lerp times it alone).
    opt = EMAOptimizer(_Idle(_tiny_params()), momentum=1e-3)
    benchmark.extra_info.update(job="host step", tensors=HOST_TENSORS)
    benchmark(opt.step)


def bench_host_step_with_ema_module(benchmark):
    # An EMA module kept on the shadows (a target network) adds no work per averaged tensor to a step.
    model = torch.nn.ParameterList(_tiny_params())
    opt = EMAOptimizer(_Idle(model.parameters()), momentum=1e-3, model=model)
    opt.ema_module()
    benchmark.extra_info.update(job="host step, ema_module", tensors=HOST_TENSORS)
    benchmark(opt.step)


def bench_host_bare_lerp(benchmark):
    # The same tensors' bare torch._foreach_lerp_: on a CPU, host step minus this is the EMA's own host time.
    params = [p.detach() for p in _tiny_params()]
    shadows = [p.clone() for p in params]
    benchmark.extra_info.update(job="host bare lerp", tensors=HOST_TENSORS)
    benchmark(torch._foreach_lerp_, shadows, params, 1e-3)


PARITY = [p for p in providers() if p.name in ("triton-ema[torch]", "foreach_lerp")]


@pytest.mark.parametrize("workload", ["tiny-many"] if TINY else ["2000x4096", "150x300000"])
@pytest.mark.parametrize("provider", PARITY, ids=[p.name for p in PARITY])
def bench_parity(benchmark, provider, workload):
    run_case(benchmark, "parity", provider, WORKLOADS[workload], "fp32")
