"""EMAOptimizer: trajectories against float64 references, integration with
PyTorch's training machinery, and bad input."""

import warnings

import pytest
import torch
from conftest import BACKENDS, DEVICE, assert_ulps
from models import batches, make_base, make_model, shadows, train_step
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from triton_ema import EMAOptimizer
from triton_ema.schedules import Constant, Cosine, Power, Warmup

SCHEDULES = {
    "constant": Constant(0.3),
    "warmup": Warmup(0.5, warm_up=3),
    "cosine": Cosine(0.3, 0.05, total_steps=4, warm_up=2),
    "power": Power(decay=0.9, power=3 / 4),
    "callable": lambda t: 0.2 + 0.1 * (t % 2),
}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("interval", [1, 3])
@pytest.mark.parametrize("schedule", list(SCHEDULES))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["adamw", "sgd"])
def test_trajectory_matches_float64_reference(kind, dtype, schedule, interval, backend):
    model = make_model(dtype, device=DEVICE)
    sched = SCHEDULES[schedule]
    opt = EMAOptimizer(make_base(kind, model.parameters()), momentum=sched, interval=interval, backend=backend)
    reference = [p.detach().double() for p in model.parameters()]
    magnitude = [r.abs() for r in reference]  # largest |param| seen, per element
    for t, batch in enumerate(batches(7, dtype, device=DEVICE)):
        before = shadows(opt)
        train_step(model, opt, batch)
        after = shadows(opt)
        if t % interval:
            assert all(torch.equal(a, b) for a, b in zip(before, after)), f"step {t} is not an update step"
            continue
        m = sched(t)
        for s_old, s_new, p, ref in zip(before, after, model.parameters(), reference):
            assert s_new.dtype == (torch.float32 if dtype != torch.float64 else dtype)
            p64, s64 = p.detach().double(), s_old.double()
            # One update: exact lerp from the stored shadow, rounded once.
            assert_ulps(s_new, s64 + m * (p64 - s64), scale=torch.maximum(s64.abs(), p64.abs()))
            ref.add_(m * (p64 - ref))
        for mag, p in zip(magnitude, model.parameters()):
            torch.maximum(mag, p.detach().double().abs(), out=mag)
    for s, ref, mag in zip(shadows(opt), reference, magnitude):
        # The whole run against float64: float32 rounding stays within a few ulp.
        assert_ulps(s, ref, scale=mag, ulps=16)
    assert opt.num_steps == 7


@pytest.mark.parametrize("backend, shadow_dtype", [
    (b, d) for b in BACKENDS for d in (torch.bfloat16, torch.float16, torch.float64)
    if not (b == "triton" and d == torch.float64)  # rejected: tested below
], ids=str)
def test_explicit_shadow_dtype(shadow_dtype, backend):
    model = make_model(torch.float32, device=DEVICE)
    opt = EMAOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), momentum=0.25, shadow_dtype=shadow_dtype,
                       backend=backend)
    for batch in batches(3, device=DEVICE):
        before = shadows(opt)
        train_step(model, opt, batch)
        for s_old, s_new, p in zip(before, shadows(opt), model.parameters()):
            assert s_new.dtype == shadow_dtype
            p64, s64 = p.detach().double(), s_old.double()
            assert_ulps(s_new, s64 + 0.25 * (p64 - s64), scale=torch.maximum(s64.abs(), p64.abs()))


@pytest.mark.skipif("triton" not in BACKENDS, reason="triton is not installed")
def test_triton_backend_rejects_float64_shadows():
    model = make_model(device=DEVICE)
    with pytest.raises(ValueError, match="float64"):
        EMAOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), momentum=0.1, shadow_dtype=torch.float64,
                     backend="triton")


def test_bf16_shadow_default_is_float32_and_keeps_moving():
    # A bf16 shadow with a small momentum rounds its updates away; the default float32 one does not.
    p = torch.nn.Parameter(torch.ones(64, dtype=torch.bfloat16, device=DEVICE))
    q = torch.nn.Parameter(p.detach().clone())
    opt = EMAOptimizer(torch.optim.SGD([p], lr=1.0), momentum=1e-3)
    stuck = EMAOptimizer(torch.optim.SGD([q], lr=1.0), momentum=1e-3, shadow_dtype=torch.bfloat16)
    with torch.no_grad():
        p.fill_(1.25)
        q.fill_(1.25)
    for _ in range(20):
        opt.step()
        stuck.step()
    assert shadows(opt)[0].dtype == torch.float32
    assert_ulps(shadows(opt)[0], torch.full((64,), 1.25 - 0.25 * 0.999**20, dtype=torch.float64), ulps=16)
    assert torch.all(shadows(stuck)[0] == 1.0)


def test_is_an_optimizer_sharing_state():
    model = make_model(device=DEVICE)
    base = torch.optim.AdamW(model.parameters(), lr=1e-3)
    opt = EMAOptimizer(base, momentum=0.1)
    assert isinstance(opt, torch.optim.Optimizer)
    assert opt.param_groups is base.param_groups and opt.state is base.state and opt.defaults is base.defaults
    train_step(model, opt, batches(1, device=DEVICE)[0])
    assert len(opt.state) == len(list(model.parameters()))


def test_closure_loss_is_returned():
    model = make_model(device=DEVICE)
    opt = EMAOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), momentum=0.1)
    x, y = batches(1, device=DEVICE)[0]

    def closure():
        opt.zero_grad()
        loss = (model(x) - y).square().mean()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor) and loss.ndim == 0 and opt.num_steps == 1


@pytest.mark.parametrize("flag", ["foreach", "fused"])
def test_foreach_and_fused_base_optimizers(flag):
    model = make_model(device=DEVICE)
    opt = EMAOptimizer(torch.optim.AdamW(model.parameters(), lr=0.05, **{flag: True}), momentum=0.5)
    p0 = [p.detach().clone() for p in model.parameters()]
    train_step(model, opt, batches(1, device=DEVICE)[0])
    for s, p, q in zip(shadows(opt), p0, model.parameters()):
        assert_ulps(s, 0.5 * p.double() + 0.5 * q.detach().double(), scale=torch.maximum(p.abs(), q.abs()))


@pytest.mark.parametrize("make_scheduler", [
    lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5),
    lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.1, total_steps=10),
    lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda e: 1 / (e + 1)),
    lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=5),
], ids=["step", "onecycle", "lambda", "cosine"])
def test_lr_schedulers_drive_the_wrapped_optimizer(make_scheduler):
    def run(wrap):
        model = make_model(device=DEVICE)
        base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        opt = EMAOptimizer(base, momentum=0.1) if wrap else base
        sched = make_scheduler(opt)
        lrs = []
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # e.g. "lr_scheduler.step() before optimizer.step()"
            for batch in batches(5, device=DEVICE):
                train_step(model, opt, batch)
                sched.step()
                lrs.append(base.param_groups[0]["lr"])
        return lrs, list(model.parameters())

    (lrs, params), (bare_lrs, bare_params) = run(wrap=True), run(wrap=False)
    assert lrs == bare_lrs and len(set(lrs)) > 1
    assert all(torch.equal(p, q) for p, q in zip(params, bare_params))


def test_grad_scaler_skipped_step_updates_no_ema():
    model = make_model(device=DEVICE)
    opt = EMAOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), momentum=0.5)
    scaler = torch.amp.GradScaler(DEVICE.type, init_scale=2.0**8)
    x, y = batches(1, device=DEVICE)[0]
    before = shadows(opt)
    scaler.scale((model(x) - y).square().mean()).backward()
    model.fc.weight.grad[0, 0] = float("inf")
    scaler.step(opt)
    scaler.update()
    opt.zero_grad()
    assert opt.num_steps == 0 and all(torch.equal(a, b) for a, b in zip(before, shadows(opt)))
    scaler.scale((model(x) - y).square().mean()).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # on scaled grads: only to show it runs
    scaler.step(opt)
    scaler.update()
    assert opt.num_steps == 1 and not all(torch.equal(a, b) for a, b in zip(before, shadows(opt)))


def test_add_param_group_starts_new_shadows_from_current_values(backend):
    model = make_model(device=DEVICE)
    opt = EMAOptimizer(torch.optim.SGD(model.conv.parameters(), lr=0.1), momentum=0.5, backend=backend)
    train_step(model, opt, batches(1, device=DEVICE)[0])
    old = shadows(opt)
    with torch.no_grad():
        model.fc.weight.mul_(2)
    opt.add_param_group({"params": list(model.fc.parameters()), "lr": 0.01})
    now = shadows(opt)
    assert len(now) == 4 and all(torch.equal(a, b) for a, b in zip(old, now))
    assert torch.equal(now[2], model.fc.weight.detach()) and torch.equal(now[3], model.fc.bias.detach())
    train_step(model, opt, batches(1, device=DEVICE)[0])
    assert not torch.equal(shadows(opt)[2], now[2])


@pytest.mark.parametrize("where", ["first", "later"])
def test_param_group_added_to_the_base_optimizer_is_adopted(where, backend):
    # opt.optimizer.add_param_group(...) bypasses the wrapper: noticed at the next step.
    model = make_model(device=DEVICE)
    opt = EMAOptimizer(torch.optim.SGD(model.conv.parameters(), lr=0.1), momentum=0.5, backend=backend)
    train_step(model, opt, batches(1, device=DEVICE)[0])
    old = shadows(opt)
    groups = [model.fc.parameters(), [model.scale]] if where == "later" else [model.fc.parameters()]
    for params in groups:
        opt.optimizer.add_param_group({"params": list(params), "lr": 0.01})
    added_groups = [group["params"] for group in opt.param_groups[1:]]
    added = [p.detach().clone() for group in added_groups for p in group]
    train_step(model, opt, batches(1, seed=3, device=DEVICE)[0])
    now = shadows(opt)
    assert len(now) == 2 + len(added)
    # The old shadows continue from their EMA; the new ones start from the values the params had when added.
    for shadow, start, p in zip(now, old + added, [*model.conv.parameters(), *sum(added_groups, [])]):
        p64, s64 = p.detach().double(), start.double()
        assert_ulps(shadow, s64 + 0.5 * (p64 - s64), scale=torch.maximum(s64.abs(), p64.abs()))


@pytest.mark.parametrize("momentum, decay, hint", [
    (0.9999, None, "momentum=0.9999 is the weight of the new parameters; if you meant a decay .* pass decay=0.9999"),
    (None, 1e-4, "decay=0.0001 is momentum 0.9999; if you meant a momentum of 0.0001, pass momentum=0.0001"),
    (Constant(0.9), None, "momentum=0.9 is the weight of the new parameters"),
    (1.0, None, "momentum=1 is the weight of the new parameters: every update copies them"),
    ({"fast": 0.9, "slow": 0.01}, None, "pass decay=0.9 .* copies the weights \\(profile 'fast'\\)$"),
])
def test_decay_passed_as_momentum_warns(momentum, decay, hint):
    model = make_model(device=DEVICE)
    with pytest.warns(UserWarning, match=hint) as caught:
        EMAOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), momentum=momentum, decay=decay)
    assert caught[0].filename == __file__


@pytest.mark.parametrize("momentum", [0.5, 2e-4, Warmup(0.9), lambda t: 0.9])
def test_momentum_of_at_most_half_or_a_schedule_does_not_warn(momentum):
    model = make_model(device=DEVICE)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        EMAOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), momentum=momentum)


def test_update_buffers_averages_float_buffers_only(backend):
    model = make_model(device=DEVICE)
    opt = EMAOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), momentum=0.25, model=model,
                       update_buffers=True, backend=backend)
    ema = opt.state_dict()["ema"]["buffers"]
    assert sorted(ema) == ["bn.running_mean", "bn.running_var"]  # not bn.num_batches_tracked
    expected = {k: v.double().clone() for k, v in ema.items()}
    for batch in batches(3, device=DEVICE):
        train_step(model, opt, batch)
        for name in expected:
            expected[name] += 0.25 * (getattr(model.bn, name.split(".")[1]).double() - expected[name])
    for name, value in opt.state_dict()["ema"]["buffers"].items():
        assert_ulps(value, expected[name], ulps=8)
    assert opt.ema_state_dict()["bn.num_batches_tracked"] == 3


def test_storage_replaced_between_steps_is_followed(backend):
    model = make_model(device=DEVICE)
    opt = EMAOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), momentum=0.5, backend=backend)
    train_step(model, opt, batches(1, device=DEVICE)[0])
    i = [name for name, _ in model.named_parameters()].index("fc.weight")
    before = shadows(opt)[i]
    model.fc.weight.data = torch.zeros_like(model.fc.weight) + 4.0  # the old storage is freed
    opt.step()  # no grads: the params stay, the EMA moves halfway to them
    assert_ulps(shadows(opt)[i], 0.5 * before.double() + 2.0, scale=before.abs() + 4)


def test_compiled_step_keeps_the_ema(backend):
    # torch.compile(opt.step) compiles the base step; the EMA (storage checks, kernels) runs eagerly.
    model = make_model(device=DEVICE)
    opt = EMAOptimizer(make_base("sgd", model.parameters()), momentum=lambda t: 0.5 / (t + 1), interval=2,
                       backend=backend)
    step = torch.compile(opt.step, backend="aot_eager")
    expected = [p.detach().double() for p in model.parameters()]
    scale = [e.abs() for e in expected]  # the magnitudes each element took on the way
    for t, (x, y) in enumerate(batches(5, device=DEVICE)):
        (model(x) - y).square().mean().backward()
        step()
        opt.zero_grad()
        if t % 2 == 0:
            m = 0.5 / (t + 1)
            expected = [e + m * (p.detach().double() - e) for e, p in zip(expected, model.parameters())]
            scale = [torch.maximum(c, p.detach().double().abs()) for c, p in zip(scale, model.parameters())]
        if t == 2:
            model.fc.weight.data = model.fc.weight.detach().clone()  # storage replaced between compiled steps
    assert opt.num_steps == 5
    for s, e, c in zip(shadows(opt), expected, scale):
        assert_ulps(s, e, scale=c, ulps=3)  # one rounding per update


def test_parameter_dtype_change_keeps_the_ema(backend):
    model = make_model(device=DEVICE)
    opt = EMAOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), momentum=0.5, backend=backend)
    train_step(model, opt, batches(1, device=DEVICE)[0])
    before = shadows(opt)
    model.to(torch.bfloat16)
    opt.step()
    for s, b, p in zip(shadows(opt), before, model.parameters()):
        assert s.dtype == torch.float32
        assert_ulps(s, 0.5 * b.double() + 0.5 * p.double(), scale=b.abs() + p.float().abs())


@pytest.mark.skipif(DEVICE.type != "cuda", reason="needs parameters on a GPU and shadows on the CPU")
def test_cpu_shadows_for_gpu_params():
    p = torch.nn.Parameter(torch.randn(3000, device=DEVICE, dtype=torch.bfloat16))
    opt = EMAOptimizer(torch.optim.SGD([p], lr=0.1), momentum=0.25, device="cpu")
    s0 = opt.state_dict()["ema"]["shadow"][0].clone()
    p.grad = torch.ones_like(p)
    opt.step()
    s1 = opt.state_dict()["ema"]["shadow"][0]
    assert s1.device.type == "cpu" and s1.dtype == torch.float32
    assert_ulps(s1, s0.double() + 0.25 * (p.detach().cpu().double() - s0.double()), scale=s0.abs() + p.float().abs().cpu())
    before = p.detach().clone()
    with opt.swap_ema():
        assert torch.equal(p.cpu(), s1.to(torch.bfloat16))
    assert torch.equal(p, before)


def test_bad_schedule_value_leaves_everything_untouched():
    p = torch.nn.Parameter(torch.ones(4))
    opt = EMAOptimizer(torch.optim.SGD([p], lr=1.0), momentum=lambda t: 0.5 if t < 1 else float("nan"))
    p.grad = torch.ones(4)
    opt.step()
    snapshot = (p.detach().clone(), shadows(opt))
    with pytest.raises(ValueError, match="at step 1"):
        opt.step()
    assert opt.num_steps == 1 and torch.equal(p, snapshot[0]) and torch.equal(shadows(opt)[0], snapshot[1][0])


@pytest.mark.parametrize("param_dtype, shadow_dtype", [(torch.float32, None), (torch.bfloat16, None),
                                                       (torch.bfloat16, torch.float16)],
                         ids=["same", "wider", "narrower"])
def test_torch_backend_updates_in_bounded_pieces(monkeypatch, param_dtype, shadow_dtype):
    from triton_ema import backends

    monkeypatch.setitem(backends.GROUP_NUMEL, DEVICE.type, 16)  # tensors cut into pieces, pieces grouped
    g = torch.Generator().manual_seed(0)
    made = [torch.randn(6, 5, generator=g).t(), torch.randn(2, 3, 4, 5, generator=g).to(memory_format=torch.channels_last),
            torch.randn(40, generator=g), torch.randn(100, generator=g)[10:90].view(8, 10),  # offset in its storage
            torch.randn(3, generator=g), torch.randn(0, generator=g),
            torch.randn(8, 8, generator=g)[:, ::2]]  # the last is not dense: updated whole
    params = [torch.nn.Parameter(t.to(DEVICE, param_dtype)) for t in made]
    opt = EMAOptimizer(torch.optim.SGD(params, lr=1.0), momentum=0.3, shadow_dtype=shadow_dtype, backend="torch")
    for p in params:
        p.grad = torch.randn(p.shape, generator=g).to(DEVICE, param_dtype)
    before = shadows(opt)
    opt.step()
    for s_old, s_new, p in zip(before, shadows(opt), params):
        p64, s64 = p.detach().double(), s_old.double()
        assert_ulps(s_new, s64 + 0.3 * (p64 - s64), scale=torch.maximum(s64.abs(), p64.abs()))


def test_optimizer_hooks_run_once_on_the_wrapper():
    model = make_model(device=DEVICE)
    opt = EMAOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), momentum=0.5)
    calls = []
    opt.register_step_pre_hook(lambda o, args, kwargs: calls.append("pre"))
    opt.register_step_post_hook(lambda o, args, kwargs: calls.append("post"))
    opt.register_state_dict_post_hook(lambda o, sd: calls.append("saved") or {**sd, "note": 1})
    opt.register_load_state_dict_pre_hook(lambda o, sd: calls.append("loading") or {k: v for k, v in sd.items()
                                                                                   if k != "note"})
    train_step(model, opt, batches(1, device=DEVICE)[0])
    sd = opt.state_dict()
    opt.load_state_dict(sd)
    assert calls == ["pre", "post", "saved", "loading"] and sd["note"] == 1


def test_global_step_hooks_run_once_per_step_and_a_profiler_sees_the_step():
    model = make_model(device=DEVICE)
    base = torch.optim.SGD(model.parameters(), lr=0.1)
    opt = EMAOptimizer(base, momentum=0.5)
    seen = []
    handles = [register_optimizer_step_pre_hook(lambda o, args, kwargs: seen.append(o)),
               register_optimizer_step_post_hook(lambda o, args, kwargs: seen.append(o))]
    try:
        train_step(model, opt, batches(1, device=DEVICE)[0])
    finally:
        for handle in handles:
            handle.remove()
    assert seen == [base, base]  # from the wrapped optimizer's step, not a second time from the wrapper's
    with torch.profiler.profile() as prof:
        train_step(model, opt, batches(1, seed=1, device=DEVICE)[0])
    names = [event.name for event in prof.events()]
    assert "Optimizer.step#EMAOptimizer.step" in names and "Optimizer.step#SGD.step" in names


def test_refused_param_group_leaves_everything_as_it_was():
    model = make_model(device=DEVICE)
    opt = EMAOptimizer(torch.optim.SGD(model.conv.parameters(), lr=0.1), momentum=0.5)
    before = shadows(opt)
    w = torch.nn.Parameter(torch.ones(3, device=DEVICE))
    with pytest.warns(UserWarning, match="duplicate"), pytest.raises(ValueError, match="same tensor"):
        opt.add_param_group({"params": [w, w]})
    with pytest.raises(TypeError, match="only floating-point"):
        opt.add_param_group({"params": [torch.zeros(2, dtype=torch.int64, device=DEVICE)]})
    assert len(opt.param_groups) == 1 and all(torch.equal(a, b) for a, b in zip(before, shadows(opt)))
    train_step(model, opt, batches(1, device=DEVICE)[0])
    assert opt.num_steps == 1 and len(shadows(opt)) == 2
