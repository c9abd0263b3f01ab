"""``opt.ema_module()``: the EMA as a module whose tensors are the EMA storage, following it
through steps, dtypes, buffers, swaps and replaced storage; a BYOL-style target network."""

import copy
import math
import pickle

import pytest
import torch
from conftest import DEVICE, assert_ulps
from models import batches, make_base, make_model, train_step
from torch import nn

from triton_ema import EMAOptimizer
from triton_ema.schedules import Cosine


def wrapper(backend, model=None, momentum=0.3, base="adamw", **kw):
    model = make_model(device=DEVICE) if model is None else model
    return model, EMAOptimizer(make_base(base, model.parameters()), momentum=momentum, model=model,
                               backend=backend, **kw)


def assert_shows_the_ema(module, opt, name=None):
    expected = opt.ema_state_dict(name)
    got = module.state_dict()
    assert got.keys() == expected.keys()
    for key, value in got.items():
        assert torch.equal(value.to(expected[key].dtype), expected[key]), key


def test_its_tensors_are_the_ema_storage_and_follow_every_step(backend):
    model, opt = wrapper(backend)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    target = opt.ema_module()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the model is untouched
    assert type(target) is type(model) and target is not model
    assert not any(p.requires_grad for p in target.parameters())
    assert not any(p is q for p in target.parameters() for q in model.parameters())
    for i, p in enumerate(target.parameters()):  # aliases of the shadows, not copies
        assert p.data_ptr() == opt.core.store.ema(i).data_ptr()
    for batch in batches(4, device=DEVICE):
        train_step(model, opt, batch)
        assert_shows_the_ema(target, opt)
    assert opt.ema_module() is target  # the same object keeps following


def test_writes_to_it_are_writes_to_the_ema(backend):
    model, opt = wrapper(backend)
    target = opt.ema_module()
    with torch.no_grad():
        target.fc.bias.fill_(7.0)
    assert torch.equal(opt.ema_state_dict()["fc.bias"], torch.full_like(model.fc.bias, 7.0))


def test_a_forward_matches_swap_ema_and_leaves_the_model_alone(backend):
    model, opt = wrapper(backend)
    for batch in batches(3, device=DEVICE):
        train_step(model, opt, batch)
    x = batches(1, seed=5, device=DEVICE)[0][0]
    target = opt.ema_module().eval()
    model.eval()
    with opt.swap_ema():
        expected = model(x)
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    assert torch.equal(target(x), expected)
    assert all(torch.equal(v, trained[k]) for k, v in model.state_dict().items())


def test_bf16_params_give_a_float32_module_without_a_copy(backend):
    model, opt = wrapper(backend, model=make_model(dtype=torch.bfloat16, device=DEVICE))
    target = opt.ema_module()
    assert {p.dtype for p in target.parameters()} == {torch.float32}  # the shadows as stored
    train_step(model, opt, batches(1, dtype=torch.bfloat16, device=DEVICE)[0])
    for i, p in enumerate(target.parameters()):
        assert p.data_ptr() == opt.core.store.ema(i).data_ptr()
    assert_shows_the_ema(target, opt)
    x = batches(1, device=DEVICE)[0][0]
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        assert target.eval()(x.to(torch.bfloat16)).isfinite().all()


def test_profiles_each_have_their_module(backend):
    model, opt = wrapper(backend, momentum={"fast": 0.5, "slow": 0.01})
    fast, slow = opt.ema_module("fast"), opt.ema_module("slow")
    for batch in batches(3, device=DEVICE):
        train_step(model, opt, batch)
    assert_shows_the_ema(fast, opt, "fast")
    assert_shows_the_ema(slow, opt, "slow")
    assert not torch.equal(fast.fc.weight, slow.fc.weight)
    with pytest.raises(ValueError, match="several profiles"):
        opt.ema_module()


def test_averaged_buffers_are_the_ema_and_a_train_forward_cannot_change_them(backend):
    model, opt = wrapper(backend, update_buffers=True)
    target = opt.ema_module()
    train_step(model, opt, batches(1, device=DEVICE)[0])
    ema = opt.ema_state_dict()
    x = batches(1, seed=7, device=DEVICE)[0][0]
    with pytest.warns(UserWarning, match="bn.running_mean, bn.running_var changed in a forward of the EMA module"):
        target.train()(x)
    assert all(torch.equal(v, ema[k]) for k, v in opt.ema_state_dict().items())
    assert torch.equal(target.bn.running_var, ema["bn.running_var"])


def test_buffers_not_averaged_follow_the_model_and_a_forward_never_writes_the_model(backend):
    model, opt = wrapper(backend)  # update_buffers=False: BatchNorm statistics are the model's
    target = opt.ema_module()
    train_step(model, opt, batches(1, device=DEVICE)[0])
    assert torch.equal(target.bn.running_mean, model.bn.running_mean)
    assert target.bn.running_mean.data_ptr() != model.bn.running_mean.data_ptr()  # a copy
    stats = model.bn.running_mean.clone(), model.bn.num_batches_tracked.clone()
    target.train()(batches(1, seed=7, device=DEVICE)[0][0])
    assert torch.equal(model.bn.running_mean, stats[0]) and torch.equal(model.bn.num_batches_tracked, stats[1])
    train_step(model, opt, batches(1, seed=8, device=DEVICE)[0])
    assert torch.equal(target.bn.running_mean, model.bn.running_mean)  # taken again after the step
    assert torch.equal(target.bn.num_batches_tracked, model.bn.num_batches_tracked)


def test_inside_swap_ema_it_refuses_to_run(backend):
    model, opt = wrapper(backend)
    target = opt.ema_module()
    x = batches(1, device=DEVICE)[0][0]
    with opt.swap_ema():
        with pytest.raises(RuntimeError, match="used inside swap_ema"):
            target(x)
        with pytest.raises(RuntimeError, match="used inside swap_ema"):  # exchanged: it would show the training weights
            target.state_dict()
        with pytest.raises(RuntimeError, match="ema_module\\(\\) inside swap_ema"):
            opt.ema_module()
    target(x)  # fine again afterwards


def test_it_follows_params_whose_storage_was_replaced(backend):
    model, opt = wrapper(backend, base="sgd")
    target = opt.ema_module()
    train_step(model, opt, batches(1, device=DEVICE)[0])
    before = [p.data_ptr() for p in target.parameters()]
    with torch.no_grad():
        model.fc.weight.data = model.fc.weight.data.clone()  # same layout: the shadows stay
    train_step(model, opt, batches(1, seed=4, device=DEVICE)[0])
    assert [p.data_ptr() for p in target.parameters()] == before
    model.to(torch.bfloat16)  # another dtype: the shadows are laid out anew (float32, as before)
    for batch in batches(2, dtype=torch.bfloat16, device=DEVICE):
        train_step(model, opt, batch)
    assert [p.data_ptr() for p in target.parameters()] != before
    assert_shows_the_ema(target, opt)
    for i, p in enumerate(target.parameters()):
        assert p.data_ptr() == opt.core.store.ema(i).data_ptr()


def test_params_added_later_join_it(backend):
    model = make_model(device=DEVICE)
    model.fc.requires_grad_(False)
    trained = [p for p in model.parameters() if p.requires_grad]
    opt = EMAOptimizer(make_base("sgd", trained), momentum=0.3, model=model, backend=backend)
    target = opt.ema_module()
    assert target.fc.weight.data_ptr() == model.fc.weight.data_ptr()  # frozen: the model's own, aliased
    model.fc.requires_grad_(True)
    opt.add_param_group({"params": list(model.fc.parameters())})
    for batch in batches(2, device=DEVICE):
        train_step(model, opt, batch)
    assert target.fc.weight.data_ptr() != model.fc.weight.data_ptr()
    assert_shows_the_ema(target, opt)


@pytest.mark.parametrize("use", ["forward", "state_dict"])
def test_a_moved_ema_module_is_an_error_not_a_silent_copy(backend, use):
    model, opt = wrapper(backend)
    target = opt.ema_module()
    target.fc.weight.data = target.fc.weight.data.clone()
    train_step(model, opt, batches(1, device=DEVICE)[0])  # a step neither re-aliases it nor updates the copy
    assert not torch.equal(target.fc.weight, opt.ema_state_dict()["fc.weight"])
    with pytest.raises(RuntimeError, match="no longer is the EMA storage"):
        target(batches(1, device=DEVICE)[0][0]) if use == "forward" else target.state_dict()


def test_copies_of_the_optimizer_leave_it_behind(backend):
    model, opt = wrapper(backend)
    target = opt.ema_module()
    for clone in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        assert clone.core.module_links == {}
    train_step(model, opt, batches(1, device=DEVICE)[0])
    assert_shows_the_ema(target, opt)


class Byol(nn.Module):
    """An online encoder + projector (the target path) and a predictor on top of it."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 8))
        self.projector = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 4))
        self.predictor = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 4))

    def forward(self, x):
        return self.projector(self.encoder(x))


def byol_loss(prediction, target):
    return (2 - 2 * nn.functional.cosine_similarity(prediction, target, dim=-1)).mean()


def test_byol_target_network_matches_a_float64_target_step_by_step(backend):
    torch.manual_seed(0)
    model = Byol().to(DEVICE)
    schedule = Cosine(0.05, 0.002, total_steps=30)
    opt = EMAOptimizer(torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9), momentum=schedule, model=model,
                       backend=backend)
    target = opt.ema_module()
    reference = copy.deepcopy(model).double()  # the hand-kept float64 target network
    g = torch.Generator().manual_seed(3)
    for t in range(30):
        x = torch.randn(16, 6, generator=g).to(DEVICE)
        view1 = x + 0.1 * torch.randn(x.shape, generator=g).to(DEVICE)
        view2 = 0.9 * x + 0.1 * torch.randn(x.shape, generator=g).to(DEVICE)
        with torch.no_grad():
            z = target(view2)
            z64 = reference(view2.double())
        assert_ulps(z, z64, scale=z64.abs().max().expand_as(z64), ulps=64 * (t + 1))
        loss = byol_loss(model.predictor(model(view1)), z)
        loss.backward()
        opt.step()
        opt.zero_grad()
        m = schedule(t)
        with torch.no_grad():
            for s, p in zip(reference.parameters(), model.parameters()):
                s += m * (p.double() - s)
            for got, expected in zip(target.parameters(), reference.parameters()):
                assert_ulps(got, expected, scale=expected.abs().max().expand_as(expected), ulps=8 * (t + 1))
    assert math.isfinite(loss.item())
    assert not torch.equal(target.encoder[0].weight, model.encoder[0].weight)  # a target, not a copy of the online net
