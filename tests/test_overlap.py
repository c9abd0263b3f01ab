"""``overlap=True``: the update on a side CUDA stream (GPU tests), and a no-op on CPU buckets."""

import copy
import pickle

import pytest
import torch
from conftest import DEVICE
from models import batches, make_base, make_model, train_step

from triton_ema import EMAOptimizer
from triton_ema.schedules import Power

GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="a side CUDA stream needs a GPU")


def run(device, backend, overlap, steps=8, capturable=False, between=lambda model, opt, t: None):
    model = make_model(device=device)
    opt = EMAOptimizer(make_base("adamw", model.parameters()), momentum={"a": Power(0.99), "b": 0.3}, model=model,
                       backend=backend, overlap=overlap, capturable=capturable, skip_nonfinite=True)
    for t, batch in enumerate(batches(steps, device=device)):
        train_step(model, opt, batch)
        between(model, opt, t)
    return model, opt


def emas(opt):
    return {name: opt.ema_state_dict(name) for name in opt.schedules}


def assert_same(a, b):
    for name in a:
        assert all(torch.equal(v, b[name][k]) for k, v in a[name].items()), name


@pytest.mark.skipif(DEVICE.type == "cuda", reason="the CPU case")
def test_on_cpu_buckets_it_is_accepted_and_changes_nothing(backend):
    _, plain = run(DEVICE, backend, overlap=False)
    _, overlapped = run(DEVICE, backend, overlap=True)
    assert overlapped.overlap and overlapped.core.side_stream is None
    assert_same(emas(overlapped), emas(plain))
    for clone in (copy.deepcopy(overlapped), pickle.loads(pickle.dumps(overlapped))):
        assert clone.core.side_stream is None and clone.overlap


def use_everything(model, opt, t):
    """Between steps, every way to the EMA: each must wait for the update in flight."""
    if t == 2:
        with opt.swap_ema("a"):
            model(batches(1, seed=9, device="cuda")[0][0])
    if t == 3:
        opt.ema_module("b")(batches(1, seed=9, device="cuda")[0][0])
    if t == 4:
        opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    if t == 5:
        assert opt.skipped_updates == 0


@GPU
@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("capturable", [False, True])
def test_the_side_stream_gives_the_same_ema_bitwise(backend, capturable):
    _, plain = run("cuda", backend, overlap=False, capturable=capturable, between=use_everything)
    _, overlapped = run("cuda", backend, overlap=True, capturable=capturable, between=use_everything)
    assert overlapped.core.side_stream is not None and overlapped.core.side_stream.done is not None
    assert_same(emas(overlapped), emas(plain))


@GPU
def test_a_step_never_waits_on_the_host():
    model, opt = run("cuda", "triton", overlap=True, steps=2)
    torch.cuda.set_sync_debug_mode("error")  # a host sync or a blocking copy raises
    try:
        x, y = batches(1, device="cuda")[0]
        loss = (model(x) - y).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@GPU
def test_a_param_replaced_while_the_update_runs_is_read_as_it_was():
    """The documented misuse: storage replaced between steps. The update in flight
    reads the old storage, which stays allocated until the next step has waited."""
    def replace(model, opt, t):
        if t == 3:
            with torch.no_grad():
                old = model.fc.weight.data
                model.fc.weight.data = old.clone()
                del old
                for _ in range(20):  # memory the allocator may hand out again, overwritten at once
                    torch.empty(4096, device="cuda").fill_(float("nan"))

    _, plain = run("cuda", "triton", overlap=False)
    _, overlapped = run("cuda", "triton", overlap=True, between=replace)
    assert_same(emas(overlapped), emas(plain))
    assert overlapped.skipped_updates == 0


@GPU
def test_a_captured_step_with_overlap_joins_its_side_stream():
    model = make_model(device="cuda")
    base = torch.optim.AdamW(model.parameters(), lr=0.05, capturable=True)
    opt = EMAOptimizer(base, momentum=Power(0.99), model=model, capturable=True, overlap=True)
    data = [(x.cuda(), y.cuda()) for x, y in batches(6)]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for batch in data[:3]:
            train_step(model, opt, batch)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    x, y = (t.clone() for t in data[0])
    with torch.cuda.graph(graph):  # an unjoined side stream would make the capture fail
        (model(x) - y).square().mean().backward()
        opt.step()
    for _ in range(3):
        graph.replay()
    assert opt.num_steps == 6
