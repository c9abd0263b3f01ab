"""Momentum schedules evaluated on the device (``on_device``): float64 references, no host sync.

The references below are the schedules' formulas written out in float64 with ``math``; a
schedule and its reference are drawn together, combinators nesting any of them."""

import dataclasses
import math

import pytest
import torch
from conftest import DEVICE, assert_ulps
from hypothesis import given
from hypothesis import strategies as st

from triton_ema import schedules
from triton_ema.schedules import (
    Constant,
    CopyUntil,
    Cosine,
    HoldUntil,
    Max,
    Min,
    MomentumAnnealing,
    Power,
    PowerFunction,
    Ramp,
    Recount,
    Warmup,
    device_schedule,
)

# Every step up to past the largest boundary drawn below (warm_up, total_steps, start steps), then large ones.
STEPS = [*range(2100), 10**4 + 7, 10**5, 10**6 + 1, 10**7 - 1, 10**7, 10**7 + 1, 2**31 + 5, 2**40]
META_STEP = torch.zeros((), dtype=torch.int64, device="meta")


def ramp(t, w):
    return math.inf if w == 0 else (1 + t) / (w + t)


unit = st.floats(min_value=1e-6, max_value=1.0)
unit_or_zero = st.floats(min_value=0.0, max_value=1.0)


@st.composite
def power(draw):
    decay = draw(st.floats(0.0, 0.99999))
    md, ig, p = draw(st.floats(0.0, decay)), draw(st.floats(0.1, 100.0)), draw(st.floats(0.1, 2.0))
    return Power(decay, ig, p, md), lambda t: 1 - min(max(1 - (1 + t / ig) ** -p, md), decay)


@st.composite
def tf_ramp(draw):
    decay = draw(unit_or_zero)
    md = draw(st.floats(0.0, decay))
    return Ramp(decay, md), lambda t: 1 - max(min((1 + t) / (10 + t), decay), md)


def cosine(m, e, k, w):
    return Cosine(m, e, k, w), lambda t: min(e - (e - m) * (math.cos(math.pi * min(t, k) / k) + 1) / 2, ramp(t, w))


def power_function(g):
    return PowerFunction(gamma=g), lambda t: 1 - (t / (t + 1)) ** (g + 1)


leaves = st.one_of(
    unit.map(lambda m: (Constant(m), lambda t: m)),
    st.builds(lambda m, w: (Warmup(m, w), lambda t: min(m, ramp(t, w))), unit, st.integers(0, 300)),
    st.builds(cosine, unit_or_zero, unit_or_zero, st.integers(1, 2000), st.integers(0, 300)),
    power(),
    tf_ramp(),
    st.builds(lambda m, g: (MomentumAnnealing(m, g), lambda t: max(m, g / (g + t))),
              unit, st.integers(1, 500) | st.floats(0.5, 500.0)),
    st.floats(0.05, 50.0).map(power_function),
)


def copy_until(child, s):
    return CopyUntil(child[0], s), lambda t: 1.0 if t <= s else child[1](t - s)


def hold_until(child, s):
    return HoldUntil(child[0], s), lambda t: 0.0 if t < s else child[1](t)


def recount(child, every, start):
    return Recount(child[0], every, start), lambda t: child[1](t // every + start)


def extreme(make, pick):
    return lambda a, b: (make(a[0], b[0]), lambda t: pick(a[1](t), b[1](t)))


def combined(children):
    return st.one_of(
        st.builds(copy_until, children, st.integers(0, 1000)),
        st.builds(hold_until, children, st.integers(0, 1000)),
        st.builds(recount, children, st.integers(1, 7), st.integers(0, 1000)),
        st.builds(extreme(Max, max), children, children),
        st.builds(extreme(Min, min), children, children),
    )


with_references = st.recursive(leaves, combined, max_leaves=4)

# Each built-in schedule at least once, with settings whose boundaries lie among STEPS.
EXAMPLES = [
    Constant(0.3), Warmup(0.5, 100), Warmup(0.3, 0), Cosine(0.004, 0.0, 1000), Cosine(0.01, 0.05, 400, warm_up=50),
    Power(), Power(0.999, 2.0, 0.75, 0.5), Ramp(), Ramp(0.99, 0.5), MomentumAnnealing(1e-3, 100),
    PowerFunction(sigma_rel=0.05), PowerFunction(gamma=6.94), CopyUntil(Power(0.999, power=0.75), 100),
    HoldUntil(CopyUntil(Constant(0.1), 6), 6), Recount(Ramp(0.999), 4, 1),
    Max(Cosine(0.02, 0.005, 1000), Ramp()), Min(Constant(0.1), Warmup(0.5, 10)),
]
# One tree holding every kind: what a captured step would evaluate.
EVERY_KIND = Max(
    Min(CopyUntil(Cosine(0.02, 0.0, 1500, warm_up=20), 10), HoldUntil(Recount(Power(0.999), 3, 1), 40)),
    Min(Max(Warmup(0.3, 50), Ramp(0.99)), Max(MomentumAnnealing(1e-3, 30), Max(PowerFunction(gamma=7.0), Constant(1e-4)))),
)


def on_device(schedule, steps):
    return schedule.on_device(torch.tensor(steps, dtype=torch.int64, device=DEVICE))


def float64(values):
    return torch.tensor(values, dtype=torch.float64)


def test_every_built_in_schedule_has_a_device_evaluator():
    built_in = [getattr(schedules, n) for n in schedules.__all__ if dataclasses.is_dataclass(getattr(schedules, n))]
    assert len(built_in) == 12
    assert {type(s) for s in EXAMPLES} == set(built_in)
    assert all(callable(getattr(cls, "on_device", None)) for cls in built_in)


@given(with_references)
def test_on_device_matches_the_float64_formula(schedule_and_reference):
    schedule, reference = schedule_and_reference
    got = on_device(schedule, STEPS)
    assert got.dtype == torch.float32 and got.shape == (len(STEPS),) and got.device == DEVICE
    assert_ulps(got, float64([reference(t) for t in STEPS]))
    assert_ulps(got, float64([schedule(t) for t in STEPS]), ulps=1)  # float32(schedule(t)), rounded once


@pytest.mark.parametrize("schedule", EXAMPLES + [EVERY_KIND], ids=repr)
def test_a_step_counter_gives_a_0_dim_float32_momentum(schedule):
    for t in (0, 1, 99, 100, 101, 10**7):
        got = schedule.on_device(torch.tensor(t, device=DEVICE))
        assert got.shape == () and got.dtype == torch.float32 and got.device == DEVICE
        assert_ulps(got, float64(schedule(t)), ulps=1)


@pytest.mark.parametrize("schedule", EXAMPLES + [EVERY_KIND], ids=repr)
def test_no_host_sync_a_meta_step_holds_no_value(schedule):
    # On "meta" tensors there is no data: .item(), bool() of a tensor or a copy to the host raise.
    got = schedule.on_device(META_STEP)
    assert got.device.type == "meta" and got.shape == () and got.dtype == torch.float32
    assert device_schedule(schedule) == schedule.on_device


def test_one_tree_of_every_kind_under_torch_compile_fullgraph():
    # fullgraph=True fails on any graph break (a Python branch on a tensor value, .item(), a host copy).
    compiled = torch.compile(EVERY_KIND.on_device, fullgraph=True, backend="eager")
    steps = [0, 9, 10, 11, 39, 40, 41, 120, 1500, 1501, 10**7]
    got = torch.stack([compiled(torch.tensor(t, device=DEVICE)) for t in steps])
    assert torch.equal(got, on_device(EVERY_KIND, steps))
    assert_ulps(got, float64([EVERY_KIND(t) for t in steps]), ulps=1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs and the CUDA sync check need a GPU")
def test_a_captured_cuda_graph_advances_the_schedule_at_every_replay():
    step = torch.zeros((), dtype=torch.int64, device="cuda")
    momenta = torch.full((60,), -1.0, device="cuda")
    torch.cuda.set_sync_debug_mode("error")  # a host sync or a blocking host copy raises
    try:
        EVERY_KIND.on_device(step)  # eager, and the warm-up before capture
    finally:
        torch.cuda.set_sync_debug_mode("default")  # torch.cuda.graph() itself synchronizes before capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # a sync or a host read while capturing raises too
        momenta.index_copy_(0, step.view(1), EVERY_KIND.on_device(step).view(1))
        step.add_(1)
    for _ in range(60):
        graph.replay()
    assert step.item() == 60
    assert_ulps(momenta, float64([EVERY_KIND(t) for t in range(60)]), ulps=1)


def test_a_step_tensor_must_be_int64():
    with pytest.raises(TypeError, match="Ramp.on_device\\(\\) takes an int64 step tensor, got torch.float32"):
        Ramp().on_device(torch.tensor(3.0))


class Halving:
    """A user schedule with a device evaluator: momentum 0.5 ** (t + 1)."""

    def __call__(self, t):
        return 0.5 ** (t + 1)

    def on_device(self, t):
        return torch.pow(0.5, t.double() + 1).float()


class ItemOnDevice(Halving):
    def on_device(self, t):
        return torch.tensor(self(t.item()), device=t.device)


class Float64OnDevice(Halving):
    def on_device(self, t):
        return torch.pow(0.5, t.double() + 1)


def test_a_user_object_with_on_device_runs_on_the_device_also_inside_combinators():
    evaluate = device_schedule(CopyUntil(Halving(), 3))
    assert_ulps(evaluate(torch.arange(10, device=DEVICE)), float64([1.0] * 4 + [0.5 ** (t - 2) for t in range(4, 10)]))


@pytest.mark.parametrize("schedule, match", [
    (lambda t: 0.1, "momentum schedule <lambda> cannot run on the device \\(capturable=True\\): it has no on_device"),
    (Max(Ramp(), CopyUntil(math.exp, 2)), "momentum schedule exp \\(Max.second.schedule\\) cannot run on the device"),
    (ItemOnDevice(), "ItemOnDevice: on_device\\(t\\) must use tensor ops only .*meta"),
    (Float64OnDevice(), "Float64OnDevice: on_device\\(t\\) must return a float32 tensor .* a torch.float64 tensor"),
])
def test_a_schedule_that_cannot_run_on_the_device_is_named(schedule, match):
    with pytest.raises(TypeError, match=match):
        device_schedule(schedule)
