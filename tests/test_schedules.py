import math

import pytest

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
    Ramp,
    Recount,
    Warmup,
    as_schedule,
    momentum_at,
)


def test_constant():
    assert [Constant(0.25)(t) for t in (0, 1, 10**9)] == [0.25] * 3


@pytest.mark.parametrize("t, expected", [(0, 1 / 100), (1, 2 / 101), (99, 100 / 199), (100, 0.5)])
def test_warmup_matches_mmcv(t, expected):
    # mmcv EMAHook: min(momentum, (1 + t) / (warm_up + t)); momentum 0.5 caps from t = 100 on.
    assert Warmup(0.5, warm_up=100)(t) == min(0.5, expected)


def test_warmup_small_momentum_caps_immediately():
    s = Warmup(2e-4, warm_up=100)
    assert [s(t) for t in (0, 1, 99, 100)] == [2e-4] * 4


def test_warmup_zero_means_no_ramp():
    assert Warmup(0.3, warm_up=0)(0) == 0.3


@pytest.mark.parametrize("t, expected", [(0, 0.004), (500, 0.002), (1000, 0.0), (5000, 0.0)])
def test_cosine_matches_mmpretrain(t, expected):
    assert Cosine(0.004, 0.0, total_steps=1000)(t) == pytest.approx(expected, abs=1e-18)


def test_cosine_formula_with_end_momentum():
    s = Cosine(momentum=0.01, end_momentum=0.05, total_steps=400)
    for t in (0, 1, 123, 400, 401):
        k = min(t, 400)
        assert s(t) == 0.05 - (0.05 - 0.01) * (math.cos(math.pi * k / 400) + 1) / 2


def test_cosine_with_warm_up_takes_the_minimum():
    s = Cosine(0.1, 0.0, total_steps=1000, warm_up=50)
    assert s(0) == 1 / 50
    assert s(500) == min(0.05, 501 / 550)


def test_cosine_positional_total_steps():
    assert Cosine(0.004, 0.0, 1000) == Cosine(total_steps=1000)


@pytest.mark.parametrize("t", [0, 1, 10, 1000, 10**6])
def test_power_matches_formula(t):
    s = Power(decay=0.9999, inv_gamma=1.0, power=2 / 3, min_decay=0.0)
    decay_t = min(max(1 - (1 + t) ** (-2 / 3), 0.0), 0.9999)
    assert s(t) == 1 - decay_t


def test_power_first_step_copies_and_later_steps_cap_at_decay():
    s = Power(decay=0.999, power=3 / 4)
    assert s(0) == 1.0
    assert s(10**9) == pytest.approx(1e-3)


def test_user_callable_is_accepted_and_checked():
    sched = as_schedule(lambda t: 0.5 / (t + 1), None)
    assert momentum_at(sched, 3) == 0.125
    with pytest.raises(ValueError, match="step 7"):
        momentum_at(lambda t: 1.5, 7)
    with pytest.raises(ValueError, match="nan"):
        momentum_at(lambda t: float("nan"), 2)
    with pytest.raises(TypeError, match="step 0"):
        momentum_at(lambda t: "fast", 0)


def test_schedules_are_pure_and_comparable():
    a, b = Cosine(0.004, 0.0, 100, warm_up=10), Cosine(0.004, 0.0, 100, warm_up=10)
    assert a == b and [a(t) for t in range(200)] == [b(t) for t in range(200)]
    assert schedules.Constant is Constant


@pytest.mark.parametrize("make, match", [
    (lambda: Constant(0.0), "momentum must lie in \\(0, 1\\]"),
    (lambda: Constant(1.5), "momentum"),
    (lambda: Warmup(float("nan")), "momentum"),
    (lambda: Warmup(0.1, warm_up=-1), "warm_up"),
    (lambda: Warmup(0.1, warm_up=2.5), "warm_up"),
    (lambda: Cosine(0.004), "total_steps"),
    (lambda: Cosine(0.004, 0.0, 0), "total_steps"),
    (lambda: Cosine(0.004, -0.1, 10), "end_momentum"),
    (lambda: Power(decay=1.0), "decay must be < 1"),
    (lambda: Power(decay=0.9, min_decay=0.95), "min_decay"),
    (lambda: Power(inv_gamma=0), "inv_gamma"),
    (lambda: Power(power=-1), "power"),
])
def test_bad_schedule_settings(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize("momentum, decay, error, match", [
    (0.1, 0.9, ValueError, "not both"),
    (None, None, ValueError, "give momentum"),
    (None, 1.0, ValueError, "decay must lie in"),
    (None, "0.9", TypeError, "decay must be a float"),
    ("0.1", None, TypeError, "momentum must be a float or a callable"),
    (0.0, None, ValueError, "momentum must lie"),
])
def test_bad_momentum_or_decay(momentum, decay, error, match):
    with pytest.raises(error, match=match):
        as_schedule(momentum, decay)


def test_decay_is_one_minus_momentum():
    assert as_schedule(None, 0.75)(5) == 0.25


# --- warm-ups that warm up, start delays and combinators: exact values from the formulas ---

def test_warmup_is_a_no_op_when_momentum_is_at_most_one_over_warm_up():
    for m, w in [(0.004, 100), (0.02, 10), (0.01, 100), (0.3, 1), (0.3, 0)]:
        assert [Warmup(m, w)(t) for t in (0, 1, w, 10**6)] == [Constant(m)(t) for t in (0, 1, w, 10**6)]
    assert Warmup(0.011, 100)(0) == 0.01  # just above 1 / warm_up the ramp bites at t = 0


@pytest.mark.parametrize("t", [0, 1, 2, 889, 890, 10**7])
def test_ramp_is_tensorflows(t):
    # TF ExponentialMovingAverage(num_updates=n): decay = min(decay, (1 + n) / (10 + n)); capped at 0.99 from n = 890.
    assert Ramp(0.99)(t) == 1 - min(0.99, (1 + t) / (10 + t))
    assert Ramp()(t) == 1 - (1 + t) / (10 + t)
    assert Ramp(0.99, min_decay=0.5)(t) == 1 - max(0.5, min(0.99, (1 + t) / (10 + t)))


def test_ramp_values():
    assert Ramp()(0) == 1 - 1 / 10 and Ramp()(1) == 1 - 2 / 11
    assert Ramp(0.99)(889) > 1 - 0.99 and Ramp(0.99)(890) == 1 - 0.99  # (1 + 890) / (10 + 890) = 0.99
    assert Ramp(0.0)(5) == 1.0  # decay 0: every update copies


@pytest.mark.parametrize("t", [0, 1, 99, 100, 101, 10**6])
def test_momentum_annealing_is_mmengines(t):
    assert MomentumAnnealing(0.001, gamma=100)(t) == max(0.001, 100 / (100 + t))
    assert MomentumAnnealing(0.001, gamma=100)(0) == 1.0
    assert MomentumAnnealing(0.001, gamma=100)(99_900) == 0.001  # 100 / 100_000 meets the floor
    assert MomentumAnnealing(0.001, gamma=100)(10**6) == 0.001


def test_copy_until_delays_the_schedules_clock():
    s = CopyUntil(Power(decay=0.999, power=3 / 4), 100)
    assert [s(t) for t in (0, 1, 99, 100)] == [1.0] * 4
    for t in (101, 102, 5000):
        assert s(t) == 1 - min(max(1 - (1 + (t - 100)) ** -0.75, 0.0), 0.999)
    first = CopyUntil(Constant(2e-4))
    assert [first(t) for t in (0, 1, 10**6)] == [1.0, 2e-4, 2e-4]


def test_hold_until_keeps_the_ema_then_hands_over():
    s = HoldUntil(CopyUntil(Constant(0.1), 6), 6)
    assert [s(t) for t in (0, 5, 6, 7, 100)] == [0.0, 0.0, 1.0, 0.1, 0.1]


def test_recount_evaluates_another_counter():
    s = Recount(Ramp(0.999), every=4, start=1)  # torch_ema called every 4 steps: num_updates = t // 4 + 1
    assert [s(t) for t in (0, 4, 8, 400)] == [1 - 2 / 11, 1 - 3 / 12, 1 - 4 / 13, 1 - 102 / 111]
    assert Recount(Ramp())(7) == Ramp()(7)


def test_max_and_min_take_the_element_wise_extreme():
    cos, ramp = Cosine(0.02, 0.005, total_steps=1000), Ramp()
    warm = Max(cos, ramp)
    assert warm(0) == 0.9 and warm(1) == 1 - 2 / 11       # the ramp forgets the initial weights fast
    assert warm(440) == max(cos(440), 1 - 441 / 450) == 1 - 441 / 450  # the ramp is still above the cosine
    assert warm(1000) == 1 - 1001 / 1010                   # 1 - (1 + t) / (10 + t) falls below 0.005 after t = 1790
    assert warm(1790) == 1 - 1791 / 1800 and warm(1791) == 0.005 and warm(10**6) == 0.005
    assert [Min(cos, ramp)(t) for t in (0, 1000)] == [0.02, 0.005]


@pytest.mark.parametrize("schedule", [
    Ramp(0.999), MomentumAnnealing(1e-3, 50), CopyUntil(Power(), 100), HoldUntil(Constant(0.5), 3),
    Recount(Ramp(0.9), 2, 1), Max(Cosine(0.01, 0.0, 100), Ramp()), Min(Constant(0.1), Warmup(0.5, 10)),
])
def test_new_schedules_are_frozen_picklable_and_readable(schedule):
    import dataclasses
    import pickle

    clone = pickle.loads(pickle.dumps(schedule))
    assert clone == schedule and [clone(t) for t in range(300)] == [schedule(t) for t in range(300)]
    with pytest.raises(dataclasses.FrozenInstanceError):
        schedule.step = 3
    assert repr(schedule).startswith(type(schedule).__name__ + "(") and "object at" not in repr(schedule)


@pytest.mark.parametrize("make, error, match", [
    (lambda: Ramp(1.5), ValueError, "decay must lie in \\[0, 1\\], got 1.5"),
    (lambda: Ramp(0.9, min_decay=0.95), ValueError, "min_decay \\(0.95\\) must not exceed decay \\(0.9\\)"),
    (lambda: MomentumAnnealing(1e-3, gamma=0), ValueError, "gamma must be a finite number > 0, got 0"),
    (lambda: MomentumAnnealing(0.0), ValueError, "momentum must lie in \\(0, 1\\]"),
    (lambda: CopyUntil(0.1, 5), TypeError, "schedule must be a schedule .* got float"),
    (lambda: CopyUntil(Constant(0.1), -1), ValueError, "step must be a non-negative integer, got -1"),
    (lambda: HoldUntil(Constant(0.1), 2.5), ValueError, "step must be a non-negative integer, got 2.5"),
    (lambda: Recount(Ramp(), every=0), ValueError, "every must be an integer >= 1, got 0"),
    (lambda: Recount(Ramp(), start=-1), ValueError, "start must be a non-negative integer, got -1"),
    (lambda: Max(Ramp(), "fast"), TypeError, "second must be a schedule"),
])
def test_bad_combinator_settings(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_every_schedule_is_evaluated_once_at_construction_and_a_bad_one_fails_there():
    import torch

    from triton_ema import EMAOptimizer, attach
    from triton_ema.hooks import attached_ema

    calls = []

    def recorded(t):
        calls.append(t)
        return 0.5

    p = torch.nn.Parameter(torch.ones(3))
    opt = EMAOptimizer(torch.optim.SGD([p], lr=1.0), momentum={"a": recorded, "b": Constant(0.1)})
    assert calls == [0]  # checked at t = 0 when built; the first step evaluates it again
    p.grad = torch.ones(3)
    opt.step()
    assert calls == [0, 0]

    def fails_from(start):
        def schedule(t):
            if t >= start:
                raise ZeroDivisionError("no momentum here")
            return 0.1
        return schedule

    for make in (EMAOptimizer, attach):
        base = torch.optim.SGD([p], lr=1.0)
        with pytest.raises(ZeroDivisionError, match="no momentum here"):  # the schedule's own error, when built
            make(base, fails_from(0))
        assert attached_ema(base) is None  # nothing was attached
    late = EMAOptimizer(torch.optim.SGD([p], lr=1.0), fails_from(1))  # fine at t = 0: fails at its step
    late.step()
    with pytest.raises(ZeroDivisionError):
        late.step()
    assert late.num_steps == 1
