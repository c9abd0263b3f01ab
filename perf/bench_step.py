"""A whole training step: AdamW alone against AdamW + EMA (`pytest perf/bench_step.py`)."""

import pytest
from conftest import cases, run_case


@pytest.mark.parametrize("provider, workload, dtype", cases("step"))
def bench_step(benchmark, provider, workload, dtype):
    run_case(benchmark, "step", provider, workload, dtype)
