"""Smoke test of ``python -m triton_ema.demo``: a tiny run, its numbers, its plot, its resume."""

import math
import subprocess
import sys

import pytest
import torch
from conftest import DEVICE, assert_ulps

from triton_ema.demo import DigitsNet, build, evaluate, load_data, parse_args, run


def tiny(out, epochs, *extra):
    return run(["--epochs", str(epochs), "--max-batches", "4", "--out", str(out), "--quiet", "--device",
                str(DEVICE), *extra])


def test_table_is_finite_and_matches_a_separate_evaluation(tmp_path, capsys):
    result = tiny(tmp_path, 2)
    history = result["history"]
    assert [h["epoch"] for h in history] == [1, 2]
    assert all(math.isfinite(v) for h in history for v in h.values())
    # The EMA column is what the EMA weights score when loaded into a fresh model.
    fresh = DigitsNet().to(DEVICE)
    fresh.load_state_dict(result["optimizer"].ema_state_dict())
    data = result["data"]
    acc, loss = evaluate(fresh, data.x_test, data.y_test)
    assert acc == history[-1]["ema_acc"] and abs(loss - history[-1]["ema_loss"]) <= 1e-6 * loss
    printed = capsys.readouterr().out
    assert "EMA weights" in printed and f"{history[-1]['ema_acc']:.2f}" in printed


def test_plot_is_written(tmp_path):
    path = tiny(tmp_path, 1)["plot"]
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000


def test_resume_continues_bitwise(tmp_path):
    straight = tiny(tmp_path / "a", 3)
    tiny(tmp_path / "b", 3, "--stop-after", "1")
    resumed = tiny(tmp_path / "b", 3, "--resume")
    assert resumed["history"] == straight["history"]
    for a, b in zip(straight["model"].state_dict().values(), resumed["model"].state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(straight["optimizer"].ema_state_dict().values(), resumed["optimizer"].ema_state_dict().values()):
        assert torch.equal(a, b)


def test_resume_runs_with_the_checkpoints_settings_and_refuses_options_they_override(tmp_path, capsys):
    tiny(tmp_path, 3, "--lr", "0.01", "--momentum", "0.1", "--warm-up", "none", "--stop-after", "2")
    for given, named in ((["--lr", "0.05"], "--lr 0.05 differs from the checkpoint's \\(--lr 0.01\\)"),
                         (["--lr", "0.05", "--momentum", "0.02"],
                          "--lr 0.05 --momentum 0.02 differ from the checkpoint's \\(--lr 0.01 --momentum 0.1\\)"),
                         (["--seed", "4"], "--seed 4 differs"),
                         (["--epochs", "1"], "--epochs 1: the checkpoint is after epoch 2 already")):
        with pytest.raises(SystemExit, match=named):
            run(["--resume", *given, "--out", str(tmp_path), "--quiet"])
    capsys.readouterr()
    # No --epochs: the run's own 3 (not the default 15), with its lr and momentum, printed as they are used.
    result = run(["--resume", "--lr", "0.01", "--max-batches", "4", "--out", str(tmp_path), "--quiet", "--device",
                  str(DEVICE)])
    assert [h["epoch"] for h in result["history"]] == [1, 2, 3]
    assert result["optimizer"].param_groups[0]["lr"] == 0.01 and result["optimizer"].schedule(0) == 0.1
    printed = capsys.readouterr().out
    assert "after epoch 2 of 3, with its settings: --lr 0.01 --batch-size 16 --momentum 0.1 " in printed
    assert "loss, cpu, lr 0.01, EMA momentum 0.1 -> 0.005 (cosine, warm-up: none)" in printed
    # --epochs beyond the run's: the cosine keeps the run's length, at its end momentum from there on
    longer = tiny(tmp_path, 4, "--resume")
    assert [h["epoch"] for h in longer["history"]] == [1, 2, 3, 4] and longer["history"][3]["momentum"] == 0.005
    assert "(cosine over 3 epochs, warm-up: none)" in capsys.readouterr().out


def test_command_line_entry_point(tmp_path):
    out = subprocess.run([sys.executable, "-m", "triton_ema.demo", "--epochs", "1", "--max-batches", "2",
                          "--out", str(tmp_path), "--quiet", "--device", str(DEVICE)],
                         capture_output=True, text=True, check=True, timeout=300)
    assert "held-out accuracy" in out.stdout and (tmp_path / "demo.png").exists()


def test_resume_without_a_checkpoint_says_so(tmp_path):
    with pytest.raises(SystemExit, match="no checkpoint at"):
        tiny(tmp_path, 1, "--resume")


def test_warm_up_changes_the_momentum():
    data = load_data(torch.device("cpu"), 0)
    _, warm = build(parse_args(["--epochs", "15"]), data)
    _, plain = build(parse_args(["--epochs", "15", "--warm-up", "none"]), data)
    # 1 - (1 - (1 + t) ** -1): the average of all weights so far
    assert [warm.schedule(t) for t in (0, 1, 9)] == [1 - (1 - (1 + t) ** -1.0) for t in (0, 1, 9)]
    assert plain.schedule(0) == 0.02 and 0.0199 < plain.schedule(9) < 0.02  # the cosine alone
    for late in (50, 1000):  # once 1 / (1 + t) is below the cosine, the cosine rules
        assert warm.schedule(late) == plain.schedule(late) > 1 / (1 + late)


def test_posthoc_sweep_reproduces_the_tracked_profiles(tmp_path, capsys):
    # 8 steps, snapshots at steps 3 and 6 and at the last one
    result = tiny(tmp_path, 2, "--posthoc", "--snapshot-every", "3", "--sweep", "0.02", "0.2")
    assert sorted(p.name for p in result["snapshots"].iterdir()) == [
        f"snapshot-{t:012d}.pt" for t in (3, 6, 8)]
    opt, sweep = result["optimizer"], result["sweep"]
    assert [row["sigma_rel"] for row in sweep] == [0.02, 0.05, 0.1, 0.2]
    for row in sweep:
        state = result["states"][row["sigma_rel"]]
        if row["tracked_acc"] is None:
            continue
        # the least-squares weights single out the profile's own last snapshot:
        # its EMA comes back to within float32 rounding of the float64 combination
        for key, tracked in opt.ema_state_dict(f"{row['sigma_rel']:g}").items():
            if tracked.is_floating_point():
                assert_ulps(state[key], tracked.double(), ulps=1)
            else:
                assert torch.equal(state[key], tracked.cpu())
        assert row["acc"] == row["tracked_acc"] and abs(row["loss"] - row["tracked_loss"]) <= 1e-5 * row["loss"]
    # the other widths are other weights (the sweep is not the tracked EMA four times)
    assert not torch.equal(result["states"][0.02]["head.weight"], result["states"][0.2]["head.weight"])
    assert all(math.isfinite(v) for row in sweep for v in (row["acc"], row["loss"]))
    printed = capsys.readouterr().out
    assert "synthesized at step 8 from 3 snapshots" in printed
    for row in sweep:
        assert f"{row['sigma_rel']:9.3f} | {row['acc']:16.2f} {row['loss']:6.4f}" in printed
    assert result["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_posthoc_resume_gives_the_same_sweep(tmp_path):
    args = ("--posthoc", "--snapshot-every", "3", "--sweep", "0.15")
    straight = tiny(tmp_path / "a", 2, *args)
    assert "sweep" not in tiny(tmp_path / "b", 2, *args, "--stop-after", "1")
    resumed = tiny(tmp_path / "b", 2, *args, "--resume")
    assert resumed["sweep"] == straight["sweep"] and resumed["history"] == straight["history"]
    for sigma_rel, state in straight["states"].items():
        for key, value in state.items():
            assert torch.equal(resumed["states"][sigma_rel][key], value)


@pytest.mark.parametrize("option", ["--profiles", "--sweep"])
def test_posthoc_refuses_a_width_without_a_power_function(option, capsys):
    with pytest.raises(SystemExit):
        parse_args(["--posthoc", option, "0.3"])
    assert "sigma_rel must lie in (0, 0.2887)" in capsys.readouterr().err
    assert parse_args(["--posthoc"]).out.name == "demo-posthoc" and parse_args([]).out.name == "demo"
