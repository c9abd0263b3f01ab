"""``capturable=True``: the step count and momenta on the device, the kernels reading the
momenta from memory, and a whole training step captured in a CUDA graph (GPU only)."""

import pytest
import torch
from conftest import DEVICE, assert_ulps
from models import batches, make_base, make_model, roundtrip, train_step

from triton_ema import EMAOptimizer, attach
from triton_ema.checkpoint import profile_state
from triton_ema.schedules import Constant, CopyUntil, Cosine, Power, PowerFunction

PROFILES = {"copy-cosine": CopyUntil(Cosine(0.2, 0.01, total_steps=9), 1), "power": Power(0.99),
            "edm2": PowerFunction(gamma=6.0), "constant": Constant(0.05)}


def wrapper(backend, interval=1, momentum=PROFILES, capturable=True, seed=0, **kw):
    model = make_model(device=DEVICE, seed=seed)
    return model, EMAOptimizer(make_base("adamw", model.parameters()), momentum=momentum, model=model,
                               backend=backend, interval=interval, capturable=capturable, **kw)


def profile_shadows(opt):
    return {name: [v.detach().double().clone() for v in profile_state(opt.core, k)["shadow"].values()]
            for k, name in enumerate(opt.schedules)}


@pytest.mark.parametrize("interval", [1, 3])
def test_every_profile_follows_its_float64_reference(backend, interval):
    model, opt = wrapper(backend, interval)
    for t, batch in enumerate(batches(10, device=DEVICE)):
        before = profile_shadows(opt)
        train_step(model, opt, batch)
        after = profile_shadows(opt)
        for name, schedule in PROFILES.items():
            for s, old, p in zip(after[name], before[name], model.parameters()):
                if t % interval:
                    assert torch.equal(s, old)  # no update: bitwise unchanged
                    continue
                p64 = p.detach().double()
                # The momentum is rounded to float32 on the device: a few ulps of the magnitudes.
                assert_ulps(s.float(), old + schedule(t) * (p64 - old), scale=torch.maximum(old.abs(), p64.abs()),
                            ulps=4)
    assert opt.num_steps == 10 and opt.capturable


def test_the_device_counter_resumes_bitwise(backend):
    model, opt = wrapper(backend, interval=2)
    data = batches(8, device=DEVICE)
    for batch in data[:4]:
        train_step(model, opt, batch)
    checkpoint = roundtrip({"model": model.state_dict(), "opt": opt.state_dict()})  # saved now: views are live
    for batch in data[4:]:
        train_step(model, opt, batch)

    resumed_model, resumed = wrapper(backend, interval=2, seed=3)
    resumed_model.load_state_dict(checkpoint["model"])
    resumed.load_state_dict(checkpoint["opt"])
    assert resumed.num_steps == 4 and int(resumed.core.clock.step) == 4
    for batch in data[4:]:
        train_step(resumed_model, resumed, batch)
    for k in range(len(PROFILES)):
        for a, b in zip(profile_state(opt.core, k)["shadow"].values(), profile_state(resumed.core, k)["shadow"].values()):
            assert torch.equal(a, b)
    assert resumed.num_steps == 8


def test_non_finite_params_are_counted_on_update_steps_only(backend):
    model, opt = wrapper(backend, interval=2, momentum=0.5, skip_nonfinite=True)
    data = batches(4, device=DEVICE)
    train_step(model, opt, data[0])  # t = 0 updates
    for _ in (1, 2):  # t = 1 does not update, t = 2 does: both see a NaN param
        kept = [s.clone() for s in profile_shadows(opt)[None]]
        with torch.no_grad():
            model.scale.fill_(float("nan"))
        opt.step()  # no gradients: the base step leaves the NaN in place
        assert all(torch.equal(s, k) for s, k in zip(profile_shadows(opt)[None], kept))
        with torch.no_grad():
            model.scale.fill_(1.0)
    assert opt.skipped_updates == 1


def test_attach_runs_the_same_device_schedule(backend):
    other = make_model(device=DEVICE)
    base = make_base("adamw", other.parameters())
    ema = attach(base, momentum=PROFILES, model=other, backend=backend, capturable=True)
    for batch in batches(5, device=DEVICE):
        train_step(other, base, batch)
    assert ema.num_steps == 5 and int(ema.core.clock.step) == 5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="capturing a CUDA graph needs a GPU")
@pytest.mark.parametrize("backend_name", ["triton", "torch"])
def test_a_captured_training_step_replays_bitwise_like_eager_steps(backend_name):
    def setup():
        model = make_model(device="cuda")
        base = torch.optim.AdamW(model.parameters(), lr=0.05, capturable=True)
        opt = EMAOptimizer(base, momentum=PROFILES, model=model, backend=backend_name, capturable=True, interval=2)
        return model, opt

    data = [(x.cuda(), y.cuda()) for x, y in batches(12)]
    model, opt = setup()
    for batch in data:
        train_step(model, opt, batch)
    eager = profile_shadows(opt)

    model, opt = setup()
    static_x, static_y = (t.clone() for t in data[0])
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up, as torch.cuda.graphs asks: builds the tables and states
        for batch in data[:3]:
            train_step(model, opt, batch)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss = (model(static_x) - static_y).square().mean()
        loss.backward()
        opt.step()
    for x, y in data[3:]:
        static_x.copy_(x)
        static_y.copy_(y)
        graph.replay()
    assert opt.num_steps == 12
    for name, shadows in profile_shadows(opt).items():
        assert all(torch.equal(a, b) for a, b in zip(shadows, eager[name])), name
