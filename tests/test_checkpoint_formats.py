"""Checkpoints written by earlier versions (tests/data) load bitwise, and the run continues from them."""

import importlib.util
from pathlib import Path

import pytest
import torch
from conftest import assert_ulps

from triton_ema.schedules import momentum_at

DATA = Path(__file__).parent / "data"
_spec = importlib.util.spec_from_file_location("make_checkpoints", DATA / "make_checkpoints.py")
make_checkpoints = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_checkpoints)


def assert_same(saved, loaded, where="state_dict"):
    """Every key, value, dtype and bit of ``saved`` is in ``loaded``."""
    if isinstance(saved, dict):
        assert isinstance(loaded, dict) and saved.keys() == loaded.keys(), where
        for key in saved:
            assert_same(saved[key], loaded[key], f"{where}[{key!r}]")
    elif isinstance(saved, torch.Tensor):
        assert isinstance(loaded, torch.Tensor) and loaded.dtype == saved.dtype, where
        assert torch.equal(loaded.detach().cpu().reshape(-1).view(torch.uint8), saved.reshape(-1).view(torch.uint8)), where
    else:
        assert loaded == saved, where


def profiles(ema):
    """(profile name, its shadows: params then buffers) of a saved ``"ema"`` entry."""
    entries = ema["profiles"].items() if "profiles" in ema else [(None, ema)]
    return [(name, [*e["shadow"].values(), *e["buffers"].values()]) for name, e in entries]


@pytest.mark.parametrize("name", list(make_checkpoints.BUILDS))
def test_a_checkpoint_of_an_earlier_version_loads_bitwise_and_continues(name):
    saved = torch.load(DATA / f"{name}.pt", weights_only=True)
    build, steps = make_checkpoints.BUILDS[name]
    net, opt = build()
    opt.load_state_dict(saved)
    assert opt.num_steps == saved["ema"]["step"] == steps
    assert_same(saved, opt.state_dict())
    if opt.model is not None:  # the deployable EMA weights are the saved shadows, in the model's dtypes
        entries = saved["ema"]["profiles"] if "profiles" in saved["ema"] else {None: saved["ema"]}
        for profile, entry in entries.items():
            weights = opt.ema_state_dict(profile)
            named = {**dict(zip(saved["ema"]["names"], entry["shadow"].values())), **entry["buffers"]}
            for key, shadow in named.items():
                assert torch.equal(weights[key], shadow.to(weights[key].dtype)), (profile, key)

    # One more step from the saved state: every shadow moves by the schedule at t = steps (or
    # stays, between updates), against a float64 reference.
    before = [(k, [s.double() for s in shadows]) for k, shadows in profiles(saved["ema"])]
    make_checkpoints.train(net, opt, 1, seed=2)
    tensors = [p.detach().double() for p in net.parameters()]
    if opt.update_buffers:
        tensors += [net[1].running_mean.double(), net[1].running_var.double()]
    after = profiles(opt.state_dict()["ema"])
    for (profile, old), (_, new) in zip(before, after):
        m = momentum_at(opt.schedules[profile], steps) if steps % opt.interval == 0 else 0.0
        for s, s0, p in zip(new, old, tensors, strict=True):
            assert_ulps(s, s0 + m * (p - s0), scale=torch.maximum(s0.abs(), p.abs()))
