"""state_dict / load_state_dict: resume continues bitwise; bad dicts are refused whole."""

import copy
import pickle

import pytest
import torch
from conftest import DEVICE
from models import Net, batches, make_model, roundtrip, train_step

from triton_ema import EMAOptimizer
from triton_ema.schedules import Cosine, Warmup


def build(seed=0, interval=3, dtype=torch.float32, backend="torch", **kw):
    model = make_model(dtype, seed=seed, device=DEVICE)
    base = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1, eps=1e-3)
    opt = EMAOptimizer(base, momentum=Cosine(0.3, 0.05, total_steps=8, warm_up=3), interval=interval, model=model,
                       update_buffers=True, backend=backend, **kw)
    return model, opt


def ema_values(opt):
    ema = opt.state_dict()["ema"]
    return [v.clone() for v in ema["shadow"].values()] + [v.clone() for v in ema["buffers"].values()]


def bitwise_equal(xs, ys):
    return len(xs) == len(ys) and all(x.dtype == y.dtype and torch.equal(x, y) for x, y in zip(xs, ys))


@pytest.mark.parametrize("stop", [1, 4, 5])  # after, inside and at the end of an interval cycle
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_resume_continues_bitwise(stop, dtype, backend):
    data = batches(9, dtype, device=DEVICE)
    model, opt = build(dtype=dtype, backend=backend)
    for batch in data:
        train_step(model, opt, batch)

    first, opt1 = build(dtype=dtype, backend=backend)
    for batch in data[:stop]:
        train_step(first, opt1, batch)
    ckpt = roundtrip({"model": first.state_dict(), "opt": opt1.state_dict()})

    resumed, opt2 = build(seed=123, dtype=dtype, backend=backend)  # other initial weights: all must come from ckpt
    resumed.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    assert opt2.num_steps == stop
    for batch in data[stop:]:
        train_step(resumed, opt2, batch)

    assert bitwise_equal(list(resumed.state_dict().values()), list(model.state_dict().values()))
    assert bitwise_equal(ema_values(opt2), ema_values(opt))


def test_state_dict_layout():
    model, opt = build()
    train_step(model, opt, batches(1, device=DEVICE)[0])
    sd = opt.state_dict()
    assert {"state", "param_groups", "ema"} <= sd.keys()
    ema = sd["ema"]
    assert ema["step"] == 1 and ema["interval"] == 3
    params = list(model.parameters())
    assert sorted(ema["shadow"]) == list(range(len(params))) == sorted(sd["state"])
    assert all(ema["shadow"][i].shape == p.shape for i, p in enumerate(params))
    # No second copy: the shadows are views of one flat buffer.
    storages = {t.untyped_storage().data_ptr() for t in ema["shadow"].values()}
    assert len(storages) == 1


def test_bare_optimizer_checkpoint_loads_with_a_warning():
    model, opt = build()
    for batch in batches(2, device=DEVICE):
        train_step(model, opt, batch)
    bare = torch.optim.AdamW(make_model(device=DEVICE).parameters(), lr=0.05)
    with pytest.warns(UserWarning, match="no 'ema' entry"):
        opt.load_state_dict(roundtrip(bare.state_dict()))
    for shadow, p in zip(opt.state_dict()["ema"]["shadow"].values(), model.parameters()):
        assert torch.equal(shadow, p.detach())


def corrupt(edit):
    def make(sd):
        edit(sd)
        return sd
    return make


@pytest.mark.parametrize("edit, error, match", [
    (lambda sd: sd["ema"]["shadow"].__setitem__(1, torch.zeros(3, 3)), ValueError, "shadow of conv.weight has shape"),
    (lambda sd: sd["ema"]["shadow"].__setitem__(0, sd["ema"]["shadow"][0].half()), ValueError, "shadow of scale has dtype"),
    (lambda sd: sd["ema"]["shadow"].pop(4), ValueError, "no shadow for bn.bias"),
    (lambda sd: sd["ema"]["shadow"].__setitem__(99, torch.zeros(1)), ValueError, "does not track: \\[99\\]"),
    (lambda sd: sd["ema"]["buffers"].pop("bn.running_var"), ValueError, "no shadow for bn.running_var"),
    (lambda sd: sd["ema"]["shadow"].__setitem__(1, [1.0]), TypeError, "not a tensor"),
    (lambda sd: sd["ema"].__setitem__("step", -1), ValueError, "non-negative integer"),
    (lambda sd: sd["ema"].pop("shadow"), ValueError, "lacks \\['shadow'\\]"),
    (lambda sd: sd.__setitem__("ema", [1, 2]), TypeError, "must be a dict"),
    (lambda sd: sd["param_groups"].append(sd["param_groups"][0]), ValueError, "parameter group"),
], ids=["shape", "dtype", "missing", "extra", "buffer", "type", "step", "key", "ema-type", "base"])
def test_bad_state_dict_is_refused_and_nothing_changes(edit, error, match):
    model, opt = build()
    for batch in batches(2, device=DEVICE):
        train_step(model, opt, batch)
    sd = roundtrip(opt.state_dict())
    train_step(model, opt, batches(1, seed=5, device=DEVICE)[0])
    before = (ema_values(opt), opt.num_steps, roundtrip(opt.optimizer.state_dict()))
    edit(sd)
    with pytest.raises(error, match=match):
        opt.load_state_dict(sd)
    assert bitwise_equal(ema_values(opt), before[0]) and opt.num_steps == before[1]
    after = opt.optimizer.state_dict()
    assert after["param_groups"] == before[2]["param_groups"]
    assert all(torch.equal(after["state"][i]["exp_avg"], before[2]["state"][i]["exp_avg"]) for i in after["state"])


def test_interval_change_on_resume_warns():
    model, opt = build(interval=3)
    sd = roundtrip(opt.state_dict())
    _, other = build(interval=2)
    with pytest.warns(UserWarning, match="interval=3"):
        other.load_state_dict(sd)


def test_ema_state_dict_loads_into_the_model():
    model, opt = build(dtype=torch.bfloat16)
    for batch in batches(3, torch.bfloat16, device=DEVICE):
        train_step(model, opt, batch)
    ema = roundtrip(opt.ema_state_dict())
    assert ema.keys() == model.state_dict().keys()
    assert all(ema[k].dtype == v.dtype for k, v in model.state_dict().items())
    with opt.swap_ema():
        swapped = {k: v.clone() for k, v in model.state_dict().items()}
    deployed = make_model(torch.bfloat16, seed=9, device=DEVICE)
    deployed.load_state_dict(ema)
    assert all(torch.equal(v, swapped[k]) for k, v in deployed.state_dict().items())


def test_ema_state_dict_follows_buffers_the_model_replaced():
    """``model.double()`` replaces the buffer objects: what maps the model's tensors to the EMA follows them."""
    model, opt = build(interval=1)
    for batch in batches(2, device=DEVICE):
        train_step(model, opt, batch)
    before = clones(opt.ema_state_dict())
    assert not torch.equal(before["bn.running_var"], model.bn.running_var)
    model.double()
    after = clones(opt.ema_state_dict())
    assert same(after, {k: v.double() if v.is_floating_point() else v for k, v in before.items()})
    # load_ema_state_dict finds every averaged buffer too, and takes the model's new dtype.
    opt.load_ema_state_dict(after, num_steps=2)
    assert same(opt.ema_state_dict(), after)


def test_ema_state_dict_needs_the_model():
    opt = EMAOptimizer(torch.optim.SGD(make_model().parameters(), lr=0.1), momentum=Warmup(0.1))
    with pytest.raises(RuntimeError, match="pass model="):
        opt.ema_state_dict()


def clones(sd):
    return {k: v.clone() for k, v in sd.items()}


def same(a, b):
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_ema_state_dict_keeps_what_it_held(dtype, backend):
    model, opt = build(dtype=dtype, backend=backend, interval=1)
    data = batches(4, dtype, device=DEVICE)
    for batch in data[:2]:
        train_step(model, opt, batch)
    early = opt.ema_state_dict()
    expected_early = clones(early)
    with opt.swap_ema():
        assert same(early, expected_early)  # also while a swap is active
        inside = opt.ema_state_dict()
        expected_inside = clones(inside)
    for batch in data[2:]:
        train_step(model, opt, batch)  # moves the weights, the EMA and num_batches_tracked
    assert same(early, expected_early) and same(inside, expected_inside) and same(early, inside)
    assert not same(opt.ema_state_dict(), early)


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copied_optimizer_keeps_the_ema_and_trains_on(how, backend):
    model, opt = build(backend=backend, interval=2)
    data = batches(6, device=DEVICE)
    for batch in data[:3]:
        train_step(model, opt, batch)
    other = copy.deepcopy(opt) if how == "deepcopy" else pickle.loads(pickle.dumps(opt))
    twin = other.model
    assert twin is not model and isinstance(twin, Net)
    assert [id(p) for p in other.param_groups[0]["params"]] == [id(p) for p in twin.parameters()]
    assert (other.num_steps, other.interval, other.schedule, other.update_buffers) == (3, 2, opt.schedule, True)
    assert bitwise_equal(ema_values(other), ema_values(opt))
    for batch in data[3:]:
        train_step(model, opt, batch)
        train_step(twin, other, batch)
    # The copy continues exactly as the original, on its own storage.
    assert bitwise_equal(ema_values(other), ema_values(opt))
    assert bitwise_equal(list(twin.state_dict().values()), list(model.state_dict().values()))
    with other.swap_ema():
        assert same(twin.state_dict(), opt.ema_state_dict())


class Renamed(torch.nn.Module):
    """Net's tensors, in the same order and shapes, under other names."""

    def __init__(self):
        super().__init__()
        self.inner = Net()

    def forward(self, x):
        return self.inner(x)


def test_checkpoint_of_another_model_is_refused_by_name():
    model, opt = build()
    train_step(model, opt, batches(1, device=DEVICE)[0])
    sd = roundtrip(opt.state_dict())
    assert sd["ema"]["names"][:2] == ["scale", "conv.weight"]
    other = Renamed().to(DEVICE)
    other_opt = EMAOptimizer(torch.optim.AdamW(other.parameters(), lr=0.05), momentum=0.1, interval=3, model=other,
                             update_buffers=True)
    before = ema_values(other_opt)
    with pytest.raises(ValueError, match="shadow 0 is for 'scale', this model's parameter 0 is 'inner.scale'"):
        other_opt.load_state_dict(sd)
    assert bitwise_equal(ema_values(other_opt), before)
    # A deliberate rename: by position, buffers too.
    other_opt.load_state_dict(sd, match_names=False)
    assert bitwise_equal(ema_values(other_opt), ema_values(opt))


def test_checkpoint_without_names_loads_by_position():
    model, opt = build()
    train_step(model, opt, batches(1, device=DEVICE)[0])
    sd = roundtrip(opt.state_dict())
    del sd["ema"]["names"]  # as saved before names were
    _, fresh = build(seed=4)
    fresh.load_state_dict(sd)
    assert bitwise_equal(ema_values(fresh), ema_values(opt))
