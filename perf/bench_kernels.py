"""EMA update, the update of K profiles at once, and swap (in + out) of every provider:
`pytest perf/bench_kernels.py`."""

import pytest
from conftest import NAMES, TINY, cases, run_case

from triton_ema.bench.measure import PROFILE_JOBS

# Tiny runs take the K-profile update on one workload: in Triton's CPU interpreter a call takes a second.
PROFILE_NAMES = NAMES[:1] if TINY else NAMES


@pytest.mark.parametrize("provider, workload, dtype", cases("update"))
def bench_update(benchmark, provider, workload, dtype):
    run_case(benchmark, "update", provider, workload, dtype)


@pytest.mark.parametrize("job, provider, workload, dtype", [
    pytest.param(job, *case.values, marks=case.marks, id=f"{job}-{case.id}")
    for job in PROFILE_JOBS for case in cases(job, PROFILE_NAMES)])
def bench_update_profiles(benchmark, job, provider, workload, dtype):
    run_case(benchmark, job, provider, workload, dtype)


@pytest.mark.parametrize("provider, workload, dtype", cases("swap"))
def bench_swap(benchmark, provider, workload, dtype):
    run_case(benchmark, "swap", provider, workload, dtype)
