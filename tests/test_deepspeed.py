"""DeepSpeed engines (ZeRO stages 0-3, fp32 and bf16) on 2 CPU processes with gloo: the EMA of
each rank's fp32 master partition against a float64 EMA of the full master weights, swaps,
checkpoints, skipped steps, the offline reader and wrong use. tests/deepspeed_cases.py holds
what each rank runs; one 2-rank launch runs every configuration (a module fixture)."""

import itertools
import multiprocessing
import os
import sys

import pytest
import torch

deepspeed = pytest.importorskip("deepspeed", reason="the deepspeed extra is not installed")

import torch.multiprocessing as mp  # noqa: E402
from conftest import assert_ulps  # noqa: E402

from triton_ema.deepspeed_checkpoint import read_deepspeed_ema  # noqa: E402

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                 reason="this torch build has no gloo process groups")]

CPU_CONFIGS = ["stage0-fp32", "stage0-bf16", "stage1-fp32", "stage1-bf16", "stage1-bf16-fp32acc",
               "stage2-fp32", "stage2-bf16", "stage3-fp32", "stage3-bf16"]
STORES = itertools.count()
# Ranks fork from one server process that imported torch and DeepSpeed once (the cases module).
multiprocessing.set_forkserver_preload(["deepspeed_cases"])


def launch(fn, world, folder, *args):
    store = folder / f"store-{next(STORES)}"
    mp.start_processes(fn, args=(world, str(store), *args), nprocs=world, join=True, start_method="forkserver")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    import deepspeed_cases

    folder = tmp_path_factory.mktemp("deepspeed")
    os.environ["DS_ACCELERATOR"] = "cpu"
    launch(deepspeed_cases.run, 2, folder, str(folder / "out.pt"), CPU_CONFIGS, str(folder))
    # Plain objects: DeepSpeed's log lines aside, the results are tensors, dicts and strings.
    return folder, torch.load(folder / "out.pt", weights_only=True)


def assert_float32_ema(got, reference):
    assert got.keys() == reference.keys()
    for k, expected in reference.items():
        assert got[k].dtype == torch.float32
        # An fp32 lerp per step of the same master weights as the float64 reference.
        assert_ulps(got[k], expected, scale=expected.abs().max().expand_as(expected), ulps=16)


@pytest.mark.parametrize("name", CPU_CONFIGS)
def test_ema_of_the_master_weights_matches_float64(runs, name):
    r = runs[1][name]
    assert r["num_steps"] == 6
    assert_float32_ema(r["ema"], r["reference"])


@pytest.mark.parametrize("name", CPU_CONFIGS)
def test_resume_from_checkpoint_is_bitwise(runs, name):
    r = runs[1][name]
    assert r["resumed_steps_after_load"] == 3 and r["resumed_num_steps"] == 6
    for k in r["ema"]:
        assert torch.equal(r["resumed_ema"][k], r["ema"][k]), k
        assert torch.equal(r["resumed_masters"][k], r["masters"][k]), k


@pytest.mark.parametrize("name", CPU_CONFIGS)
def test_swap_puts_the_ema_in_the_module_and_the_training_weights_back(runs, name):
    r = runs[1][name]
    assert r["inside_is_ema"] and r["inside_differs"]
    assert r["swap_back"] and r["swap_back_after_raise"] and r["out_unchanged"]
    step, nested, save = r["swap_errors"]
    assert step.startswith("step: engine.step() inside swap_ema() is not allowed")
    assert nested.startswith("nested: swap_ema() is already active")
    assert save.startswith("save: engine.save_checkpoint() inside swap_ema() is not allowed")


@pytest.mark.parametrize("name", [n for n in CPU_CONFIGS if "bf16" in n])
def test_step_skipped_for_non_finite_gradients_updates_nothing(runs, name):
    skipped = runs[1][name]["skipped"]
    assert skipped["masters_unchanged"], "DeepSpeed applied the poisoned step"
    assert skipped["ema_unchanged"] and skipped["count_after"] == skipped["count_before"] == 6


@pytest.mark.parametrize("name", CPU_CONFIGS)
def test_local_pieces_are_slices_of_the_full_ema(runs, name):
    r = runs[1][name]
    stage = int(name[5])
    for k, piece in r["local"].items():
        full = r["ema"][k].reshape(-1)
        if stage == 0:
            assert torch.equal(piece, r["ema"][k])
        elif stage == 3:  # rank 0's shard: the first ceil(n / 2) elements
            assert torch.equal(piece, full[:piece.numel()])
        else:  # rank 0's partition holds a contiguous run of the flattened parameter
            assert any(torch.equal(piece, full[i:i + piece.numel()]) for i in range(full.numel() - piece.numel() + 1))
    if stage == 3:
        assert set(r["local"]) == set(r["ema"])


@pytest.mark.parametrize("name", CPU_CONFIGS)
def test_offline_reader_joins_every_rank_and_loads_into_the_plain_model(runs, name):
    import deepspeed_cases

    folder, results = runs
    before = set(sys.modules)
    ema = read_deepspeed_ema(folder / name, tag="mid")
    assert not any(m.startswith("deepspeed.") for m in set(sys.modules) - before)
    saved = results[name]["saved"]
    assert ema.keys() == saved.keys()
    assert all(torch.equal(ema[k], saved[k]) for k in saved)  # the live full EMA at the save, bitwise
    model = deepspeed_cases.Net()
    model.load_state_dict(ema)
    assert all(torch.equal(p, saved[k]) for k, p in model.state_dict().items())


@pytest.mark.parametrize("name", CPU_CONFIGS)
def test_load_ema_weights_and_the_export_command_read_a_deepspeed_folder(runs, name, tmp_path):
    import deepspeed_cases

    from triton_ema import load_ema_weights
    from triton_ema.export import main as export_main

    folder, results = runs
    saved = results[name]["saved"]  # the live full EMA when save_checkpoint(tag="mid") ran
    for source, kwargs in ((folder / name, {}), (folder / name / "mid", {}), (folder / name, {"weights_only": False}),
                           (folder / name, {"model": deepspeed_cases.Net()})):
        weights = load_ema_weights(source, **kwargs)
        assert weights.keys() == saved.keys() and all(torch.equal(weights[k], saved[k]) for k in saved), (source, kwargs)
    assert export_main([str(folder / name), str(tmp_path / "ema.pt")]) == 0
    exported = torch.load(tmp_path / "ema.pt", weights_only=True)
    model = deepspeed_cases.Net()
    model.load_state_dict(exported, strict=True)
    assert all(torch.equal(p, saved[k]) for k, p in model.state_dict().items())


def test_offline_reader_refuses_a_missing_tag_and_a_checkpoint_without_ema(runs, tmp_path):
    folder = runs[0]
    with pytest.raises(FileNotFoundError, match="no checkpoint 'nope'"):
        read_deepspeed_ema(folder / "stage2-bf16", tag="nope")
    with pytest.raises(FileNotFoundError, match="no 'latest' file"):
        read_deepspeed_ema(tmp_path)
    with pytest.raises(ValueError, match="one unnamed profile"):
        read_deepspeed_ema(folder / "stage2-bf16", tag="mid", profile="long")


@pytest.mark.parametrize("flag", ["load_module_only", "load_optimizer_states"])
def test_load_without_optimizer_states_restarts_the_ema_from_the_loaded_weights(runs, flag):
    r = runs[1]["module_only"][flag]
    assert r["num_steps"] == 0
    assert [w.split(":")[0] for w in r["warnings"]] == [f"load_checkpoint({flag}={flag == 'load_module_only'}) "
                                                        "loads no optimizer states, so no EMA"]
    assert all(torch.equal(r["ema"][k], r["masters"][k]) for k in r["masters"])


WRONG_USE = [
    ("plain module", "TypeError", "attach() takes the engine that deepspeed.initialize() returns, got Net"),
    ("plain optimizer", "TypeError", "attach() takes the engine that deepspeed.initialize() returns, got SGD"),
    ("twice", "RuntimeError", "an EMA is already attached to this engine"),
    ("ema_module", "RuntimeError", "ema_module() is not available under DeepSpeed"),
    ("ema_checkpoint", "RuntimeError", "ema_checkpoint is not available under DeepSpeed"),
    ("load_ema_state_dict", "RuntimeError", "load_ema_state_dict() is not available under DeepSpeed"),
    ("model=", "ValueError", "model= is not taken under DeepSpeed"),
    ("no optimizer", "ValueError", "this engine has no optimizer"),
    ("offload_optimizer", "ValueError", "zero_optimization.offload_optimizer (device 'cpu') is not supported"),
    ("universal", "ValueError", "DeepSpeed's universal checkpoints do not carry the EMA"),
]


@pytest.mark.parametrize("case, kind, message", WRONG_USE, ids=[c for c, _, _ in WRONG_USE])
def test_wrong_use_is_refused_by_name(runs, case, kind, message):
    got_kind, got_message = runs[1]["errors"][case]
    assert (got_kind, got_message[:len(message)]) == (kind, message)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 needs a GPU: DeepSpeed's CPU accelerator refuses it "
                                                          "('Type fp16 is not supported on your device')")
@pytest.mark.parametrize("name", ["stage2-fp16", "stage3-fp16"])
def test_fp16_with_loss_scaler_on_cuda(tmp_path, name):
    import deepspeed_cases

    # A fresh process: the forkserver's DeepSpeed chose the CPU accelerator when it was imported.
    saved, os.environ["DS_ACCELERATOR"] = os.environ.get("DS_ACCELERATOR"), "cuda"
    try:
        mp.start_processes(deepspeed_cases.run_cuda, args=(1, str(tmp_path / "store"), str(tmp_path / "out.pt"), [name],
                                                           str(tmp_path)), nprocs=1, join=True, start_method="spawn")
    finally:
        os.environ["DS_ACCELERATOR"] = saved or "cpu"
    r = torch.load(tmp_path / "out.pt", weights_only=True)[name]
    assert_float32_ema(r["ema"], r["reference"])
    assert all(torch.equal(r["resumed_ema"][k], r["ema"][k]) for k in r["ema"])
    assert r["swap_back"] and r["swap_back_after_raise"] and r["inside_is_ema"]
    # fp16 overflow: the loss scaler skips the step; nothing is updated or counted.
    assert r["skipped"]["masters_unchanged"] and r["skipped"]["ema_unchanged"]
    assert r["skipped"]["count_after"] == r["skipped"]["count_before"]
