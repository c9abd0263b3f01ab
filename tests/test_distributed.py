"""DDP and FSDP2 on CPU with gloo, several processes: shard-local EMA, swaps, DCP checkpoints,
several profiles and post-hoc snapshots."""

import itertools
import multiprocessing
import shutil

import dist_cases
import pytest
import torch
import torch.multiprocessing as mp
from conftest import assert_ulps
from test_posthoc import edm2_gamma, edm2_weights

from triton_ema import load_ema_weights, posthoc

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="this torch build has no gloo process groups")


STORES = itertools.count()
# Ranks fork from one server process that imported, once for the session, what every rank
# imports (torch, the cases, dynamo through an optimizer's constructor, FSDP2, DCP): spawned
# ranks import them each, 3-5 s a launch on 2 cores.
multiprocessing.set_forkserver_preload(["dist_cases", "torch._dynamo", "torch.distributed.fsdp",
                                        "torch.distributed.checkpoint"])


def launch(fn, world, tmp_path, *args):
    store = tmp_path / f"store-{next(STORES)}"  # a fresh rendezvous file for every group
    mp.start_processes(fn, args=(world, str(store), *args), nprocs=world, join=True, start_method="forkserver")


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


@pytest.fixture(scope="module")
def dcp_checkpoint(tmp_path_factory):
    """The DCP checkpoint that 2 ranks save at step 3 (the resumes only read it)."""
    folder = tmp_path_factory.mktemp("dcp")
    launch(dist_cases.run_dcp_save, 2, folder, str(folder / "ckpt"), 3)
    return folder / "ckpt"


@pytest.mark.parametrize("world", [1, 3])
def test_dcp_save_with_two_ranks_resume_with_another_world_size(tmp_path, reference, dcp_checkpoint, world):
    out = tmp_path / "resumed.pt"
    launch(dist_cases.run_dcp_resume, world, tmp_path, str(dcp_checkpoint), 3, str(out))
    result = torch.load(out, weights_only=True)
    assert_same_ema(result["ema"][None], reference)
    # On this world size's shards (3 ranks: 7 rows as 3, 3, 1; the 1-element parameter on one rank): the swap puts
    # the EMA into what the model computes and every rank's training shards back bitwise; a DCP save of them reads
    # back whole, bitwise the gathered EMA.
    assert_swapped_is(result["swapped_out"][None], result["ema"][None])
    assert result["restored"] == [True] * world
    weights = load_ema_weights(tmp_path / "resumed.pt.dcp")
    assert weights.keys() == result["ema"][None].keys()
    assert all(torch.equal(weights[k], v) for k, v in result["ema"][None].items())


def assert_swapped_is(out, ema):
    model, _ = dist_cases.build("single")
    model.load_state_dict(ema)
    expected = model(dist_cases.data(99)[0]).detach()
    assert_ulps(out, expected.double(), scale=expected.abs().max().expand_as(expected), ulps=64)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (NCCL, the Triton backend)")
def test_fsdp2_world_size_1_on_cuda_with_triton(tmp_path, reference):
    out = tmp_path / "fsdp-cuda.pt"
    launch(dist_cases.run_fsdp, 1, tmp_path, str(out), False, "cuda", "triton")
    result = torch.load(out, weights_only=True)
    assert result["backends"] == ["triton"] and result["restored"]
    assert_same_ema(result["ema"], reference)


# --- several profiles and post-hoc snapshots under FSDP2: one 2-rank run, one 3-rank resume ---------------

TARGETS = [0.12, 0.15]  # sigma_rel between the two snapshotted profiles' (0.099 and 0.194)


@pytest.fixture(scope="module")
def profiles_reference(tmp_path_factory):
    """The profiles' EMAs of the run in one process, and the folder of its snapshots."""
    folder = tmp_path_factory.mktemp("one-process")
    return dist_cases.single_profiles(str(folder)), folder


@pytest.fixture(scope="module")
def fsdp_profiles(tmp_path_factory):
    """The run with profiles under FSDP2 on 2 ranks: what it recorded, and its folder (snapshots, DCP checkpoint)."""
    folder = tmp_path_factory.mktemp("fsdp-profiles")
    launch(dist_cases.run_fsdp_profiles, 2, folder, str(folder))
    return torch.load(folder / "result.pt", weights_only=True), folder


def test_fsdp2_every_profile_matches_one_process_and_swaps_back(fsdp_profiles, profiles_reference):
    result, _ = fsdp_profiles
    reference, _ = profiles_reference
    assert not torch.equal(reference["short"]["l1.weight"], reference["long"]["l1.weight"])  # profiles differ
    model, _ = dist_cases.build("single")
    x = dist_cases.data(99)[0]
    for name in dist_cases.PROFILES:
        assert_same_ema(result["ema"][name], reference[name])
        model.load_state_dict(reference[name])
        expected = model(x).detach()
        assert_ulps(result["swapped_out"][name], expected.double(), scale=expected.abs().max().expand_as(expected),
                    ulps=64)
    # On every rank: inside each swap the shards hold that profile's shadows, and after it the training weights.
    assert [(r["held"], r["restored"]) for r in result["ranks"]] == [(True, True)] * 2


def test_load_ema_weights_reads_each_profile_of_the_two_rank_dcp_checkpoint(fsdp_profiles):
    result, folder = fsdp_profiles
    model, _ = dist_cases.build("single")
    for name in dist_cases.PROFILES:
        weights = load_ema_weights(folder / "ckpt", profile=name)  # in this process, no process group
        saved = result["taken"][dist_cases.DCP_STOP][name]  # what the ranks held, gathered when they saved
        assert weights.keys() == saved.keys() and all(torch.equal(weights[k], saved[k]) for k in saved), name
        model.load_state_dict(weights, strict=True)


def test_fsdp2_snapshot_that_rank_0_cannot_complete_fails_on_every_rank(fsdp_profiles):
    result, folder = fsdp_profiles
    first, second = (r["failed"] for r in result["ranks"])
    assert first == "OSError: disk full"
    assert second.startswith("RuntimeError: rank 0 could not complete the snapshot ") and second.endswith(
        "snapshot-000000000006: OSError: disk full")
    assert not list((folder / "crash").glob("snapshot-*"))  # nothing that synthesize() would read


def snapshot_columns(taken, times, dtype):
    """(time, gamma, EMA rounded to ``dtype`` as float64) for every snapshotted profile, in the files' order."""
    return [(t, schedule.gamma, {k: v.to(dtype).double() for k, v in taken[t][name].items()})
            for t in times for name, schedule in dist_cases.PROFILES.items() if name != "const"]


def assert_combines(got, columns, tolerance_ulps):
    """``got`` (one state dict per target) is the float64 EDM2 combination of ``columns`` at the last time."""
    x = edm2_weights([c[0] for c in columns], [c[1] for c in columns], columns[-1][0],
                     [edm2_gamma(s) for s in TARGETS])
    for j, sd in enumerate(got):
        assert sd.keys() == columns[0][2].keys()
        for k, value in sd.items():
            parts = torch.stack([float(x[i, j]) * c[2][k] for i, c in enumerate(columns)])
            assert value.dtype == torch.float32
            assert_ulps(value, parts.sum(0), scale=parts.abs().sum(0), ulps=tolerance_ulps)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fsdp2_snapshots_synthesize_like_one_process(fsdp_profiles, profiles_reference, dtype):
    result, folder = fsdp_profiles
    snapshots = folder / "snapshots" / ("fp32" if dtype == torch.float32 else "bf16")
    # One folder per snapshot (the DCP checkpoint of both ranks' shards and a header); no temporary left.
    assert sorted(p.name for p in snapshots.iterdir()) == [f"snapshot-{t:012d}" for t in dist_cases.SNAPSHOT_TIMES]
    assert {p.name for p in (snapshots / "snapshot-000000000002").glob("*.distcp")} == {"__0_0.distcp", "__1_0.distcp"}
    got = posthoc.synthesize(snapshots, sigma_rel=TARGETS)
    # Exactly the combination of what the ranks held (gathered in the run), in the dtype on disk.
    assert_combines(got, snapshot_columns(result["taken"], dist_cases.SNAPSHOT_TIMES, dtype), tolerance_ulps=4)
    if dtype == torch.float32:  # and the one-process run's synthesis, the EMAs being float32 rounding apart
        _, reference_folder = profiles_reference
        expected = posthoc.synthesize(reference_folder / "fp32", sigma_rel=TARGETS)
        for sd, ref in zip(got, expected):
            assert_same_ema(sd, ref)


def test_fsdp2_snapshot_missing_a_ranks_shards_is_refused(fsdp_profiles, tmp_path):
    _, folder = fsdp_profiles
    snapshots = shutil.copytree(folder / "snapshots" / "fp32", tmp_path / "snapshots")
    (snapshots / "snapshot-000000000004" / "__1_0.distcp").unlink()
    with pytest.raises(ValueError, match="snapshot-000000000004 is not a readable snapshot"):
        posthoc.synthesize(snapshots, sigma_rel=0.12)


def test_dcp_profiles_save_with_two_ranks_resume_with_three(fsdp_profiles, profiles_reference, tmp_path):
    result, folder = fsdp_profiles
    reference, reference_folder = profiles_reference
    # The resumed run snapshots with 3 ranks into the folder that holds the 2-rank snapshot of step 2.
    snapshots = tmp_path / "snapshots"
    shutil.copytree(folder / "snapshots" / "fp32" / "snapshot-000000000002", snapshots / "fp32" / "snapshot-000000000002")
    out = tmp_path / "resumed.pt"
    launch(dist_cases.run_dcp_resume, 3, tmp_path, str(folder / "ckpt"), dist_cases.DCP_STOP, str(out),
           dist_cases.PROFILES, str(snapshots))
    resumed = torch.load(out, weights_only=True)
    for name in dist_cases.PROFILES:
        saved = result["taken"][dist_cases.DCP_STOP][name]
        assert all(torch.equal(resumed["loaded"][name][k], saved[k]) for k in saved), name  # loaded bitwise
        assert_same_ema(resumed["ema"][name], reference[name])
        assert_swapped_is(resumed["swapped_out"][name], resumed["ema"][name])  # each profile's, on 3 uneven shards
    assert resumed["restored"] == [True] * 3
    assert resumed["run"] == result["run"]  # one run: its snapshots combine
    assert {p.name for p in (snapshots / "fp32" / "snapshot-000000000006").glob("*.distcp")} == {
        "__0_0.distcp", "__1_0.distcp", "__2_0.distcp"}
    got = posthoc.synthesize(snapshots / "fp32", sigma_rel=TARGETS)
    expected = posthoc.synthesize(reference_folder / "fp32", sigma_rel=TARGETS)
    for sd, ref in zip(got, expected):
        assert_same_ema(sd, ref)
