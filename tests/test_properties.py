"""Property tests over random shapes, dtype pairs, momenta, intervals and schedules."""

import io

import pytest
import torch
from conftest import BACKENDS, DEVICE, assert_ulps
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, rule
from models import shadows

from triton_ema import EMAOptimizer
from triton_ema.schedules import Constant, Cosine, Power, Warmup

# Random constant momenta above 0.5 are meant here: not a decay passed as momentum.
pytestmark = pytest.mark.filterwarnings("ignore:momentum=.* is the weight of the new parameters:UserWarning")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
unit = st.floats(min_value=1e-4, max_value=1.0)

schedules = st.one_of(
    unit.map(Constant),
    st.builds(Warmup, unit, st.integers(0, 20)),
    st.builds(Cosine, unit, st.floats(0.0, 1.0), st.integers(1, 20), st.integers(0, 5)),
    st.builds(Power, st.floats(0.5, 0.999), st.floats(0.5, 2.0), st.floats(0.5, 1.0)),
)
shapes = st.lists(st.lists(st.integers(0, 9), max_size=3).map(tuple) | st.integers(0, 5000).map(lambda n: (n,)),
                  min_size=1, max_size=4)


@st.composite
def runs(draw):
    return dict(
        shapes=draw(shapes),
        param_dtype=draw(st.sampled_from(DTYPES)),
        shadow_dtype=draw(st.sampled_from([None, *DTYPES])),
        schedule=draw(schedules),
        interval=draw(st.integers(1, 4)),
        steps=draw(st.integers(1, 8)),
        backend=draw(st.sampled_from(BACKENDS)),
        seed=draw(st.integers(0, 2**16)),
    )


def make(run, backend=None):
    g = torch.Generator().manual_seed(run["seed"])
    params = [torch.nn.Parameter(torch.randn(s, generator=g).to(DEVICE, run["param_dtype"])) for s in run["shapes"]]
    opt = EMAOptimizer(torch.optim.SGD(params, lr=0.5), momentum=run["schedule"], interval=run["interval"],
                       shadow_dtype=run["shadow_dtype"], backend=backend or run["backend"])
    return params, opt


def drive(params, opt, steps, seed):
    """Random steps; returns the largest |param| each element took on the way."""
    g = torch.Generator().manual_seed(seed)
    seen = [p.detach().double().abs() for p in params]
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g).to(DEVICE, p.dtype)
        opt.step()
        for m, p in zip(seen, params):
            torch.maximum(m, p.detach().double().abs(), out=m)
    return seen


@given(runs())
def test_every_update_is_an_exact_lerp(run):
    params, opt = make(run)
    g = torch.Generator().manual_seed(1)
    for t in range(run["steps"]):
        before = shadows(opt)
        for p in params:
            p.grad = torch.randn(p.shape, generator=g).to(DEVICE, p.dtype)
        opt.step()
        m = run["schedule"](t) if t % run["interval"] == 0 else 0.0
        for s_old, s_new, p in zip(before, shadows(opt), params):
            p64, s64 = p.detach().double(), s_old.double()
            if m == 0.0:
                assert torch.equal(s_new, s_old)
            else:
                assert_ulps(s_new, s64 + m * (p64 - s64), scale=torch.maximum(s64.abs(), p64.abs()))


@given(runs())
def test_swap_in_and_out_is_bitwise_identity(run):
    params, opt = make(run)
    drive(params, opt, run["steps"], seed=2)
    before, ema = [p.detach().clone() for p in params], shadows(opt)
    with opt.swap_ema():
        assert all(torch.equal(p, s.to(p.dtype)) for p, s in zip(params, ema))
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    assert all(torch.equal(a, b) for a, b in zip(shadows(opt), ema))


@given(runs(), st.integers(0, 8))
def test_resume_at_any_step_continues_bitwise(run, stop):
    stop = min(stop, run["steps"])
    params, opt = make(run)
    drive(params, opt, stop, seed=3)
    buf = io.BytesIO()
    torch.save({"params": [p.detach() for p in params], "opt": opt.state_dict()}, buf)
    drive(params, opt, run["steps"] - stop, seed=4)

    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    fresh, opt2 = make({**run, "seed": run["seed"] + 1})
    with torch.no_grad():
        for p, saved in zip(fresh, ckpt["params"]):
            p.copy_(saved)
    opt2.load_state_dict(ckpt["opt"])
    drive(fresh, opt2, run["steps"] - stop, seed=4)
    assert all(torch.equal(a, b) for a, b in zip(params, fresh))
    assert all(torch.equal(a, b) for a, b in zip(shadows(opt), shadows(opt2)))
    assert opt2.num_steps == opt.num_steps


@pytest.mark.skipif(len(BACKENDS) < 2, reason="triton is not installed")
@given(runs())
def test_triton_and_torch_backends_agree(run):
    (pa, a), (pb, b) = make(run, "triton"), make(run, "torch")
    seen = drive(pa, a, run["steps"], seed=5)
    drive(pb, b, run["steps"], seed=5)
    assert all(torch.equal(x, y) for x, y in zip(pa, pb))
    updates = len(range(0, run["steps"], run["interval"]))
    for x, y, scale in zip(shadows(a), shadows(b), seen):
        # Each update may differ by one ulp of its inputs; differences shrink by (1 - m) at the next.
        assert_ulps(x, y.double(), scale=scale, ulps=max(1, updates))


@given(st.data())
def test_nonfinite_guard_sees_exactly_the_nan_and_inf(data):
    run = data.draw(runs())
    params, opt = make(run)
    bad = data.draw(st.lists(st.tuples(st.integers(0, len(params) - 1), st.integers(0, 2**31),
                                       st.sampled_from([float("nan"), float("inf"), float("-inf")])), max_size=2))
    with torch.no_grad():
        for i, position, value in bad:
            if params[i].numel():
                params[i].view(-1)[position % params[i].numel()] = value
    for bucket in opt.core.store.buckets:
        expected = any(not torch.isfinite(t).all() for t in bucket.tensors)
        assert bucket.backend.nonfinite(bucket).item() == expected


class EMAInUse(RuleBasedStateMachine):
    """Random sequences of steps, swaps, state-dict round trips and replaced storage
    (``p.data = ...`` or swapped tensors; same dtype, or another one): every update
    stays the exact lerp of the stored shadow."""

    @initialize(run=runs(), group=st.sampled_from([16, 1000, None]))
    def start(self, run, group):
        from triton_ema import backends

        self.saved_group = backends.GROUP_NUMEL.get(DEVICE.type)
        if group is not None:  # the torch backend cuts tensors into pieces of this many elements
            backends.GROUP_NUMEL[DEVICE.type] = group
        self.run = {**run, "shadow_dtype": None}  # default shadows: every dtype change keeps the values
        self.params, self.opt = make(self.run)
        self.g = torch.Generator().manual_seed(run["seed"])

    def teardown(self):
        from triton_ema import backends

        if not hasattr(self, "saved_group"):
            return
        if self.saved_group is None:
            backends.GROUP_NUMEL.pop(DEVICE.type, None)
        else:
            backends.GROUP_NUMEL[DEVICE.type] = self.saved_group

    @rule()
    def step(self):
        t, before = self.opt.num_steps, shadows(self.opt)
        for p in self.params:
            p.grad = torch.randn(p.shape, generator=self.g).to(DEVICE, p.dtype)
        self.opt.step()
        m = self.run["schedule"](t) if t % self.run["interval"] == 0 else 0.0
        for s_old, s_new, p in zip(before, shadows(self.opt), self.params):
            p64, s64 = p.detach().double(), s_old.double()
            if m == 0.0:
                assert torch.equal(s_new, s_old)
            else:
                assert_ulps(s_new, s64 + m * (p64 - s64), scale=torch.maximum(s64.abs(), p64.abs()))

    @rule(data=st.data())
    def replace_storage(self, data):
        i = data.draw(st.integers(0, len(self.params) - 1))
        dtype = data.draw(st.sampled_from([self.params[i].dtype, torch.float32, torch.bfloat16]))
        before = shadows(self.opt)
        self.params[i].data = self.params[i].detach().to(dtype, copy=True)  # the old storage is freed
        assert all(torch.equal(a, b) for a, b in zip(before, shadows(self.opt)))

    @rule(data=st.data())
    def swap_tensors(self, data):  # what module.to() and load_state_dict(assign=True) do when swapping is on
        i = data.draw(st.integers(0, len(self.params) - 1))
        dtype = data.draw(st.sampled_from([self.params[i].dtype, torch.float32, torch.bfloat16]))
        before = shadows(self.opt)
        torch.utils.swap_tensors(self.params[i], torch.nn.Parameter(self.params[i].detach().to(dtype, copy=True)))
        assert all(torch.equal(a, b) for a, b in zip(before, shadows(self.opt)))

    @rule()
    def swap(self):
        weights, ema = [p.detach().clone() for p in self.params], shadows(self.opt)
        with self.opt.swap_ema():
            assert all(torch.equal(p, s.to(p.dtype)) for p, s in zip(self.params, ema))
        assert all(torch.equal(p, w) for p, w in zip(self.params, weights))

    @rule()
    def state_dict_round_trip(self):
        before, steps = shadows(self.opt), self.opt.num_steps
        self.opt.load_state_dict(self.opt.state_dict())
        assert self.opt.num_steps == steps and all(torch.equal(a, b) for a, b in zip(before, shadows(self.opt)))


EMAInUse.TestCase.settings = settings(settings.default, stateful_step_count=8)
test_ema_in_use = EMAInUse.TestCase
