import math

import pytest

from triton_ema import schedules
from triton_ema.schedules import Constant, Cosine, Power, Warmup, as_schedule, momentum_at


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
