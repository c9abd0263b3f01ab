"""Faults, the non-finite guard, and memory that stays flat."""

import pytest
import torch
from conftest import DEVICE, live_tensor_bytes
from models import batches, make_model, shadows, train_step

from triton_ema import EMAOptimizer


class Exploding(torch.optim.SGD):
    """An optimizer whose step fails after it has been called ``fuse`` times."""

    def __init__(self, params, fuse):
        super().__init__(params, lr=0.1)
        self.fuse = fuse

    def step(self, closure=None):
        self.fuse -= 1
        if self.fuse < 0:
            raise RuntimeError("base step failed")
        return super().step(closure)


def test_failing_base_step_leaves_the_ema_untouched(backend):
    model = make_model(device=DEVICE)
    opt = EMAOptimizer(Exploding(model.parameters(), fuse=2), momentum=0.5, backend=backend)
    for batch in batches(2, device=DEVICE):
        train_step(model, opt, batch)
    before = shadows(opt)
    with pytest.raises(RuntimeError, match="base step failed"):
        train_step(model, opt, batches(1, seed=9, device=DEVICE)[0])
    assert opt.num_steps == 2 and all(torch.equal(a, b) for a, b in zip(before, shadows(opt)))


def test_failing_schedule_runs_before_the_base_step():
    model = make_model(device=DEVICE)

    def schedule(t):
        if t == 2:
            raise ZeroDivisionError("schedule failed")
        return 0.5

    opt = EMAOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), momentum=schedule)
    for batch in batches(2, device=DEVICE):
        train_step(model, opt, batch)
    weights, before = [p.detach().clone() for p in model.parameters()], shadows(opt)
    with pytest.raises(ZeroDivisionError):
        train_step(model, opt, batches(1, seed=9, device=DEVICE)[0])
    assert opt.num_steps == 2
    assert all(torch.equal(a, b) for a, b in zip(before, shadows(opt)))
    assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters()))


@pytest.mark.parametrize("skip", [True, False])
def test_nonfinite_params(skip, backend):
    good = torch.nn.Parameter(torch.ones(3000, device=DEVICE, dtype=torch.bfloat16))  # its own bucket
    bad = [torch.nn.Parameter(torch.ones(n, device=DEVICE)) for n in (5, 2500)]
    opt = EMAOptimizer(torch.optim.SGD([good, *bad], lr=1.0), momentum=0.5, skip_nonfinite=skip, backend=backend)
    for p in (good, *bad):
        p.grad = torch.ones_like(p)  # every param goes to 0.0
    bad[1].grad[7] = float("nan")
    opt.step()
    good_shadow, *bad_shadows = shadows(opt)
    assert torch.all(good_shadow == 0.5)  # a finite bucket updates either way
    if skip:
        assert all(torch.all(s == 1.0) for s in bad_shadows) and opt.skipped_updates == 1
    else:  # the default: NaN flows into the EMA, as in every EMA library
        assert torch.isnan(bad_shadows[1][7]) and opt.skipped_updates == 0
    with torch.no_grad():
        bad[1].fill_(3.0)
    opt.zero_grad()
    opt.step()  # finite again: updates resume
    if skip:
        assert torch.all(shadows(opt)[2] == 2.0) and opt.skipped_updates == 1
        assert opt.state_dict()["ema"]["skipped_updates"] == 1


@pytest.mark.parametrize("on_device", [False, True], ids=["host-decided", "device-decided"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["same-dtype", "converted"])
def test_torch_backend_skips_group_by_group(monkeypatch, dtype, on_device):
    from triton_ema import backends

    if on_device:  # the path of a flag on a GPU (no host sync), taken here by a CPU flag
        monkeypatch.setattr(backends.TorchBackend, "update", backends.TorchBackend._update)
    monkeypatch.setitem(backends.GROUP_NUMEL, DEVICE.type, 64)  # groups [20, 30], [40], [100], [7]; the NaN in the last
    params = [torch.nn.Parameter(torch.ones(n, device=DEVICE, dtype=dtype)) for n in (20, 30, 40, 100, 7)]
    opt = EMAOptimizer(torch.optim.SGD(params, lr=1.0), momentum=0.5, skip_nonfinite=True, backend="torch")
    for p in params:
        p.grad = torch.ones_like(p)
    params[-1].grad[3] = float("nan")
    opt.step()
    assert all(torch.all(s == 1.0) for s in shadows(opt)) and opt.skipped_updates == 1
    with torch.no_grad():
        params[-1].zero_()
    opt.zero_grad()
    opt.step()  # every param is 0.0 and finite: every group updates
    assert all(torch.all(s == 0.5) for s in shadows(opt)) and opt.skipped_updates == 1


@pytest.mark.parametrize("value", [float("-inf"), float("inf")])
def test_inf_is_caught_like_nan(backend, value):
    p = torch.nn.Parameter(torch.ones(4100, device=DEVICE, dtype=torch.float16))
    opt = EMAOptimizer(torch.optim.SGD([p], lr=1.0), momentum=0.5, skip_nonfinite=True, backend=backend)
    with torch.no_grad():
        p[4099] = value
    opt.step()
    assert torch.all(shadows(opt)[0] == 1.0) and opt.skipped_updates == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["exchange", "stash"])
def test_memory_stays_flat_over_1000_steps(dtype, backend):
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.BatchNorm1d(32), torch.nn.Linear(32, 4))
    model.to(DEVICE, dtype)
    opt = EMAOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-3), momentum=0.01, model=model,
                       update_buffers=True, backend=backend)
    x = torch.randn(8, 16, device=DEVICE, dtype=dtype)

    def cycle(steps):
        for i in range(steps):
            model(x).square().mean().backward()
            opt.step()
            opt.zero_grad()
            if i % 10 == 0:
                with opt.swap_ema():
                    model.eval()(x)
                    model.train()
            if i % 100 == 0:
                opt.load_state_dict(opt.state_dict())
    cycle(20)  # warm-up: optimizer state, tables, caches
    baseline = live_tensor_bytes()
    cycle(1000 if backend == "torch" else 100)  # the interpreter is slow: 10 swaps and a state round trip
    assert live_tensor_bytes() == baseline


def test_nothing_a_swap_allocates_outlives_it():
    model = make_model(torch.bfloat16, device=DEVICE)  # float32 shadows: the swap needs a stash
    opt = EMAOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), momentum=0.1)
    baseline = live_tensor_bytes()
    with opt.swap_ema():
        inside = live_tensor_bytes()
    assert inside > baseline and live_tensor_bytes() == baseline
