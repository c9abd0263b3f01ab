"""The first thing to run on a GPU machine: ``python perf/gpu_check.py`` (at most 5 minutes).

Needs no network: torch, Triton and pytest installed, and this package with
``pip install --no-deps --no-build-isolation -e .``. Runs, each part a
process of its own with its own time budget (killed when it runs over, so a
slow part cannot eat the others' time), and writes every part's output under
``perf/results/<device>/gpu-check/``:

============  ======  ==========================================================
part          budget  what
============  ======  ==========================================================
compile         30 s  ``perf/occupancy.py`` for this GPU's architecture (sm_90 or
                      sm_80): registers, spills, occupancy; fills Triton's cache
tests          100 s  the CUDA tests: kernels, CUDA-graph capture, overlap,
                      device schedules, flat memory over 1,000 steps
bench           60 s  the bench rows that carry a target (update, K profiles, swap)
host            15 s  the host time of ``opt.step()`` on 1,000 x 4,096 (its target)
train           50 s  GPT-2 small training steps: no EMA, ours, ``overlap=True``,
                      captured, the peers
sweep           40 s  BLOCK 1024/2048/4096 x 4/8 warps on 1B params
============  ======  ==========================================================

then prints every GPU target as met, missed or not measured, the peers found
absent (torch-ema and ema-pytorch may be: reported, not a failure), and each
part's time (``summary.txt``, ``summary.json``). The exit status is 1 when a
part failed or ran out of time; a missed target is a result, not a failure.

GPU time, estimated from the sizes for an H100 (3.35 TB/s; an H200 is faster):

- compile: 264 launches (132 kinds, full and tail) on 16 CPU cores, 0.3-1 s
  each: 5-20 s.
- tests: about 100 Triton specialisations compiled at 0.3-0.5 s (30-50 s, less
  where the compile part's cache serves them); the tensors are small (the
  largest 2**20 + 3 elements), so running takes seconds; 1,000 steps of the
  memory test at well under 1 ms each: 1-2 s a case.
- bench: 16 rows, 10 of them on 1B params. One row is building its
  params and optimizer (1B fp32: 4 GB written, about 3 ms at copy speed, plus
  the allocator: under 1 s), ``do_bench`` for 10 x 50 = 500 ms, and one call
  for its peak memory: about 1.5 s, so about 25 s, plus 10 s to start (and
  the device copy timed once, 2 GB moved per call).
- host: 1 row, 1,000 tensors: about 5 s with the start.
- train: 8 variants of GPT-2 small (124M params; AdamW, grads and an EMA:
  about 2.5 GB each), batch 8 x 1,024 tokens in bf16: a step of about 6 x
  124M x 8,192 = 6.1 TFLOP, 20-40 ms at 150-300 TFLOP/s. 10 rounds, each
  timing every variant with ``do_bench`` (5 steps to estimate, then at least
  100 ms: about 0.25 s): 10 x 8 x 0.25 s = 20 s, plus building and capturing
  the models: about 35-45 s.
- sweep: 3 blocks x 2 warp counts x 2 dtypes x 3 jobs = 36 rows on 1B
  params; each times its calls for 100 ms (``--reps 10``) after building the
  params: about 0.6 s a row, 22 s, plus the start.

Sum: about 2.5-3 minutes, within the 5-minute cap (the budgets add up to
295 s). ``--tiny`` runs the same parts on tiny sizes, on any machine, in
under a minute: it checks the machinery and measures nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from triton_ema.bench.measure import device_name
from triton_ema.bench.targets import TARGETS, check

ROOT = Path(__file__).resolve().parents[1]
TOTAL_S = 300  # the whole check, all parts together
TESTS = ["tests/test_kernels.py", "tests/test_capture.py", "tests/test_overlap.py", "tests/test_device_schedules.py",
         "tests/test_reliability.py::test_memory_stays_flat_over_1000_steps"]
# --tiny: one test of each machinery (a kernel in the interpreter, a capture and an overlap test that
# skip without a GPU), as names pytest selects.
TINY_TESTS = ["tests/test_kernels.py::test_dense_non_contiguous_params",
              "tests/test_capture.py::test_a_captured_training_step_replays_bitwise_like_eager_steps",
              "tests/test_overlap.py::test_a_step_never_waits_on_the_host",
              "tests/test_device_schedules.py::test_a_captured_cuda_graph_advances_the_schedule_at_every_replay"]


def parts(out: Path, tiny: bool, arch: int | None) -> list[tuple[str, int, list[str] | None]]:
    """(name, budget in seconds, command or None where it cannot run here)."""
    py = sys.executable
    bench = [py, "-m", "triton_ema.bench", "--quiet", *(["--tiny"] if tiny else [])]

    def reps(n):  # --tiny: one call per row
        return [] if tiny else ["--reps", str(n)]

    occupancy = [py, "perf/occupancy.py", "--arch", str(arch or 90)]
    if tiny:
        occupancy += ["--pairs", "fp32/fp32", "--full-only"]
    sweep = ([py, "perf/sweep.py", "--tiny"] if tiny else
             [py, "perf/sweep.py", "--workloads", "1b", "--blocks", "1024", "2048", "4096", "--warps", "4", "8",
              "--jobs", "update", "update-k2", "swap", "--reps", "10"])
    return [
        ("compile", 30, occupancy if tiny or arch in (80, 90) else None),
        ("tests", 100, [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", *(TINY_TESTS if tiny else TESTS)]),
        ("bench", 60, [*bench, "--targets-only", "--jobs", "update", "update-k2", "update-k4", "swap", *reps(50),
                       "--out", str(out / "bench")]),
        ("host", 15, [*bench, "--targets-only", "--jobs", "host", "--out", str(out / "host")]),
        ("train", 50, [*bench, "--jobs", "train", *reps(10), "--out", str(out / "train")]),
        ("sweep", 40, [*sweep, "--out", str(out / "sweep.json")]),
    ]


def run_part(cmd: list[str], budget: float, log: Path, env: dict) -> tuple[str, float]:
    """Run ``cmd`` from the repository root for at most ``budget`` seconds, its output in ``log``;
    (status: ok, failed or timed out; seconds). Over budget, its whole process group is killed."""
    start = time.monotonic()
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
        try:
            code = proc.wait(timeout=budget)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            f.write(f"\n[gpu_check] killed after its budget of {budget:.0f} s\n")
            return "timed out", time.monotonic() - start
    return ("ok" if code == 0 else "failed"), time.monotonic() - start


def _rows(out: Path) -> tuple[list[dict], dict]:
    """Every row the bench parts wrote, and the providers they found absent."""
    rows, absent = [], {}
    for name in ("bench", "host", "train"):
        path = out / name / "bench.json"
        if path.is_file():
            result = json.loads(path.read_text())
            rows += result["rows"]
            absent.update(result["environment"].get("absent", {}))
    return rows, absent


def summary(out: Path, results: list[dict], device: str) -> tuple[str, dict]:
    rows, absent = _rows(out)
    gpu_targets = {str(t) for t in TARGETS if t.device == "cuda"}
    targets = [r for r in check(rows) if r["target"] in gpu_targets]
    lines = [f"{device}: GPU check, torch {torch.__version__}; results in {out}"]
    for r in results:
        lines.append(f"  part {r['part']:8} {r['status']:10} {r['seconds']:6.1f} s of {r['budget']} s")
    tests = out / "tests.txt"
    if tests.is_file() and tests.read_text().strip():
        lines.append("  tests: " + tests.read_text().strip().splitlines()[-1])
    lines.append("targets:")
    for t in targets:
        value = "-" if t["value"] is None else f"{t['value']:.3g}"
        lines.append(f"  {t['status']:12} {value:>7}  {t['target']}")
    lines += [f"absent: {name}: {why}" for name, why in absent.items()]
    return "\n".join(lines), {"device": device, "parts": results, "targets": targets, "absent": absent}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny sizes on any machine: checks the machinery in under a minute")
    p.add_argument("--out", type=Path, help="default: perf/results/<device>/gpu-check")
    p.add_argument("--parts", nargs="+", help="run only these parts (default: all)")
    args = p.parse_args(argv)
    gpu = torch.cuda.is_available()
    if not gpu and not args.tiny:
        p.error("no CUDA device here: run it on a GPU machine (or --tiny to check the machinery)")
    device = device_name(torch.device("cuda" if gpu else "cpu"))
    arch = None
    if gpu:
        major, minor = torch.cuda.get_device_capability()
        arch = 10 * major + minor
    out = args.out or ROOT / "perf" / "results" / re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-") / "gpu-check"
    out.mkdir(parents=True, exist_ok=True)
    # Without a GPU (--tiny) the Triton backend's rows run in Triton's CPU interpreter.
    env = os.environ if gpu else {**os.environ, "TRITON_INTERPRET": "1"}
    deadline = time.monotonic() + TOTAL_S
    results = []
    for name, budget, cmd in parts(out, args.tiny, arch):
        if args.parts and name not in args.parts:
            continue
        left = deadline - time.monotonic()
        if cmd is None or left < 1:
            why = "not for this architecture" if cmd is None else "no time left"
            results.append({"part": name, "budget": budget, "status": f"skipped: {why}", "seconds": 0.0})
            continue
        print(f"[gpu_check] {name} (budget {min(budget, left):.0f} s): {' '.join(cmd[1:])}", flush=True)
        status, seconds = run_part(cmd, min(budget, left), out / f"{name}.txt", env)
        results.append({"part": name, "budget": budget, "status": status, "seconds": seconds})
    text, data = summary(out, results, device)
    (out / "summary.txt").write_text(text + "\n")
    (out / "summary.json").write_text(json.dumps(data, indent=1))
    print(text)
    return 1 if any(r["status"] in ("failed", "timed out") for r in results) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
