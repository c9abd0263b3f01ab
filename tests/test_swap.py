"""swap_ema(): EMA weights inside, training weights back bitwise on exit."""

import gc

import pytest
import torch
from conftest import DEVICE, live_tensor_bytes
from models import batches, make_model, shadows, train_step

from triton_ema import EMAOptimizer


def trained(dtype=torch.float32, backend="torch", **kw):
    model = make_model(dtype, device=DEVICE)
    opt = EMAOptimizer(torch.optim.AdamW(model.parameters(), lr=0.05, eps=1e-3), momentum=0.3, model=model,
                       backend=backend, **kw)
    for batch in batches(3, dtype, device=DEVICE):
        train_step(model, opt, batch)
    return model, opt


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_bitwise(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k].view(-1).view(torch.uint8), b[k].view(-1).view(torch.uint8)), k


DTYPE_PAIRS = pytest.mark.parametrize("dtype, shadow_dtype", [
    (torch.float32, None), (torch.bfloat16, None), (torch.float16, None), (torch.bfloat16, torch.bfloat16),
    (torch.float32, torch.bfloat16)], ids=str)


def ema_entries(opt):
    ema = opt.state_dict()["ema"]
    return [v.clone() for v in ema["shadow"].values()] + [v.clone() for v in ema["buffers"].values()]


@DTYPE_PAIRS
def test_swap_puts_ema_in_and_restores_bitwise(dtype, shadow_dtype, backend):
    model, opt = trained(dtype, backend, shadow_dtype=shadow_dtype, update_buffers=True)
    training = state(model)
    ema = {k: v.clone() for k, v in opt.ema_state_dict().items()}
    shadow_before = [s.clone() for s in opt.state_dict()["ema"]["shadow"].values()]
    with opt.swap_ema():
        inside = state(model)
    assert_bitwise(state(model), training)
    for name, value in inside.items():
        assert torch.equal(value, ema[name]), name  # the EMA, rounded to the model's dtype
    assert not torch.equal(inside["fc.weight"], training["fc.weight"])
    # The shadow itself is never rounded by a swap.
    for a, b in zip(shadow_before, opt.state_dict()["ema"]["shadow"].values()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_swap_restores_after_an_exception(error, backend):
    model, opt = trained(backend=backend)
    training = state(model)
    with pytest.raises(error):
        with opt.swap_ema():
            model.eval()(batches(1, device=DEVICE)[0][0])
            raise error("evaluation failed")
    assert_bitwise(state(model), training)
    model.train()
    train_step(model, opt, batches(1, device=DEVICE)[0])  # and training goes on


def test_nested_swap_is_an_error():
    model, opt = trained()
    training = state(model)
    with opt.swap_ema():
        with pytest.raises(RuntimeError, match="already active"):
            with opt.swap_ema():
                pass
    assert_bitwise(state(model), training)


def test_step_inside_swap_is_an_error():
    model, opt = trained()
    training = state(model)
    with opt.swap_ema():
        with pytest.raises(RuntimeError, match="step\\(\\) inside swap_ema"):
            opt.step()
        with pytest.raises(RuntimeError, match="inside swap_ema"):
            opt.load_state_dict(opt.state_dict())
        with pytest.raises(RuntimeError, match="inside swap_ema"):
            opt.add_param_group({"params": [torch.nn.Parameter(torch.ones(2, device=DEVICE))]})
    assert_bitwise(state(model), training)
    assert opt.num_steps == 3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_state_dict_taken_inside_swap_keeps_the_ema(dtype):
    model, opt = trained(dtype)
    outside = {k: v.clone() for k, v in opt.state_dict()["ema"]["shadow"].items()}
    with opt.swap_ema():
        inside = opt.state_dict()["ema"]["shadow"]  # saved after the block, as a training loop would
    assert all(torch.equal(outside[k], inside[k]) for k in outside)


@DTYPE_PAIRS
def test_writes_inside_swap_become_the_ema(dtype, shadow_dtype, backend):
    # One rule for every dtype pair: the block's writes to params become the EMA;
    # every element it leaves alone keeps its shadow value bitwise (a wider shadow is not rounded).
    model, opt = trained(dtype, backend, shadow_dtype=shadow_dtype)
    training, before = state(model), shadows(opt)
    with opt.swap_ema(), torch.no_grad():
        model.fc.weight[2] = 0.5
        model.scale.copy_(torch.tensor(-2.0))
    assert_bitwise(state(model), training)
    after = shadows(opt)
    names = [name for name, _ in model.named_parameters()]
    fc, scale = names.index("fc.weight"), names.index("scale")
    assert torch.all(after[fc][2] == 0.5) and after[scale] == -2.0
    assert torch.equal(after[fc][:2], before[fc][:2]) and torch.equal(after[fc][3:], before[fc][3:])
    assert all(torch.equal(a, b) for i, (a, b) in enumerate(zip(after, before)) if i not in (fc, scale))


@DTYPE_PAIRS
def test_train_mode_forward_inside_swap_keeps_the_ema(dtype, shadow_dtype, backend):
    # Evaluation code that forgot model.eval(): BatchNorm moves its statistics; the EMA must not follow silently.
    model, opt = trained(dtype, backend, shadow_dtype=shadow_dtype, update_buffers=True)
    training, before = state(model), ema_entries(opt)
    with pytest.warns(UserWarning, match="bn.running_mean, bn.running_var changed inside swap_ema"):
        with opt.swap_ema():
            model.train()(batches(1, dtype, seed=4, device=DEVICE)[0][0])
    assert all(torch.equal(a, b) for a, b in zip(ema_entries(opt), before))
    training.pop("bn.num_batches_tracked")  # not averaged: the model's own counter saw the forward
    now = state(model)
    assert now.pop("bn.num_batches_tracked") == 4
    assert_bitwise(now, training)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=str)
def test_moving_the_model_inside_swap_gives_everything_back(dtype, backend):
    model, opt = trained(backend=backend, update_buffers=True)
    training, before = state(model), ema_entries(opt)
    with pytest.raises(RuntimeError, match="moved to another dtype, device or layout inside swap_ema"):
        with opt.swap_ema():
            model.to(dtype)
    # The training weights are in the moved model, the EMA is as it was, and the wrapper works on.
    for name, value in model.state_dict().items():
        expected = training[name].to(dtype) if training[name].is_floating_point() else training[name]
        assert value.dtype == expected.dtype and torch.equal(value, expected), name
    assert all(torch.equal(a, b) for a, b in zip(ema_entries(opt), before))
    model.to(torch.float32)  # AdamW's state is float32 (and backend="triton" takes no float64)
    with opt.swap_ema():
        assert torch.equal(model.fc.weight, before[5])
    opt.load_state_dict(opt.state_dict())
    train_step(model, opt, batches(1, seed=7, device=DEVICE)[0])
    assert opt.num_steps == 4


def test_moving_the_model_inside_swap_and_back_keeps_the_buffers_ema(backend):
    """The EMA as ema_state_dict() and ema_module() read it: the model's buffers are other objects after each move."""
    model, opt = trained(backend=backend, update_buffers=True)
    before = {k: v.clone() for k, v in opt.ema_state_dict().items()}
    assert not torch.equal(before["bn.running_mean"], model.bn.running_mean)
    with pytest.raises(RuntimeError, match="moved to another dtype, device or layout inside swap_ema"):
        with opt.swap_ema():
            model.to(torch.float64)
    model.to(torch.float32)
    assert_bitwise(opt.ema_state_dict(), before)
    assert_bitwise(state(opt.ema_module()), before)
    train_step(model, opt, batches(1, seed=7, device=DEVICE)[0])  # and the EMA trains on


@pytest.mark.skipif(DEVICE.type != "cuda", reason="needs a GPU: the model moves from it to the CPU")
def test_moving_the_model_to_another_device_inside_swap_gives_everything_back(backend):
    model, opt = trained(backend=backend, update_buffers=True)
    training, before = state(model), ema_entries(opt)
    with pytest.raises(RuntimeError, match="moved to another dtype, device or layout inside swap_ema"):
        with opt.swap_ema():
            model.cpu()
    for name, value in model.state_dict().items():
        assert value.device.type == "cpu" and torch.equal(value, training[name].cpu()), name
    assert all(torch.equal(a, b) for a, b in zip(ema_entries(opt), before))
    model.to(DEVICE)
    train_step(model, opt, batches(1, seed=7, device=DEVICE)[0])
    assert opt.num_steps == 4


def test_reshaping_a_param_inside_swap_puts_the_old_one_back(backend):
    model, opt = trained(backend=backend)
    training, before = state(model), ema_entries(opt)
    with pytest.raises(RuntimeError, match="fc.weight moved"):
        with opt.swap_ema():
            model.fc.weight.data = torch.zeros(3, 3, device=DEVICE)
    assert_bitwise(state(model), training)
    assert all(torch.equal(a, b) for a, b in zip(ema_entries(opt), before))


def test_swap_without_with_is_reported():
    model, opt = trained()
    training = state(model)
    with pytest.warns(RuntimeWarning, match="without `with`: nothing was swapped") as caught:
        opt.swap_ema()
        gc.collect()
    assert caught[0].filename == __file__
    assert_bitwise(state(model), training)


def test_equal_dtype_swap_allocates_nothing(backend):
    model, opt = trained(backend=backend)
    before = live_tensor_bytes()
    with opt.swap_ema():
        assert live_tensor_bytes() == before
    assert live_tensor_bytes() == before


def test_compiled_model_sees_the_swap(backend):
    # Swaps change values in place (no rebinding), so a compiled model needs no recompile to see them.
    model = make_model(device=DEVICE)
    compiled = torch.compile(model, backend="aot_eager")
    opt = EMAOptimizer(torch.optim.SGD(compiled.parameters(), lr=0.1, momentum=0.9), momentum=0.5, model=compiled,
                       backend=backend)
    for batch in batches(3, device=DEVICE):
        train_step(compiled, opt, batch)
    x = batches(1, seed=7, device=DEVICE)[0][0]
    compiled.eval()
    training_out = compiled(x)
    with opt.swap_ema():
        ema_out = compiled(x)
    assert torch.equal(compiled(x), training_out)
    reference = make_model(seed=3, device=DEVICE).eval()
    reference.load_state_dict({k.removeprefix("_orig_mod."): v for k, v in opt.ema_state_dict().items()})
    torch.testing.assert_close(ema_out, reference(x), rtol=1e-6, atol=1e-6)
    assert not torch.allclose(ema_out, training_out)
