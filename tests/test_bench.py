"""Smoke tests: the bench command and the perf suites run and write well-formed output."""

import contextlib
import importlib.util
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from triton_ema.bench.__main__ import main
from triton_ema.bench.measure import PROFILE_JOBS, WORKLOADS
from triton_ema.bench.providers import DTYPES, providers
from triton_ema.bench.targets import OURS, PEER, PEER_AS_CALLED, TARGETS, check, report
from triton_ema.bench.train import variants

ROOT = Path(__file__).resolve().parents[1]
JOBS = {"update", "update-k2", "update-k4", "swap", "step", "host", "parity", "train"}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One run of the bench command on its tiny workloads: (out folder, bench.json, what it printed)."""
    out = tmp_path_factory.mktemp("bench")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        main(["--tiny", "--out", str(out), "--quiet"])
    return out, json.loads((out / "bench.json").read_text()), printed.getvalue()


def test_bench_command_writes_table_json_and_plot(tiny_run):
    tmp_path, result, out = tiny_run
    env, rows = result["environment"], result["rows"]
    assert {"device", "torch", "triton", "commit", "date", "copy_gbps"} <= env.keys() and env["copy_gbps"] > 0
    present = {p.name for p in providers() if p.absent is None}
    assert {r["provider"] for r in rows if r["job"] != "train"} == present
    assert set(env["absent"]) - set(variants()) == {p.name for p in providers()} - present
    for r in rows:
        assert r["median_ms"] > 0 and r["triton_ema_speedup"] > 0
        assert (r["peak_extra_mb"] is None) == (r["job"] == "train")
        assert (r["gbps"] is None) == (r["job"] in ("step", "host", "train"))
    assert {r["job"] for r in rows} == JOBS
    parity = {r["provider"] for r in rows if r["job"] == "parity"}
    assert parity == {p.name for p in providers() if p.absent is None and "parity" in p.jobs}
    assert parity >= {"triton-ema[torch]", "foreach_lerp"}
    train = [r for r in rows if r["job"] == "train"]
    assert train[0]["provider"] == "no EMA" and train[0]["ema_share"] == 0
    assert {r["provider"] for r in train} | set(env["absent"]) >= {"triton-ema", "timm ModelEmaV3", "foreach mul_+add_ (NeMo)"}
    assert (tmp_path / "bench.png").read_bytes()[:4] == b"\x89PNG"
    assert [t["target"] for t in result["targets"]] == [str(t) for t in TARGETS]
    assert all(t["status"] == "not measured" and t["value"] is None for t in result["targets"])  # tiny workloads
    assert "device copy:" in out and "not measured" in out


def test_profile_rows_count_param_and_two_k_shadows_per_element(tiny_run):
    """The K-profile update: every provider of it, on the tiny workload and both dtypes; GB/s
    from param + 2·K·shadow bytes per element (shadows in the params' dtype where the peer keeps them so)."""
    _, result, _ = tiny_run
    named = {p.name: p for p in providers() if p.absent is None and "update-k2" in p.jobs}
    assert {"triton-ema[torch]", "K x triton-ema[torch]", "K x foreach_lerp", "EDM2 loop (transcribed)"} <= set(named)
    assert ("PostHocEMA (ema-pytorch)" in named) == ("PostHocEMA (ema-pytorch)" not in result["environment"]["absent"])
    for job, k in PROFILE_JOBS.items():
        rows = [r for r in result["rows"] if r["job"] == job]
        assert sorted((r["provider"], r["workload"], r["dtype"]) for r in rows) == sorted(
            (name, "tiny-many", d) for name in named for d in DTYPES)
        for r in rows:
            param, shadow = DTYPES[r["dtype"]]
            if not named[r["provider"]].own_shadow_dtype:
                shadow = param
            assert r["shadow"] == str(shadow).removeprefix("torch.")
            per_element = param.itemsize + 2 * k * DTYPES[r["dtype"]][1].itemsize  # counted with the shadow asked for
            assert r["numel"] == WORKLOADS[r["workload"]].numel
            assert r["gbps"] == pytest.approx(per_element * r["numel"] / (r["median_ms"] / 1e3) / 1e9)


def test_perf_suites_run(tmp_path):
    env = {**os.environ, "TRITON_EMA_BENCH": "tiny"}
    # --benchmark-max-time: the rounds of the benches that calibrate their own (their times mean nothing here).
    cmd = [sys.executable, "-m", "pytest", "perf/", "-q", "--benchmark-max-time=0.01", f"--benchmark-json={tmp_path / 'b.json'}"]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    benchmarks = json.loads((tmp_path / "b.json").read_text())["benchmarks"]
    jobs = {b["extra_info"]["job"] for b in benchmarks}
    assert jobs == {"update", "update-k2", "update-k4", "swap", "step", "storage check", "host step", "host step, ema_module",
                    "host bare lerp", "parity", "train"}
    assert all(b["extra_info"]["gbps"] > 0 for b in benchmarks if b["extra_info"]["job"] in ("update", "swap", *PROFILE_JOBS))


def _perf_script(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "perf" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_host_time_prints_the_ema_part_for_every_tensor_count():
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        _perf_script("host_time").main(["--tensors", "1", "3", "--batches", "1"])
    lines = printed.getvalue().splitlines()
    assert lines[0].startswith("torch ") and len(lines) == 3
    for n, line in zip((1, 3), lines[1:]):
        assert line.split()[:4] == [str(n), "tensors:", "EMA", "part"] and "storage check" in line


def test_record_writes_bench_and_sweep(tmp_path):
    # record.py's main in this process (it runs the bench and the sweep as commands of their own); one job
    # of the bench (the command's every job runs in test_bench_command_writes_table_json_and_plot).
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        failed = _perf_script("record").main(["--tiny", "--parts", "bench", "sweep", "--jobs", "update-k2",
                                              "--out", str(tmp_path)])
    assert not failed, printed.getvalue()[-3000:]
    assert {r["job"] for r in json.loads((tmp_path / "bench.json").read_text())["rows"]} == {"update-k2"}
    assert "device copy:" in (tmp_path / "bench.txt").read_text()
    assert (tmp_path / "bench.png").exists() and not (tmp_path / "tests.txt").exists()
    rows = json.loads((tmp_path / "sweep.json").read_text())["rows"]
    assert {(r["block"], r["job"]) for r in rows} == {(b, j) for b in (256, 512) for j in ("update", "swap")}
    assert all(r["gbps"] > 0 for r in rows)
    assert "BLOCK=" in (tmp_path / "sweep.txt").read_text()


def _row(provider, job, workload, dtype, ms, copy_fraction=None):
    return {"provider": provider, "job": job, "workload": workload, "dtype": dtype, "median_ms": ms,
            "copy_fraction": copy_fraction}


def test_targets_are_met_missed_or_not_measured():
    rows = [
        _row(OURS, "update", "1b", "fp32", 4.0, 0.91), _row(PEER, "update", "1b", "fp32", 5.0, 0.73),
        _row(OURS, "swap", "1b", "fp32", 5.0, 0.89),
        _row(OURS, "update", "2000x4096", "fp32", 0.1, 0.8), _row(PEER, "update", "2000x4096", "fp32", 0.11, 0.7),
        _row(PEER_AS_CALLED, "update", "2000x4096", "fp32", 0.31, 0.3),
        _row(OURS, "host", "1000x4096", "fp32", 0.051),
    ]
    found = {r["target"]: (r["status"], r["value"]) for r in check(rows)}
    expected = {
        "update 1b fp32: >= 90% of copy bandwidth": ("met", 0.91),
        "update 1b bf16: >= 90% of copy bandwidth": ("not measured", None),
        "swap 1b fp32: >= 90% of copy bandwidth": ("missed", 0.89),
        "swap 1b bf16: >= 90% of copy bandwidth": ("not measured", None),
        "update 1b fp32: at least as fast as foreach_lerp": ("met", 5.0 / 4.0),
        "update 2000x4096 fp32: >= 3x faster than foreach_lerp (lists per step)": ("met", 0.31 / 0.1),
        "update 2000x4096 fp32: >= 1.2x faster than foreach_lerp": ("missed", 0.11 / 0.1),
        "host 1000x4096 fp32: host time <= 50 us": ("missed", 0.051 * 1e3),
        "parity 2000x4096 fp32: triton-ema[torch] at least as fast as foreach_lerp": ("not measured", None),
        "parity 150x300000 fp32: triton-ema[torch] at least as fast as foreach_lerp": ("not measured", None),
    }
    assert {t: found[t] for t in expected} == expected
    assert {found[t] for t in found.keys() - expected.keys()} == {("not measured", None)}  # K-profile, training step
    unmeasured = sum(status == "not measured" for status, _ in found.values())
    assert report(check(rows)).count("not measured") == unmeasured + 1  # and the note on why


def test_profile_targets_compare_with_k_separate_updates_and_post_hoc_ema():
    cpu, k_lerps, gpt2 = "triton-ema[torch]", "K x foreach_lerp", "gpt2-small"
    rows = [_row(OURS, "update-k2", "1b", "fp32", 20.0, 0.92), _row("K x triton-ema[triton]", "update-k2", "1b", "fp32", 22.0),
            _row(OURS, "update-k4", "1b", "bf16", 30.0, 0.85),
            _row(OURS, "update-k2", gpt2, "fp32", 1.0), _row("PostHocEMA (ema-pytorch)", "update-k2", gpt2, "fp32", 6.0),
            _row(cpu, "update-k2", gpt2, "fp32", 100.0), _row(k_lerps, "update-k2", gpt2, "fp32", 101.0),
            _row(cpu, "update-k4", "2000x4096", "bf16", 50.0), _row(k_lerps, "update-k4", "2000x4096", "bf16", 40.0),
            _row(PEER, "update-k2", "1b", "fp32", 1.0)]  # a single foreach_lerp is no peer of the K-profile targets
    found = {r["target"]: (r["status"], r["value"]) for r in check(rows) if r["target"].startswith("update-k")}
    assert {t: v for t, v in found.items() if v[0] != "not measured"} == {
        "update-k2 1b fp32: >= 90% of copy bandwidth": ("met", 0.92),
        "update-k4 1b bf16: >= 90% of copy bandwidth": ("missed", 0.85),
        "update-k2 1b fp32: >= 1.15x faster than K x triton-ema[triton]": ("missed", 22.0 / 20.0),
        "update-k2 gpt2-small fp32: >= 5x faster than PostHocEMA (ema-pytorch)": ("met", 6.0),
        "update-k2 gpt2-small fp32: triton-ema[torch] at least as fast as K x foreach_lerp": ("met", 101.0 / 100.0),
        "update-k4 2000x4096 bf16: triton-ema[torch] at least as fast as K x foreach_lerp": ("missed", 40.0 / 50.0),
    }
    assert len(found) == 14


def test_parity_targets_compare_the_torch_backend_with_a_bare_foreach_lerp():
    rows = [_row("triton-ema[torch]", "parity", "2000x4096", "fp32", 10.0), _row(PEER, "parity", "2000x4096", "fp32", 10.5),
            _row("triton-ema[torch]", "parity", "150x300000", "fp32", 50.0), _row(PEER, "parity", "150x300000", "fp32", 49.0),
            _row(OURS, "parity", "2000x4096", "fp32", 1.0)]  # another provider's row counts for nothing here
    found = {r["target"]: (r["status"], r["value"]) for r in check(rows) if r["target"].startswith("parity")}
    assert found == {
        "parity 2000x4096 fp32: triton-ema[torch] at least as fast as foreach_lerp": ("met", 10.5 / 10.0),
        "parity 150x300000 fp32: triton-ema[torch] at least as fast as foreach_lerp": ("missed", 49.0 / 50.0),
    }


def test_training_step_targets_take_the_overlap_share_and_the_captured_excess_over_the_kernel():
    step = "bf16 autocast"
    rows = [{**_row("triton-ema overlap", "train", "gpt2-small", step, 101.0), "ema_share": 0.012},
            _row("triton-ema (captured)", "train", "gpt2-small", step, 100.3),
            _row("no EMA (captured)", "train", "gpt2-small", step, 100.0),
            _row(OURS, "update", "gpt2-small", "bf16", 0.4, 0.9)]
    found = {r["target"]: (r["status"], r["value"]) for r in check(rows) if r["target"].startswith("train")}
    assert found["train gpt2-small bf16 autocast: triton-ema overlap EMA share of the step <= 1%"] == ("missed", 0.012)
    status, value = found["train gpt2-small bf16 autocast: triton-ema (captured) at most 1x the update kernel's "
                          "time slower than no EMA (captured)"]
    assert status == "met" and value == pytest.approx(0.3 / 0.4)
    without_kernel = {r["target"]: r["status"] for r in check(rows[:3]) if r["target"].startswith("train")}
    assert sorted(without_kernel.values()) == ["missed", "not measured"]


def test_a_target_needs_both_rows_of_a_speedup():
    rows = [_row(OURS, "update", "2000x4096", "fp32", 0.1, 0.8)]
    status = {r["target"]: r["status"] for r in check(rows)}
    assert status["update 2000x4096 fp32: >= 3x faster than foreach_lerp (lists per step)"] == "not measured"
    assert status["update 2000x4096 fp32: >= 1.2x faster than foreach_lerp"] == "not measured"


def test_targets_only_runs_the_rows_the_gpu_targets_need(tmp_path):
    """--targets-only: the rows of the GPU's targets, mapped onto the tiny workloads with --tiny."""
    with contextlib.redirect_stdout(io.StringIO()):
        result = main(["--tiny", "--targets-only", "--jobs", "update", "host", "--out", str(tmp_path), "--quiet"])
    present = {p.name for p in providers() if p.absent is None}
    tiny = {"gpt2-small": "tiny-gpt2"}
    expected = {(provider, job, tiny.get(w, "tiny-many"), d) for t in TARGETS if t.device == "cuda"
                for provider, job, w, d in t.needs() if job in ("update", "host") and provider in present}
    assert {(r["provider"], r["job"], r["workload"], r["dtype"]) for r in result["rows"]} == expected
    assert len(result["rows"]) == len(expected)
    assert {(OURS, "update", "tiny-many", "fp32"), (PEER, "update", "tiny-many", "fp32"),
            (PEER_AS_CALLED, "update", "tiny-many", "fp32"), (OURS, "host", "tiny-many", "fp32")} <= expected


def test_gpu_check_tiny_runs_every_part_and_prints_every_gpu_target(tmp_path):
    """perf/gpu_check.py --tiny: every part in a process of its own, within its budget, on a CPU."""
    out = subprocess.run([sys.executable, "perf/gpu_check.py", "--tiny", "--out", str(tmp_path)], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [(p["part"], p["status"]) for p in summary["parts"]] == [
        (name, "ok") for name in ("compile", "tests", "bench", "host", "train", "sweep")]
    assert all(p["seconds"] <= p["budget"] for p in summary["parts"])
    gpu_targets = [str(t) for t in TARGETS if t.device == "cuda"]
    assert [t["target"] for t in summary["targets"]] == gpu_targets
    assert all(t["status"] == "not measured" for t in summary["targets"])  # tiny workloads
    for target in gpu_targets:
        assert target in out.stdout
    assert "passed" in (tmp_path / "tests.txt").read_text()
    assert (tmp_path / "bench" / "bench.json").is_file() and (tmp_path / "sweep.json").is_file()
    assert "REG" in (tmp_path / "compile.txt").read_text()
