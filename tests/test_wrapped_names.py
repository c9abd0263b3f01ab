"""Checkpoints and EMA state dicts of a wrapped model load into the bare model and the reverse:
DDP, DataParallel and mmengine's wrapper (``module.``), torch.compile (``_orig_mod.``), FSDP1
(``_fsdp_wrapped_module.``) and activation checkpointing (``_checkpoint_wrapped_module.``), the real
wrappers on the CPU (DDP, mmengine's and FSDP1 in a one-process gloo group)."""

import re
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from models import Net, batches, make_model, roundtrip, train_step
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

import triton_ema
from triton_ema import EMAOptimizer, attach, posthoc, schedules
from triton_ema.names import canonical, rekeyed, unwrapped, wrapper_difference


@pytest.fixture(scope="module")
def process_group():
    """A one-process gloo group for the wrappers that need one (DDP, mmengine's, FSDP1)."""
    dist.init_process_group("gloo", world_size=1, rank=0, store=dist.HashStore())
    yield
    dist.destroy_process_group()


def ddp(model):
    return nn.parallel.DistributedDataParallel(model)


def mmengine_ddp(model):
    from mmengine.model import MMDistributedDataParallel

    return MMDistributedDataParallel(module=model)


def fsdp1(model):
    """FSDP1 per layer, as an auto-wrap policy applies it (it refuses Net's 0-d parameter at the root)."""
    from torch.distributed.fsdp import FullyShardedDataParallel, ShardingStrategy

    with warnings.catch_warnings():  # FSDP1 is deprecated in favour of fully_shard: it says so
        warnings.simplefilter("ignore", FutureWarning)
        for name in ("conv", "fc"):
            setattr(model, name, FullyShardedDataParallel(getattr(model, name), device_id=torch.device("cpu"),
                                                          use_orig_params=True, sharding_strategy=ShardingStrategy.NO_SHARD))
    return model


def checkpointed(model):
    """Activation checkpointing as it is applied, per layer: the prefix inside the names."""
    model.conv = checkpoint_wrapper(model.conv)
    model.fc = checkpoint_wrapper(model.fc)
    return model


WRAPPERS = {
    "ddp": (ddp, "module.conv.weight", True),
    "dataparallel": (nn.DataParallel, "module.conv.weight", False),
    "mmengine": (mmengine_ddp, "module.conv.weight", True),
    "compile": (torch.compile, "_orig_mod.conv.weight", False),
    "fsdp1": (fsdp1, "conv._fsdp_wrapped_module.weight", True),
    "checkpoint_wrapper": (checkpointed, "conv._checkpoint_wrapped_module.weight", False),
}


@pytest.fixture(params=list(WRAPPERS))
def wrap(request):
    make, name, needs_group = WRAPPERS[request.param]
    if needs_group:
        request.getfixturevalue("process_group")
    if request.param == "mmengine":
        pytest.importorskip("mmengine")
    return request.param, make, name


def trained(wrapper=None, seed=0, steps=2, front="wrapper", **kw):
    """A model (wrapped by ``wrapper``) and its EMA after ``steps`` steps of the same data."""
    bare = make_model(seed=seed)
    model = bare if wrapper is None else wrapper(bare)
    params = list(model.parameters())
    base = torch.optim.AdamW(params, lr=0.05, eps=1e-3)
    kw = dict(momentum=0.3, model=model, update_buffers=True, **kw)
    opt = EMAOptimizer(base, **kw) if front == "wrapper" else attach(base, **kw)
    # Forward through the wrapper, but for torch.compile: compiling costs seconds and its names do not change.
    forward = getattr(model, "_orig_mod", model)
    for batch in batches(steps, seed=seed + 1):
        train_step(forward, base if front == "attach" else opt, batch)
    return model, opt


def ema_values(opt):
    ema = opt.state_dict()["ema"]
    return [v.clone() for v in ema["shadow"].values()] + [v.clone() for v in ema["buffers"].values()]


def assert_bitwise(xs, ys):
    assert len(xs) == len(ys)
    for x, y in zip(xs, ys):
        assert x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y)


def averaged(sd):
    """The averaged entries of Net's state dict (every float one), by unwrapped name."""
    return {unwrapped(k): v for k, v in sd.items() if v.is_floating_point()}


@pytest.mark.parametrize("front", ["wrapper", "attach"])
def test_checkpoint_of_a_wrapped_model_loads_into_the_bare_one_and_back(wrap, front):
    kind, make, name = wrap
    model, opt = trained(make, front=front)
    assert name in opt.core.names  # the wrapper's names are what the EMA knows
    # Saved wrapped, loaded bare.
    _, bare_opt = trained(None, seed=5, steps=1, front=front)
    bare_opt.load_state_dict(roundtrip(opt.state_dict()))
    assert_bitwise(ema_values(bare_opt), ema_values(opt))
    assert bare_opt.num_steps == opt.num_steps
    # Saved bare, loaded wrapped.
    _, source = trained(None, seed=7, steps=3, front=front)
    _, wrapped_opt = trained(make, seed=9, steps=1, front=front)
    wrapped_opt.load_state_dict(roundtrip(source.state_dict()))
    assert_bitwise(ema_values(wrapped_opt), ema_values(source))


def test_ema_state_dict_of_a_wrapped_model(wrap):
    kind, make, _ = wrap
    model, opt = trained(make)
    ema = opt.ema_state_dict()
    assert list(ema) == list(model.state_dict())  # keyed like the wrapper's state dict, loadable into it
    model.load_state_dict(ema)
    # Every averaged entry holds the EMA (FSDP1's state dict holds copies of the parameters: found by name).
    saved = opt.state_dict()["ema"]
    expected = dict(zip(saved["names"], saved["shadow"].values())) | saved["buffers"]
    assert expected.keys() == averaged(ema).keys()
    assert_bitwise([averaged(ema)[k] for k in expected], list(expected.values()))
    # The bare model, in one line.
    bare = make_model(seed=3)
    bare.load_state_dict(triton_ema.load_ema_weights(opt.state_dict(), model=bare))
    assert_bitwise(list(averaged(bare.state_dict()).values()), list(averaged(ema).values()))


def test_load_ema_state_dict_across_wrappers(wrap):
    kind, make, _ = wrap
    model, opt = trained(make)
    _, bare_opt = trained(None, seed=5, steps=1)
    bare_opt.load_ema_state_dict(opt.ema_state_dict(), num_steps=2)
    assert_bitwise(list(averaged(bare_opt.ema_state_dict()).values()), list(averaged(opt.ema_state_dict()).values()))
    _, source = trained(None, seed=7, steps=3)
    _, wrapped_opt = trained(make, seed=9, steps=1)
    wrapped_opt.load_ema_state_dict(source.ema_state_dict(), num_steps=3)
    assert_bitwise(ema_values(wrapped_opt), ema_values(source))


class Renamed(nn.Module):
    """Net's tensors, in the same order and shapes, under other names."""

    def __init__(self):
        super().__init__()
        self.inner = Net()


def test_a_checkpoint_of_another_model_still_fails_naming_both_names(wrap):
    kind, make, name = wrap
    _, opt = trained(make)
    other = Renamed()
    other_opt = EMAOptimizer(torch.optim.AdamW(other.parameters(), lr=0.05), momentum=0.3, model=other,
                             update_buffers=True)
    before = ema_values(other_opt)
    theirs = unwrapped(opt.core.names[0])
    with pytest.raises(ValueError, match=f"shadow 0 is for '{theirs}', this model's parameter 0 is 'inner.scale' "
                                         r"\(a checkpoint of another model\?\)"):
        other_opt.load_state_dict(opt.state_dict())
    first = next(iter(opt.ema_state_dict()))
    with pytest.raises(ValueError, match=rf"entries the model does not: \['{re.escape(first)}', .*\(the model's first "
                                         r"are \['inner.scale', 'inner.conv.weight'"):
        other_opt.load_ema_state_dict(opt.ema_state_dict(), num_steps=1)
    assert_bitwise(ema_values(other_opt), before)


def test_a_submodule_wrapped_on_one_side_is_named_in_the_error():
    """A ``module.`` inside a name is kept (it may be a submodule's own name); the error says what differs."""
    _, opt = trained(None)
    model = make_model(seed=2)
    model.fc = nn.DataParallel(model.fc)
    other = EMAOptimizer(torch.optim.AdamW(model.parameters(), lr=0.05), momentum=0.3, model=model, update_buffers=True)
    with pytest.raises(ValueError, match="shadow 5 is for 'fc.weight', this model's parameter 5 is 'fc.module.weight' "
                                         r"\('fc.weight' and 'fc.module.weight' differ only by 'module.' components"):
        other.load_state_dict(opt.state_dict())
    other.load_state_dict(opt.state_dict(), match_names=False)
    assert_bitwise(ema_values(other), ema_values(opt))


@pytest.mark.parametrize("kind", ["compile", "checkpoint_wrapper"])
def test_distributed_checkpoint_across_wrappers(kind, tmp_path):
    """``dcp.load`` matches the keys of the loading side's state dict: the buffers' names must agree."""
    make, _, _ = WRAPPERS[kind]
    _, opt = trained(make)
    with warnings.catch_warnings():  # one process, on purpose
        warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        dcp.save({"ema": opt.ema_checkpoint}, checkpoint_id=tmp_path / "wrapped")
        _, bare_opt = trained(None, seed=5, steps=1)
        dcp.load({"ema": bare_opt.ema_checkpoint}, checkpoint_id=tmp_path / "wrapped")
        assert_bitwise(ema_values(bare_opt), ema_values(opt))
        dcp.save({"ema": bare_opt.ema_checkpoint}, checkpoint_id=tmp_path / "bare")
        _, wrapped_opt = trained(make, seed=9, steps=1)
        dcp.load({"ema": wrapped_opt.ema_checkpoint}, checkpoint_id=tmp_path / "bare")
    assert_bitwise(ema_values(wrapped_opt), ema_values(opt))


def test_snapshots_of_a_wrapped_model_and_the_bare_one_combine(tmp_path):
    """A run on DataParallel, resumed on the bare model: one run's snapshots, keyed like the bare model."""
    profile = schedules.PowerFunction(gamma=6.94)
    bare = make_model()
    wrapped = nn.DataParallel(bare)
    opt = EMAOptimizer(torch.optim.AdamW(wrapped.parameters(), lr=0.05, eps=1e-3), momentum=profile, model=wrapped,
                       update_buffers=True)
    data = batches(4, seed=1)
    for batch in data[:2]:
        train_step(wrapped, opt, batch)
    posthoc.save_snapshot(opt, tmp_path)
    resumed_model = make_model(seed=4)
    resumed_model.load_state_dict(bare.state_dict())
    resumed = EMAOptimizer(torch.optim.AdamW(resumed_model.parameters(), lr=0.05, eps=1e-3), momentum=profile,
                           model=resumed_model, update_buffers=True)
    resumed.load_state_dict(roundtrip(opt.state_dict()))
    for batch in data[2:]:
        train_step(resumed_model, resumed, batch)
    posthoc.save_snapshot(resumed, tmp_path)
    out = posthoc.synthesize(tmp_path, gamma=6.94)
    assert out.keys() == resumed_model.state_dict().keys()
    # The last snapshot alone is the EMA of that profile at that time: the synthesis of its own gamma gives it.
    last = resumed.ema_state_dict()
    for key in ("conv.weight", "bn.running_mean"):
        torch.testing.assert_close(out[key], last[key], rtol=1e-5, atol=1e-6)


def test_names_without_wrappers():
    assert unwrapped("module._orig_mod.fc._checkpoint_wrapped_module.weight") == "fc.weight"
    assert unwrapped("encoder.module.weight") == "encoder.module.weight"  # a submodule named module stays
    assert canonical(["module.a", "module.b"]) == ["a", "b"]
    assert canonical(["module.a", "a"]) == ["module.a", "a"]  # unwrapping would join two: kept as they are
    assert wrapper_difference("fc.weight", "fc.module.weight").startswith(" ('fc.weight' and 'fc.module.weight' differ")
    assert rekeyed({"module.a": 1, "b": 2}, ["a", "b"], "x") == {"a": 1, "b": 2}
    assert rekeyed({"module.a": 1}, ["module.a", "a"], "x") == {"module.a": 1}  # exact names first
    with pytest.raises(ValueError, match="x has two entries for 'a': 'a' and 'module.a'"):
        rekeyed({"a": 1, "module.a": 2}, ["a"], "x")
