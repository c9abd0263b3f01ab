"""The EMA core (triton_ema.ema.EMA) driven without a torch optimizer: over a plain list
of param groups, or any object holding one, as a front end other than EMAOptimizer drives it."""

import pytest
import torch
from conftest import DEVICE, assert_ulps

from triton_ema.checkpoint import check_ema, ema_state
from triton_ema.ema import EMA
from triton_ema.schedules import Warmup, momentum_at
from triton_ema.swap import SwapContext


def tensors(*shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g).to(DEVICE) for shape in shapes]


def move(params, step):
    """What a step of some engine does to its tensors: any change, in place."""
    with torch.no_grad():
        for j, p in enumerate(params):
            p.add_(torch.linspace(-1, 1, p.numel(), device=p.device).view_as(p) * (step + 1 + j) / 7)


def step(core, params, t):
    update = core.before_step()
    move(params, t)
    core.after_step(update)


def ema64(core, profile=0):
    return [core.store.ema(i, profile).double().clone() for i in range(len(core.names))]


def shadows(core, profile=0):
    return [core.store.ema(i, profile) for i in range(len(core.names))]


def test_a_list_of_groups_is_averaged_and_groups_added_to_it_are_adopted():
    params = tensors((5,), (3, 4))
    groups = [{"params": params}]
    schedule = Warmup(0.4)
    core = EMA(groups, schedule, interval=1)
    assert core.names == ["param_groups[0]['params'][0]", "param_groups[0]['params'][1]"]
    for t in range(3):
        before = ema64(core)
        step(core, params, t)
        m = momentum_at(schedule, t)
        for s, s0, p in zip(shadows(core), before, params, strict=True):
            assert_ulps(s, s0 + m * (p.double() - s0), scale=torch.maximum(s0.abs(), p.double().abs()))
    assert core.num_steps == 3

    added = tensors((7,), seed=1)
    groups.append({"params": added})  # noticed at the next step, its shadow a copy of it
    before = ema64(core)
    update = core.before_step()
    assert len(core.names) == 3 and torch.equal(core.store.ema(2), added[0])
    before.append(added[0].double().clone())
    move(params + added, 3)
    core.after_step(update)
    m = momentum_at(schedule, 3)
    for s, s0, p in zip(shadows(core), before, params + added, strict=True):
        assert_ulps(s, s0 + m * (p.double() - s0), scale=torch.maximum(s0.abs(), p.double().abs()))


def test_the_source_is_read_anew_at_every_step():
    class Engine:  # holds its groups as an optimizer does, and replaces the list (as load_state_dict does)
        def __init__(self, params):
            self.param_groups = [{"params": params}]

    params = tensors((4,), (2, 2))
    engine = Engine(params)
    core = EMA(engine, 0.5)
    engine.param_groups = [{"params": params[:1]}, {"params": params[1:]}]  # a new list, the same tensors
    step(core, params, 0)
    assert [t is p for t, p in zip(core.store.tensors, params)] == [True, True]
    more = tensors((3,), seed=2)
    engine.param_groups = engine.param_groups + [{"params": more}]
    step(core, params + more, 1)
    assert core.names[2] == "param_groups[2]['params'][0]" and core.store.tensors[2] is more[0]


def test_a_swap_state_out_and_a_checked_load_in():
    params = tensors((6,), (2, 3))
    core = EMA([{"params": params}], 0.25)
    for t in range(2):
        step(core, params, t)
    training = [p.clone() for p in params]
    shadows = [core.store.ema(i).clone() for i in range(2)]
    with SwapContext(core, 0) as swapped:
        assert swapped is core and core.swapped
        assert all(torch.equal(p, s) for p, s in zip(params, shadows))
    assert all(torch.equal(p, t) for p, t in zip(params, training))

    state = ema_state(core)
    assert state["step"] == 2 and set(state["shadow"]) == {0, 1}
    fresh_params = tensors((6,), (2, 3), seed=3)
    fresh = EMA([{"params": fresh_params}], 0.25)
    fresh.load(*check_ema(fresh, state))
    assert fresh.num_steps == 2
    assert all(torch.equal(fresh.store.ema(i), shadows[i]) for i in range(2))


def test_a_failed_after_on_entry_undoes_the_swap():
    params = tensors((5,), (2, 2))
    core = EMA([{"params": params}], 0.5)
    step(core, params, 0)
    training = [p.clone() for p in params]
    calls = []

    def after():  # a front end's refresh of the copies its model computes with; fails the first time
        calls.append(core.swapped)
        if len(calls) == 1:
            raise OSError("refresh failed")

    with pytest.raises(OSError, match="refresh failed"), SwapContext(core, 0, after=after):
        calls.append("block")
    assert calls == [True, False] and not core.swapped  # run again after the swap out; the block never ran
    assert all(torch.equal(p, t) for p, t in zip(params, training))
