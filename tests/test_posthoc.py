"""Power-function profiles and post-hoc EMA (EDM2), against float64 references written here
from the paper's formulas (not from the code under test)."""

import math

import numpy as np
import pytest
import torch
from conftest import assert_ulps
from models import batches, make_model, train_step

from triton_ema import EMAOptimizer, posthoc, schedules
from triton_ema.schedules import PowerFunction


def edm2_gamma(sigma_rel):
    """EDM2's Algorithm 2 (``sigma_rel_to_gamma``), with numpy's polynomial roots."""
    t = sigma_rel**-2
    return float(np.roots([1, 7, 16 - t, 12 - t]).real.max())


def edm2_weights(t_in, g_in, t_out, g_out):
    """EDM2's Algorithm 3 in numpy float64: ``X = solve(A, B)``, columns summing to 1."""
    def corr(t_a, g_a, t_b, g_b):
        ratio = t_a / t_b
        exponent = np.where(t_a < t_b, g_b, -g_a)
        return (g_a + 1) * (g_b + 1) * ratio**exponent / ((g_a + g_b + 1) * np.maximum(t_a, t_b))

    col = lambda x: np.float64(x).reshape(-1, 1)  # noqa: E731
    row = lambda x: np.float64(x).reshape(1, -1)  # noqa: E731
    a = corr(col(t_in), col(g_in), row(t_in), row(g_in))
    b = corr(col(t_in), col(g_in), row(t_out), row(g_out))
    x = np.linalg.solve(a, b)
    return x / x.sum(0)


@pytest.mark.parametrize("sigma_rel, gamma", [(0.05, 16.97), (0.10, 6.94)])
def test_sigma_rel_to_gamma_matches_the_paper(sigma_rel, gamma):
    # EDM2 (Sec. 3.1) quotes gamma = 16.97 for sigma_rel 0.05 and 6.94 for 0.10.
    profile = PowerFunction(sigma_rel=sigma_rel)
    assert profile.gamma == pytest.approx(edm2_gamma(sigma_rel), rel=1e-12)
    assert round(profile.gamma, 2) == gamma
    g = profile.gamma
    assert math.sqrt((g + 1) / ((g + 2) ** 2 * (g + 3))) == pytest.approx(sigma_rel, rel=1e-12)  # Eq. 123


@pytest.mark.parametrize("gamma", [0.5, 6.94, 16.97, 100.0])
def test_gamma_and_sigma_rel_round_trip(gamma):
    profile = PowerFunction(gamma=gamma)
    assert profile.sigma_rel == math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))
    assert PowerFunction(sigma_rel=profile.sigma_rel).gamma == pytest.approx(gamma, rel=1e-9)


def test_momentum_follows_the_formula():
    s = PowerFunction(gamma=6.94)
    assert s(0) == 1.0  # the first update copies
    for t in (1, 2, 17, 1000, 10**7):
        assert s(t) == 1 - (t / (t + 1)) ** 7.94


def test_edm2_training_loop_clock_is_ours():
    """EDM2's training loop adds the batch to ``cur_nimg`` and then calls ``ema.update(cur_nimg,
    batch_size)``, whose beta is ``(1 - batch_size / cur_nimg) ** (exp + 1)`` (training/phema.py,
    ``power_function_beta``): its n-th update lerps by our momentum at t = n - 1."""
    for sigma_rel in (0.05, 0.10):
        exp, ours = edm2_gamma(sigma_rel), PowerFunction(sigma_rel=sigma_rel)
        for n in (1, 2, 3, 10, 1000):
            for batch_size in (1, 256):
                beta = (1 - batch_size / (n * batch_size)) ** (exp + 1)
                assert 1 - beta == pytest.approx(ours(n - 1), rel=1e-12)


def test_the_ema_is_the_power_function_average():
    """After T steps the EMA weighs step t's params by ((t+1)**(g+1) - t**(g+1)) / T**(g+1)."""
    gamma, steps = 3.0, 40
    model = make_model(dtype=torch.float64)
    opt = EMAOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), momentum=PowerFunction(gamma=gamma),
                       model=model, backend="torch")
    history = []
    for batch in batches(steps, dtype=torch.float64):
        train_step(model, opt, batch)
        history.append([p.detach().clone() for p in model.parameters()])
    w = [((t + 1) ** (gamma + 1) - t ** (gamma + 1)) / steps ** (gamma + 1) for t in range(steps)]
    ema = opt.ema_state_dict()
    for k, (name, _) in enumerate(model.named_parameters()):
        expected = sum(wt * h[k] for wt, h in zip(w, history))
        assert_ulps(ema[name], expected, scale=torch.stack([h[k].abs() for h in history]).amax(0), ulps=64)


def run_with_snapshots(folder, sigma_rel, steps=60, every=10, dtype=None):
    """Train with one power-function profile; snapshot every ``every`` steps.
    Returns the snapshots as float64 copies of the EMA state dict, by time."""
    model = make_model()
    opt = EMAOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), momentum=PowerFunction(sigma_rel=sigma_rel),
                       model=model)
    taken = {}
    for batch in batches(steps):
        train_step(model, opt, batch)
        if opt.num_steps % every == 0:
            posthoc.save_snapshot(opt, folder, dtype=dtype)
            taken[opt.num_steps] = {k: v.to(dtype or v.dtype).double() for k, v in opt.ema_state_dict().items()}
    return model, opt, taken


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_synthesized_ema_is_the_float64_combination(tmp_path, dtype):
    _, opt, taken = run_with_snapshots(tmp_path, 0.05, dtype=dtype)
    gamma = opt.schedule.gamma
    times = sorted(taken)
    for target_sigma in (0.03, 0.08):
        x = edm2_weights(times, [gamma] * len(times), times[-1], [edm2_gamma(target_sigma)])[:, 0]
        got = posthoc.synthesize(tmp_path, sigma_rel=target_sigma)
        averaged = dict(opt.model.named_parameters())  # buffers are not averaged: the latest snapshot's
        for name, value in got.items():
            if name not in averaged:
                assert torch.equal(value, opt.model.state_dict()[name])  # kept as it is, not made compact
                continue
            parts = torch.stack([float(xi) * taken[t][name] for xi, t in zip(x, times)])
            assert value.dtype == torch.float32
            assert_ulps(value, parts.sum(0), scale=parts.abs().sum(0), ulps=4)


def test_target_equal_to_a_snapshot_gives_that_snapshot(tmp_path):
    _, opt, taken = run_with_snapshots(tmp_path, 0.10)
    got = posthoc.synthesize(tmp_path, gamma=opt.schedule.gamma, time=40)
    for name, value in got.items():
        if value.is_floating_point():
            torch.testing.assert_close(value.double(), taken[40][name], rtol=1e-5, atol=1e-6)


def test_several_targets_in_one_pass_equal_one_at_a_time(tmp_path):
    run_with_snapshots(tmp_path, 0.05)
    both = posthoc.synthesize(tmp_path, sigma_rel=[0.03, 0.08], time=50)
    for sd, sigma in zip(both, (0.03, 0.08)):
        alone = posthoc.synthesize(tmp_path, sigma_rel=sigma, time=50)
        assert sd.keys() == alone.keys() and all(torch.equal(sd[k], alone[k]) for k in sd)


def test_a_crash_mid_write_leaves_nothing_to_read(tmp_path, monkeypatch):
    _, opt, _ = run_with_snapshots(tmp_path, 0.05, steps=20)
    before = sorted(p.name for p in tmp_path.iterdir())
    real_save = torch.save

    def crash(obj, f, *args, **kw):
        f.write(b"half a snapshot")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    train_step(opt.model, opt, batches(1)[0])
    with pytest.raises(OSError, match="disk full"):
        posthoc.save_snapshot(opt, tmp_path)
    monkeypatch.setattr(torch, "save", real_save)
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert posthoc.synthesize(tmp_path, sigma_rel=0.05).keys() == opt.model.state_dict().keys()


def test_a_resumed_run_is_one_run(tmp_path):
    _, opt, _ = run_with_snapshots(tmp_path, 0.05, steps=20)
    model = make_model()
    resumed = EMAOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), momentum=PowerFunction(sigma_rel=0.05),
                           model=model)
    resumed.load_state_dict(opt.state_dict())
    model.load_state_dict(opt.model.state_dict())
    for batch in batches(10):
        train_step(model, resumed, batch)
    posthoc.save_snapshot(resumed, tmp_path)
    assert len(list(tmp_path.glob("snapshot-*.pt"))) == 3
    posthoc.synthesize(tmp_path, sigma_rel=0.08)


def test_snapshots_of_two_runs_are_refused(tmp_path):
    run_with_snapshots(tmp_path, 0.05, steps=20)
    model = make_model()
    other = EMAOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), momentum=PowerFunction(sigma_rel=0.05),
                         model=model)
    for batch in batches(30):
        train_step(model, other, batch)
    posthoc.save_snapshot(other, tmp_path)
    with pytest.raises(ValueError, match="snapshots of 2 different runs"):
        posthoc.synthesize(tmp_path, sigma_rel=0.08)


# --- ema-pytorch's PostHocEMA on the same run ---------------------------------------------------
#
# Its KarrasEMA counts update() calls in a `step` buffer: call n (1-based) first sets step = n, then
# lerps by 1 - beta with beta = (1 - 1 / (n + 1)) ** (gamma + 1), after copying the params on the
# first call. That is our PowerFunction's momentum at t = n, where our n-th step uses t = n - 1:
# its EMA after n calls is the power-function average of n + 1 steps whose first two both saw the
# first params, i.e. ours after num_steps = n + 1 on that sequence. Our schedule
# CopyUntil(Recount(PowerFunction(...), start=1)) reproduces it. Its checkpoint after call n is
# labelled n, and its synthesis solves EDM2's Algorithm 3 with those labels, without normalising
# the weights to sum 1.

SIGMA_RELS = (0.05, 0.10)


def power_average(gamma, history, steps):
    """Float64 power-function EMA after ``steps`` steps that saw ``history[t]`` at step t."""
    w = [((t + 1) ** (gamma + 1) - t ** (gamma + 1)) / steps ** (gamma + 1) for t in range(steps)]
    return [sum(wt * h[k] for wt, h in zip(w, history)) for k in range(len(history[0]))]


def run_beside_post_hoc_ema(folder, steps=60, every=10):
    """One training run with our profiles (EDM2's clock, and ema-pytorch's through a shifted
    schedule) and ema-pytorch's PostHocEMA, both snapshotting every ``every`` steps (theirs as
    float32). Yields after every step: (n, model, ours, theirs, float64 params of every step so far)."""
    ema_pytorch = pytest.importorskip("ema_pytorch")
    model = make_model()
    theirs = ema_pytorch.PostHocEMA(model, sigma_rels=SIGMA_RELS, update_every=1, checkpoint_every_num_steps=every,
                                    checkpoint_folder=str(folder / "theirs"), checkpoint_dtype=torch.float32)
    momentum = {}
    for s in SIGMA_RELS:
        momentum[f"{s}"] = PowerFunction(sigma_rel=s)
        momentum[f"{s} as ema-pytorch"] = schedules.CopyUntil(schedules.Recount(PowerFunction(sigma_rel=s), start=1))
    ours = EMAOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), momentum=momentum, model=model)
    history = []
    for n, batch in enumerate(batches(steps), 1):
        train_step(model, ours, batch)
        theirs.update()
        history.append([p.detach().double().clone() for p in model.parameters()])
        if n % every == 0:
            posthoc.save_snapshot(ours, folder / "ours")  # the two PowerFunction profiles only
        yield n, model, ours, theirs, history


def test_ema_pytorch_post_hoc_ema_is_our_profile_one_step_later(tmp_path):
    names = None
    for n, model, ours, theirs, history in run_beside_post_hoc_ema(tmp_path):
        names = names or [name for name, _ in model.named_parameters()]
        scale = [torch.stack([h[k].abs() for h in history]).amax(0) for k in range(len(names))]
        for s, karras in zip(SIGMA_RELS, theirs.ema_models):
            gamma = ours.schedules[f"{s}"].gamma
            assert karras.gamma == pytest.approx(gamma, rel=1e-12) and int(karras.step) == n
            if n > 1:  # its momentum of call n is ours at t = n (call 1 copies)
                assert 1 - karras.beta == pytest.approx(PowerFunction(gamma=gamma)(n), rel=1e-12, abs=0)
            edm2_clock = power_average(gamma, history, n)
            their_clock = power_average(gamma, history[:1] + history, n + 1)  # first params seen twice
            got = {"theirs": dict(karras.ema_model.named_parameters()), "ours": ours.ema_state_dict(f"{s}"),
                   "ours shifted": ours.ema_state_dict(f"{s} as ema-pytorch")}
            for k, name in enumerate(names):
                assert_ulps(got["ours"][name], edm2_clock[k], scale=scale[k], ulps=64)
                assert_ulps(got["theirs"][name], their_clock[k], scale=scale[k], ulps=64)
                assert_ulps(got["ours shifted"][name], their_clock[k], scale=scale[k], ulps=64)
            if n >= 2:  # the one-step shift is real: our EDM2-clock EMA is not theirs
                flat = {who: torch.cat([got[who][name].detach().flatten() for name in names]) for who in ("ours", "theirs")}
                assert not torch.allclose(flat["ours"], flat["theirs"], rtol=1e-4, atol=0)


def test_synthesis_solves_the_same_problem_as_ema_pytorch(tmp_path):
    from ema_pytorch.post_hoc_ema import solve_weights as their_solve

    *_, (n, model, ours, theirs, history) = run_beside_post_hoc_ema(tmp_path, steps=60, every=10)
    target = PowerFunction(sigma_rel=0.08).gamma
    gammas = [ours.schedules[f"{s}"].gamma for s in SIGMA_RELS]
    times = [t for t in range(10, n + 1, 10) for _ in SIGMA_RELS]
    gamma_in = [g for _ in range(10, n + 1, 10) for g in gammas]
    raw = their_solve(torch.tensor(times), torch.tensor(gamma_in, dtype=torch.float64), torch.tensor([n]),
                      torch.tensor([target], dtype=torch.float64))[:, 0]
    # The same Algorithm 3: its weights, normalised, are ours; it does not normalise them.
    torch.testing.assert_close(raw / raw.sum(), posthoc.solve_weights(times, gamma_in, n, [target])[:, 0],
                               rtol=1e-12, atol=1e-15)
    assert abs(float(raw.sum()) - 1) > 1e-3

    names = [name for name, _ in model.named_parameters()]
    synthesized = dict(theirs.synthesize_ema_model(sigma_rel=0.08).ema_model.named_parameters())
    mine = posthoc.synthesize(tmp_path / "ours", sigma_rel=0.08)
    ours_w = posthoc.solve_weights(times, gamma_in, n, [target])[:, 0]
    for k, name in enumerate(names):
        # Theirs: its unnormalised weights on its checkpoints, labelled n and holding the EMA of n + 1 steps.
        their_parts = [float(w) * power_average(g, history[:1] + history, t + 1)[k]
                       for w, t, g in zip(raw, times, gamma_in)]
        # Ours: normalised weights on our snapshots, labelled num_steps and holding the EMA of that many steps.
        our_parts = [float(w) * power_average(g, history, t)[k] for w, t, g in zip(ours_w, times, gamma_in)]
        for got, parts in ((synthesized[name], their_parts), (mine[name], our_parts)):
            parts = torch.stack(parts)
            assert_ulps(got, parts.sum(0), scale=parts.abs().sum(0), ulps=8)  # float32 EMAs, summed in float32
