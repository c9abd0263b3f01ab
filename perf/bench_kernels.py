"""EMA update and swap (in + out) of every provider: `pytest perf/bench_kernels.py`."""

import pytest
from conftest import cases, run_case


@pytest.mark.parametrize("provider, workload, dtype", cases("update"))
def bench_update(benchmark, provider, workload, dtype):
    run_case(benchmark, "update", provider, workload, dtype)


@pytest.mark.parametrize("provider, workload, dtype", cases("swap"))
def bench_swap(benchmark, provider, workload, dtype):
    run_case(benchmark, "swap", provider, workload, dtype)
