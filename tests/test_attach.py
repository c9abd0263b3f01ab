"""attach(): the EMA of an optimizer that something else built and holds, run by that optimizer's own hooks."""


import pytest
import torch
from conftest import DEVICE, assert_ulps
from models import batches, float64_ema_step, make_model, regression_data, regression_net, roundtrip, train_step

from triton_ema import EMAOptimizer, attach
from triton_ema.schedules import Cosine

SCHEDULE = Cosine(0.3, 0.05, total_steps=8, warm_up=3)


def build(seed=0, attached=True, backend="torch", **kw):
    model = make_model(seed=seed, device=DEVICE)
    base = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1, eps=1e-3)
    make = attach if attached else EMAOptimizer
    ema = make(base, SCHEDULE, interval=2, model=model, update_buffers=True, backend=backend, **kw)
    return model, base, ema


def ema_values(ema):
    saved = ema.ema_checkpoint.state_dict()
    return [v.clone() for v in saved["shadow"].values()] + [v.clone() for v in saved["buffers"].values()]


def bitwise_equal(xs, ys):
    return len(xs) == len(ys) and all(x.dtype == y.dtype and torch.equal(x, y) for x, y in zip(xs, ys))


def test_attached_equals_the_wrapper_and_a_float64_reference(backend):
    data = batches(7, device=DEVICE)
    model, base, ema = build(backend=backend)
    wrapped_model, _, wrapper = build(attached=False, backend=backend)
    reference = [p.detach().double().clone() for p in model.parameters()]
    for t, batch in enumerate(data):
        train_step(model, base, batch)  # the base optimizer steps; nobody calls the EMA
        train_step(wrapped_model, wrapper, batch)
        if t % 2 == 0:
            m = SCHEDULE(t)
            reference = [s + m * (p.detach().double() - s) for s, p in zip(reference, model.parameters())]
    assert ema.num_steps == wrapper.num_steps == len(data)
    assert bitwise_equal(ema_values(ema), ema_values(wrapper))
    for s, r in zip(ema.state_dict()["ema"]["shadow"].values(), reference):
        assert_ulps(s, r, scale=r.abs().max().expand_as(r), ulps=8)  # the lerps mix values of that size


def test_each_way_to_step_updates_once():
    model, base, ema = build()
    x, y = batches(1, device=DEVICE)[0]
    for step in (base.step, ema.step, lambda: base.step(lambda: None), lambda: ema.step(lambda: None)):
        (model(x) - y).square().mean().backward()
        step()
    assert ema.num_steps == 4
    assert base.state_dict()["ema"]["step"] == ema.state_dict()["ema"]["step"] == 4


def test_closure_loss_is_returned_through_the_hooks():
    model, base, ema = build()
    x, y = batches(1, device=DEVICE)[0]

    def closure():
        base.zero_grad()
        loss = (model(x) - y).square().mean()
        loss.backward()
        return loss
    assert torch.is_tensor(base.step(closure)) and torch.is_tensor(ema.step(closure))
    assert ema.num_steps == 2


def test_grad_scaler_skipped_step_updates_nothing():
    model, base, ema = build()
    scaler = torch.amp.GradScaler(DEVICE.type, init_scale=2.0**10)
    x, y = batches(1, device=DEVICE)[0]
    scaler.scale((model(x) - y).square().mean()).backward()
    before = ema_values(ema)
    next(model.parameters()).grad.fill_(float("inf"))  # an overflow: GradScaler skips the step
    scaler.step(base)
    scaler.update()
    assert ema.num_steps == 0 and bitwise_equal(ema_values(ema), before)
    base.zero_grad()
    scaler.scale((model(x) - y).square().mean()).backward()
    scaler.step(base)
    assert ema.num_steps == 1 and not bitwise_equal(ema_values(ema), before)


def test_fp16_autocast_with_grad_scaler_matches_a_reference_of_the_steps_taken(backend):
    # Mixed precision as accelerate and Lightning run it: float16 autocast, a GradScaler, float32 weights.
    model, base, ema = build(backend=backend)
    scaler = torch.amp.GradScaler(DEVICE.type, init_scale=2.0**8)
    reference = [p.detach().double().clone() for p in model.parameters()]
    taken, skipped = 0, []
    for t, (x, y) in enumerate(batches(7, device=DEVICE)):
        with torch.autocast(DEVICE.type, dtype=torch.float16):
            loss = (model(x).float() - y).square().mean()
        scaler.scale(loss).backward()
        if t == 3:
            next(model.parameters()).grad.fill_(float("inf"))  # an overflow: GradScaler skips the step
        before, scale = ema_values(ema), scaler.get_scale()
        scaler.step(base)
        scaler.update()
        base.zero_grad()
        if scaler.get_scale() < scale:  # the scaler's own verdict: this step was skipped
            skipped.append(t)
            assert bitwise_equal(ema_values(ema), before)
            continue
        if taken % 2 == 0:  # interval=2 over the steps taken; the schedule's t counts them too
            m = SCHEDULE(taken)
            reference = [s + m * (p.detach().double() - s) for s, p in zip(reference, model.parameters())]
        taken += 1
    assert skipped == [3] and ema.num_steps == taken == 6
    for s, r in zip(ema.state_dict()["ema"]["shadow"].values(), reference):
        assert_ulps(s, r, scale=r.abs().max().expand_as(r), ulps=8)


@pytest.mark.parametrize("stop", [1, 4])
def test_resume_through_the_optimizers_own_state_dict_is_bitwise(stop):
    data = batches(7, device=DEVICE)
    model, base, ema = build()
    for batch in data:
        train_step(model, base, batch)

    first, base1, _ = build()
    for batch in data[:stop]:
        train_step(first, base1, batch)
    ckpt = roundtrip({"model": first.state_dict(), "optimizer": base1.state_dict()})  # no EMA object in sight
    assert ckpt["optimizer"]["ema"]["step"] == stop

    resumed, base2, ema2 = build(seed=7)
    resumed.load_state_dict(ckpt["model"])
    base2.load_state_dict(ckpt["optimizer"])
    assert ema2.num_steps == stop
    for batch in data[stop:]:
        train_step(resumed, base2, batch)
    assert bitwise_equal(list(resumed.state_dict().values()), list(model.state_dict().values()))
    assert bitwise_equal(ema_values(ema2), ema_values(ema))


def test_bad_load_is_refused_before_the_optimizer_changes():
    model, base, ema = build()
    for batch in batches(2, device=DEVICE):
        train_step(model, base, batch)
    sd = roundtrip(base.state_dict())
    train_step(model, base, batches(1, seed=5, device=DEVICE)[0])
    before = (ema_values(ema), ema.num_steps, roundtrip(base.state_dict()))
    sd["ema"]["shadow"][1] = torch.zeros(2)
    with pytest.raises(ValueError, match="saved shadow of conv.weight has shape"):
        base.load_state_dict(sd)
    assert bitwise_equal(ema_values(ema), before[0]) and ema.num_steps == before[1]
    after = base.state_dict()
    assert all(torch.equal(after["state"][i]["exp_avg"], before[2]["state"][i]["exp_avg"]) for i in after["state"])


def test_bare_optimizer_dict_loads_with_a_warning_and_restarts_the_ema():
    model, base, ema = build()
    for batch in batches(2, device=DEVICE):
        train_step(model, base, batch)
    bare = torch.optim.AdamW(make_model(device=DEVICE).parameters(), lr=0.05)
    with pytest.warns(UserWarning, match="no 'ema' entry"):
        base.load_state_dict(roundtrip(bare.state_dict()))
    current = list(model.parameters()) + [b for b in model.buffers() if b.is_floating_point()]
    assert bitwise_equal(ema_values(ema), [v.detach() for v in current])


def test_step_and_load_inside_swap_are_refused_and_change_nothing():
    model, base, ema = build()
    sd = roundtrip(base.state_dict())
    with ema.swap_ema():
        before = [p.clone() for p in model.parameters()]
        with pytest.raises(RuntimeError, match="inside swap_ema"):
            base.step()
        with pytest.raises(RuntimeError, match="inside swap_ema"):
            base.load_state_dict(sd)
        assert bitwise_equal([p.clone() for p in model.parameters()], before)
    assert ema.num_steps == 0


def test_detach_removes_the_hooks_and_keeps_the_ema():
    model, base, ema = build()
    data = batches(3, device=DEVICE)
    train_step(model, base, data[0])
    kept = ema_values(ema)
    ema.detach()
    assert not ema.attached and "ema" not in base.state_dict()
    train_step(model, base, data[1])
    assert ema.num_steps == 1 and bitwise_equal(ema_values(ema), kept)
    train_step(model, ema, data[2])  # a wrapper now: its own step updates
    assert ema.num_steps == 2 and "ema" in ema.state_dict()
    attach(base, 0.5)  # the optimizer is free again


def test_one_ema_per_optimizer():
    _, base, ema = build()
    with pytest.raises(ValueError, match="AdamW already has an EMA attached"):
        attach(base, 0.1)
    with pytest.raises(ValueError, match="AdamW already has an EMA attached"):
        EMAOptimizer(base, 0.1)
    assert ema.attached


def test_a_copy_of_an_attached_ema_is_a_wrapper_of_the_copied_optimizer():
    import copy

    model, base, ema = build()
    data = batches(2, device=DEVICE)
    train_step(model, base, data[0])
    twin = copy.deepcopy(ema)
    assert ema.attached and not twin.attached and "ema" not in twin.optimizer.state_dict()
    assert bitwise_equal(ema_values(twin), ema_values(ema))
    train_step(twin.model, twin, data[1])  # its own step updates it; the original is not touched
    assert twin.num_steps == 2 and ema.num_steps == 1


# A framework's optimizer wrapper, after the framework built it: attach() goes through it, to the optimizer inside,
# whose step, state_dict and load_state_dict the wrapper calls (tests/test_errors.py: EMAOptimizer around one).

def regression_reference(momentum, steps, net, x, y, optimizer_step):
    """A float64 EMA of ``net``'s weights after each of ``steps`` calls of ``optimizer_step(loss)``."""
    reference = [p.detach().double().clone() for p in net.parameters()]
    for t in range(steps):
        optimizer_step((net(x[4 * t:4 * t + 4]) - y[4 * t:4 * t + 4]).square().mean())
        reference = float64_ema_step(reference, net.parameters(), momentum)
    return reference


@pytest.fixture
def accelerator():
    accelerate = pytest.importorskip("accelerate", reason="accelerate is not installed (pip install -e '.[test]')")
    yield accelerate.Accelerator(cpu=True, gradient_accumulation_steps=2)
    # accelerate keeps its state in process-wide singletons; its own tests reset them the same way
    accelerate.state.AcceleratorState._reset_state(reset_partial_state=True)
    accelerate.state.GradientState._reset_state()


@pytest.mark.integration
def test_attach_after_accelerate_prepare_goes_to_the_optimizer_inside(accelerator):
    net = regression_net()
    model, optimizer = accelerator.prepare(net, torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9))
    assert type(optimizer).__name__ == "AcceleratedOptimizer"
    ema = attach(optimizer, 0.3, model=net)
    assert ema.optimizer is optimizer.optimizer
    x, y = regression_data(32, 0)
    reference = [p.detach().double().clone() for p in net.parameters()]
    for t in range(8):  # 8 batches, gradients accumulated over 2: 4 optimizer steps
        with accelerator.accumulate(model):
            accelerator.backward((model(x[4 * t:4 * t + 4]) - y[4 * t:4 * t + 4]).square().mean())
            optimizer.step()  # steps the SGD (and the EMA) only where accelerate syncs the gradients
            optimizer.zero_grad()
        if t % 2 == 1:
            reference = float64_ema_step(reference, net.parameters(), 0.3)
    assert ema.num_steps == 4
    for s, r in zip(ema.ema_state_dict().values(), reference):
        assert_ulps(s, r, scale=r.abs().max().expand_as(r), ulps=16)
    saved = optimizer.state_dict()  # the AcceleratedOptimizer's checkpoint carries the EMA
    assert saved["ema"]["step"] == 4
    fresh = regression_net(seed=5)
    _, other = accelerator.prepare(fresh, torch.optim.SGD(fresh.parameters(), lr=0.1, momentum=0.9))
    resumed = attach(other, 0.3, model=fresh)
    other.load_state_dict(saved)
    assert resumed.num_steps == 4 and bitwise_equal(ema_values(resumed), ema_values(ema))


@pytest.mark.integration
def test_attach_to_mmengines_optim_wrapper_goes_to_the_optimizer_inside():
    optim = pytest.importorskip("mmengine.optim", reason="mmengine is not installed (pip install -e '.[test]')")
    net = regression_net()
    wrapper = optim.OptimWrapper(torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9))
    ema = attach(wrapper, 0.3, model=net)
    assert ema.optimizer is wrapper.optimizer
    x, y = regression_data(16, 0)
    reference = regression_reference(0.3, 4, net, x, y, wrapper.update_params)  # backward, step, zero_grad
    assert ema.num_steps == 4
    for s, r in zip(ema.ema_state_dict().values(), reference):
        assert_ulps(s, r, scale=r.abs().max().expand_as(r), ulps=16)
    saved = wrapper.state_dict()
    assert saved["ema"]["step"] == 4
    fresh = regression_net(seed=5)
    other = optim.OptimWrapper(torch.optim.SGD(fresh.parameters(), lr=0.1, momentum=0.9))
    resumed = attach(other, 0.3, model=fresh)
    other.load_state_dict(saved)
    assert resumed.num_steps == 4 and bitwise_equal(ema_values(resumed), ema_values(ema))


@pytest.mark.integration
def test_attach_to_lightnings_optimizer_in_a_manual_optimization_fit_goes_to_the_optimizer_inside():
    pytest.importorskip("lightning.pytorch", reason="lightning is not installed (pip install -e '.[test]')")
    import lightning_cases as cases

    class Manual(cases.Regressor):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False
            self.ema = self.reference = None

        def on_train_start(self):
            optimizer = self.optimizers()  # a LightningOptimizer around the SGD
            assert type(optimizer).__mro__[1].__name__ == "LightningOptimizer"
            self.ema = attach(optimizer, 0.3, model=self)
            assert self.ema.optimizer is optimizer.optimizer
            self.reference = [p.detach().double().clone() for p in self.parameters()]

        def training_step(self, batch, batch_idx):
            optimizer = self.optimizers()
            optimizer.zero_grad()
            self.manual_backward(self.loss(batch))
            optimizer.step()  # Lightning's strategy steps the SGD inside
            self.reference = float64_ema_step(self.reference, self.parameters(), 0.3)

    module = Manual()
    trainer = cases.trainer([], 1)
    trainer.fit(module, cases.loader())
    assert module.ema.num_steps == 4 == trainer.global_step
    for s, r in zip(module.ema.ema_state_dict().values(), module.reference):
        assert_ulps(s, r, scale=r.abs().max().expand_as(r), ulps=16)
    assert trainer.strategy.optimizer_state(trainer.optimizers[0])["ema"]["step"] == 4  # what Lightning saves
