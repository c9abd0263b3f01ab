"""DDP and FSDP2 on CPU with gloo, several processes: shard-local EMA, swaps, DCP checkpoints."""

import itertools

import dist_cases
import pytest
import torch
import torch.multiprocessing as mp
from conftest import assert_ulps

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="this torch build has no gloo process groups")


STORES = itertools.count()


def launch(fn, world, tmp_path, *args):
    store = tmp_path / f"store-{next(STORES)}"  # a fresh rendezvous file for every group
    mp.spawn(fn, args=(world, str(store), *args), nprocs=world, join=True)


@pytest.fixture(scope="module")
def reference():
    return dist_cases.single()


def assert_same_ema(got, expected):
    assert got.keys() == expected.keys()
    for k in expected:
        # Same math, other summation order of the gradients: float32 rounding apart.
        assert_ulps(got[k].float(), expected[k].double(), scale=expected[k].abs().max().expand_as(expected[k]),
                    ulps=64)


@pytest.mark.parametrize("kind", ["ddp", "ddp-after"], ids=["model=ddp", "model=inner"])
def test_ddp_ranks_agree_and_match_one_process(tmp_path, reference, kind):
    out = tmp_path / "ddp.pt"
    launch(dist_cases.run_ddp, 2, tmp_path, str(out), kind)
    result = torch.load(out, weights_only=True)
    assert result["same_on_all_ranks"]
    # Keys as the model the user passed: the DDP wrapper's carry "module.".
    assert all(k.startswith("module.") == (kind == "ddp") for k in result["ema"])
    assert_same_ema({k.removeprefix("module."): v for k, v in result["ema"].items()}, reference)


def test_ddp_batchnorm_buffers_differ_by_rank_and_load_without_ddp(tmp_path):
    out = tmp_path / "ddp-bn.pt"
    launch(dist_cases.run_ddp_batchnorm, 2, tmp_path, str(out))
    result = torch.load(out, weights_only=True)
    first, second = result["ema"]
    assert not any(k.startswith("module.") for k in first)
    # Parameters' EMAs are the same on every rank; BatchNorm statistics come from each rank's own rows.
    for k in ("l1.weight", "bn.weight", "l2.bias"):
        assert torch.equal(first[k], second[k]), k
    assert not torch.equal(first["bn.running_mean"], second["bn.running_mean"])
    # model=ddp.module: the EMA and the checkpoint load into a model without DDP.
    model, opt = dist_cases.build_normed()
    model.load_state_dict(first)
    opt.load_state_dict(result["checkpoint"])
    assert opt.num_steps == dist_cases.STEPS
    assert all(torch.equal(v, first[k]) for k, v in opt.ema_state_dict().items())


@pytest.mark.parametrize("mixed, backend", [(False, "torch"), (True, "torch"), (False, "triton")],
                         ids=["fp32", "bf16-compute", "fp32-triton"])
def test_fsdp2_shard_local_ema(tmp_path, reference, mixed, backend):
    out = tmp_path / "fsdp.pt"
    launch(dist_cases.run_fsdp, 2, tmp_path, str(out), mixed, "cpu", backend)
    result = torch.load(out, weights_only=True)
    assert result["backends"] == [backend]
    assert result["shadow_types"] == ["DTensor"]
    assert result["local_numel"] < sum(v.numel() for v in reference.values())  # a shard, not a copy
    if not mixed:
        assert_same_ema(result["ema"], reference)
        model, _ = dist_cases.build("single")
        model.load_state_dict(reference)
        expected = model(dist_cases.data(99)[0]).detach()
        assert_ulps(result["swapped_out"], expected.double(), scale=expected.abs().max().expand_as(expected), ulps=64)
    assert result["restored"]  # bitwise, on every parameter shard
    assert "ema_module() is not available for sharded (DTensor, FSDP2) parameters" in result["module_refused"]
    assert all(v.dtype == torch.float32 for v in result["ema"].values())  # shadows follow the fp32 shards


@pytest.mark.parametrize("world", [1, 3])
def test_dcp_save_with_two_ranks_resume_with_another_world_size(tmp_path, reference, world):
    ckpt, out = tmp_path / "ckpt", tmp_path / "resumed.pt"
    launch(dist_cases.run_dcp_save, 2, tmp_path, str(ckpt), 3)
    launch(dist_cases.run_dcp_resume, world, tmp_path, str(ckpt), 3, str(out))
    assert_same_ema(torch.load(out, weights_only=True)["ema"], reference)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (NCCL, the Triton backend)")
def test_fsdp2_world_size_1_on_cuda_with_triton(tmp_path, reference):
    out = tmp_path / "fsdp-cuda.pt"
    launch(dist_cases.run_fsdp, 1, tmp_path, str(out), False, "cuda", "triton")
    result = torch.load(out, weights_only=True)
    assert result["backends"] == ["triton"] and result["restored"]
    assert_same_ema(result["ema"], reference)
