"""Smoke tests: the bench command and the perf suites run and write well-formed output."""

import json
import os
import subprocess
import sys
from pathlib import Path

from triton_ema.bench.__main__ import main
from triton_ema.bench.providers import providers

ROOT = Path(__file__).resolve().parents[1]


def test_bench_command_writes_table_json_and_plot(tmp_path, capsys):
    main(["--tiny", "--out", str(tmp_path), "--quiet", "--reps", "2"])
    result = json.loads((tmp_path / "bench.json").read_text())
    env, rows = result["environment"], result["rows"]
    assert {"device", "torch", "triton", "commit", "date", "copy_gbps"} <= env.keys() and env["copy_gbps"] > 0
    present = {p.name for p in providers() if p.absent is None}
    assert {r["provider"] for r in rows} == present
    assert set(env["absent"]) == {p.name for p in providers()} - present
    for r in rows:
        assert r["median_ms"] > 0 and r["peak_extra_mb"] >= 0 and r["triton_ema_speedup"] > 0
        assert (r["gbps"] is None) == (r["job"] in ("step", "host"))
    assert {r["job"] for r in rows} == {"update", "swap", "step", "host"}
    assert (tmp_path / "bench.png").read_bytes()[:4] == b"\x89PNG"
    assert "device copy:" in capsys.readouterr().out


def test_perf_suites_run(tmp_path):
    env = {**os.environ, "TRITON_EMA_BENCH": "tiny"}
    out = subprocess.run([sys.executable, "-m", "pytest", "perf/", "-q", f"--benchmark-json={tmp_path / 'b.json'}"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    benchmarks = json.loads((tmp_path / "b.json").read_text())["benchmarks"]
    jobs = {b["extra_info"]["job"] for b in benchmarks}
    assert jobs == {"update", "swap", "step"}
    assert all(b["extra_info"]["gbps"] > 0 for b in benchmarks if b["extra_info"]["job"] != "step")


def test_kernel_sweep_runs(tmp_path):
    out = subprocess.run([sys.executable, "perf/sweep.py", "--tiny", "--out", str(tmp_path / "sweep.json")],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    rows = json.loads((tmp_path / "sweep.json").read_text())["rows"]
    assert {(r["block"], r["job"]) for r in rows} == {(b, j) for b in (256, 512) for j in ("update", "swap")}
    assert all(r["gbps"] > 0 for r in rows)
