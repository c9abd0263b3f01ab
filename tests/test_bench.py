"""Smoke tests: the bench command and the perf suites run and write well-formed output."""

import json
import os
import subprocess
import sys
from pathlib import Path

from triton_ema.bench.__main__ import main
from triton_ema.bench.providers import providers
from triton_ema.bench.targets import OURS, PEER, TARGETS, check, report
from triton_ema.bench.train import variants

ROOT = Path(__file__).resolve().parents[1]


def test_bench_command_writes_table_json_and_plot(tmp_path, capsys):
    main(["--tiny", "--out", str(tmp_path), "--quiet", "--reps", "2"])
    result = json.loads((tmp_path / "bench.json").read_text())
    env, rows = result["environment"], result["rows"]
    assert {"device", "torch", "triton", "commit", "date", "copy_gbps"} <= env.keys() and env["copy_gbps"] > 0
    present = {p.name for p in providers() if p.absent is None}
    assert {r["provider"] for r in rows if r["job"] != "train"} == present
    assert set(env["absent"]) - set(variants()) == {p.name for p in providers()} - present
    for r in rows:
        assert r["median_ms"] > 0 and r["triton_ema_speedup"] > 0
        assert (r["peak_extra_mb"] is None) == (r["job"] == "train")
        assert (r["gbps"] is None) == (r["job"] in ("step", "host", "train"))
    assert {r["job"] for r in rows} == {"update", "swap", "step", "host", "parity", "train"}
    parity = {r["provider"] for r in rows if r["job"] == "parity"}
    assert parity == {p.name for p in providers() if p.absent is None and "parity" in p.jobs}
    assert parity >= {"triton-ema[torch]", "foreach_lerp"}
    train = [r for r in rows if r["job"] == "train"]
    assert train[0]["provider"] == "no EMA" and train[0]["ema_share"] == 0
    assert {r["provider"] for r in train} | set(env["absent"]) >= {"triton-ema", "timm ModelEmaV3", "foreach mul_+add_ (NeMo)"}
    assert (tmp_path / "bench.png").read_bytes()[:4] == b"\x89PNG"
    assert [t["target"] for t in result["targets"]] == [str(t) for t in TARGETS]
    assert all(t["status"] == "not measured" and t["value"] is None for t in result["targets"])  # tiny workloads
    out = capsys.readouterr().out
    assert "device copy:" in out and "not measured" in out


def test_perf_suites_run(tmp_path):
    env = {**os.environ, "TRITON_EMA_BENCH": "tiny"}
    out = subprocess.run([sys.executable, "-m", "pytest", "perf/", "-q", f"--benchmark-json={tmp_path / 'b.json'}"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    benchmarks = json.loads((tmp_path / "b.json").read_text())["benchmarks"]
    jobs = {b["extra_info"]["job"] for b in benchmarks}
    assert jobs == {"update", "swap", "step", "storage check", "host step", "parity", "train"}
    assert all(b["extra_info"]["gbps"] > 0 for b in benchmarks if b["extra_info"]["job"] in ("update", "swap"))


def test_record_writes_bench_and_sweep(tmp_path):
    cmd = [sys.executable, "perf/record.py", "--tiny", "--parts", "bench", "sweep", "--out", str(tmp_path)]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert json.loads((tmp_path / "bench.json").read_text())["rows"]
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
        _row(OURS, "update", "2000x4096", "fp32", 0.1, 0.8), _row(PEER, "update", "2000x4096", "fp32", 0.31, 0.3),
        _row(OURS, "host", "1000x4096", "fp32", 0.051),
    ]
    found = {r["target"]: (r["status"], r["value"]) for r in check(rows)}
    assert found == {
        "update 1b fp32: >= 90% of copy bandwidth": ("met", 0.91),
        "update 1b bf16: >= 90% of copy bandwidth": ("not measured", None),
        "swap 1b fp32: >= 90% of copy bandwidth": ("missed", 0.89),
        "swap 1b bf16: >= 90% of copy bandwidth": ("not measured", None),
        "update 1b fp32: >= 1.3x faster than foreach_lerp": ("missed", 5.0 / 4.0),
        "update 2000x4096 fp32: >= 3x faster than foreach_lerp": ("met", 0.31 / 0.1),
        "host 1000x4096 fp32: host time <= 50 us": ("missed", 0.051 * 1e3),
        "parity 2000x4096 fp32: triton-ema[torch] at least as fast as foreach_lerp": ("not measured", None),
        "parity 150x300000 fp32: triton-ema[torch] at least as fast as foreach_lerp": ("not measured", None),
    }
    assert report(check(rows)).count("not measured") == 5  # four targets, and the note on why


def test_parity_targets_compare_the_torch_backend_with_a_bare_foreach_lerp():
    rows = [_row("triton-ema[torch]", "parity", "2000x4096", "fp32", 10.0), _row(PEER, "parity", "2000x4096", "fp32", 10.5),
            _row("triton-ema[torch]", "parity", "150x300000", "fp32", 50.0), _row(PEER, "parity", "150x300000", "fp32", 49.0),
            _row(OURS, "parity", "2000x4096", "fp32", 1.0)]  # another provider's row counts for nothing here
    found = {r["target"]: (r["status"], r["value"]) for r in check(rows) if r["target"].startswith("parity")}
    assert found == {
        "parity 2000x4096 fp32: triton-ema[torch] at least as fast as foreach_lerp": ("met", 10.5 / 10.0),
        "parity 150x300000 fp32: triton-ema[torch] at least as fast as foreach_lerp": ("missed", 49.0 / 50.0),
    }


def test_a_target_needs_both_rows_of_a_speedup():
    rows = [_row(OURS, "update", "2000x4096", "fp32", 0.1, 0.8)]
    status = {r["target"]: r["status"] for r in check(rows)}
    assert status["update 2000x4096 fp32: >= 3x faster than foreach_lerp"] == "not measured"
