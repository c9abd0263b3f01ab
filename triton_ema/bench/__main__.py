"""``python -m triton_ema.bench``: a quick sweep of every EMA provider on this device.

Prints a table and how the Triton backend stands against its targets, writes
``bench.json`` (device, versions, commit, date, every row, the targets) and
``bench.png`` (GB/s by provider and workload) to ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import json
import sys
from pathlib import Path
from typing import Any

import torch

from .measure import (
    PROFILE_JOBS,
    WORKLOADS,
    environment,
    frozen_heap,
    host_time,
    interleaved,
    job_bytes,
    median,
    peak_extra_bytes,
    timer,
)
from .providers import DTYPES, copy_job, make_job, providers
from .targets import TARGETS, check, report
from .train import default_config, train_rows

JOBS = ("update", *PROFILE_JOBS, "swap", "step", "host", "parity", "train")
# The host time of the EMA part of a step is measured on 1,000 tensors; the parity of a whole
# opt.step() with a bare torch._foreach_lerp_ on many small and on fewer large tensors, fp32.
JOB_WORKLOADS = {"host": ["1000x4096"], "parity": ["2000x4096", "150x300000"]}
JOB_DTYPES = {"parity": ["fp32"]}
# Jobs that --tiny runs on one tiny workload only (in Triton's CPU interpreter a K-profile row takes seconds).
TINY_ONE_WORKLOAD = {*JOB_WORKLOADS, *PROFILE_JOBS}


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m triton_ema.bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--workloads", nargs="+", choices=sorted(WORKLOADS), default=None,
                   help="default: 2000x4096 and gpt2-small, and 1b on a GPU")
    p.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["fp32", "bf16"],
                   help="fp32: fp32 params and shadows; bf16: bf16 params, fp32 shadows")
    p.add_argument("--jobs", nargs="+", choices=JOBS, default=list(JOBS))
    p.add_argument("--reps", type=int, default=None, help="timed calls per row (default: 5 on CPU, 100 on GPU)")
    p.add_argument("--tiny", action="store_true", help="tiny workloads: checks the machinery, measures nothing")
    p.add_argument("--targets-only", action="store_true",
                   help="only the rows this device's targets need, of --jobs (with --tiny, on tiny workloads)")
    p.add_argument("--out", type=Path, default=Path("runs/bench"))
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    args.device = torch.device(args.device)
    if args.workloads is None:
        args.workloads = ["tiny-many", "tiny-gpt2"] if args.tiny else [
            w for w in ("2000x4096", "gpt2-small", "1b") if args.device.type == "cuda" or not WORKLOADS[w].gpu_only]
    args.reps = args.reps or (1 if args.tiny else 5 if args.device.type == "cpu" else 100)
    args.warm = not args.tiny  # a warm-up call before the timed ones; a tiny run's times mean nothing
    return args


def timed_in_turn(job: str, device: torch.device) -> bool:
    """Whether the providers of one (job, workload, dtype) are timed in turn, call by call: the
    parity rows, and on a CPU the K-profile updates (their target is parity with K bare
    torch._foreach_lerp_ calls). On a GPU each K-profile row is timed alone, so that one
    provider's K shadows of 1B params at a time take the device's memory."""
    return job == "parity" or (job in PROFILE_JOBS and device.type == "cpu")


def all_batches(available, args) -> list[list[tuple]]:
    """Tasks timed together, one (job, workload, dtype) at a time: every provider of every job."""
    batches = []
    for job in args.jobs:
        for w in ["tiny-many"] if args.tiny and job in TINY_ONE_WORKLOAD else JOB_WORKLOADS.get(job, args.workloads):
            for d in [d for d in JOB_DTYPES.get(job, args.dtypes) if d in args.dtypes]:
                batch = [(p, job, WORKLOADS[w], d) for p in available if job in p.jobs]
                batches += [batch] if timed_in_turn(job, args.device) else [[task] for task in batch]
    return batches


def target_batches(available, args) -> list[list[tuple]]:
    """The rows of --jobs that this device's targets need (the training step's come from train_rows);
    with --tiny, those of the GPU's targets on the tiny workloads (the GPU run's machinery, anywhere)."""
    named = {p.name: p for p in available}
    device = "cuda" if args.tiny else args.device.type
    wanted: dict[tuple[str, str, str, str], None] = {}  # the rows in order, each once
    for provider, job, workload, dtype in (row for t in TARGETS if t.device == device for row in t.needs()):
        w = ("tiny-gpt2" if workload == "gpt2-small" else "tiny-many") if args.tiny else workload
        if job in args.jobs and job != "train" and provider in named and job in named[provider].jobs:
            wanted[(provider, job, w, dtype)] = None
    groups: dict[tuple, list] = {}
    for provider, job, w, dtype in wanted:
        groups.setdefault((job, w, dtype), []).append((named[provider], job, WORKLOADS[w], dtype))
    batches = []
    for (job, _, _), batch in groups.items():
        batches += [batch] if timed_in_turn(job, args.device) else [[task] for task in batch]
    return batches


def run_rows(tasks, args, measure):
    """One row per task. Tasks timed in turn (one job, workload and dtype) are timed three times
    as often (but with --tiny): the rows are compared with each other to a few percent."""
    if not timed_in_turn(tasks[0][1], args.device):
        return [run_row(*task, args, measure) for task in tasks]
    fns = [make_job(p, job, w, d, args.device) for p, job, w, d in tasks]
    times = interleaved(fns, args.reps if args.tiny else 3 * args.reps, measure, args.warm)
    return [run_row(*task, args, measure, made=(fn, ts)) for task, fn, ts in zip(tasks, fns, times)]


def run_row(provider, job, workload, dtype_name, args, measure, made=None):
    """``made``: the job's function and its times, where they were taken beside others'."""
    param_dtype, shadow_dtype = DTYPES[dtype_name]
    if made is None:
        fn = make_job(provider, job, workload, dtype_name, args.device)
        seconds = median(host_time(fn, args.reps, args.device, args.warm) if job == "host" else measure(fn, args.reps))
    else:
        fn, seconds = made[0], median(made[1])
    peak = peak_extra_bytes(fn, args.device)
    nbytes = job_bytes(job, param_dtype.itemsize, shadow_dtype.itemsize)
    gbps = nbytes * workload.numel / seconds / 1e9 if nbytes else None
    del fn, made
    gc.collect()
    if args.device.type == "cuda":
        torch.cuda.empty_cache()
    shadow = shadow_dtype if provider.own_shadow_dtype else param_dtype
    return {"job": job, "workload": workload.name, "tensors": len(workload.shapes), "numel": workload.numel,
            "dtype": dtype_name, "shadow": str(shadow).replace("torch.", ""), "provider": provider.name,
            "median_ms": seconds * 1e3, "gbps": gbps,
            "peak_extra_mb": None if peak is None else peak / 2**20}


def add_ratios(rows, copy_gbps):
    """Fraction of copy bandwidth, and how much faster the best triton-ema is than each row."""
    for row in rows:
        row["copy_fraction"] = row["gbps"] / copy_gbps if row["gbps"] else None
        group = [r for r in rows if (r["job"], r["workload"], r["dtype"]) == (row["job"], row["workload"], row["dtype"])]
        ours = min((r["median_ms"] for r in group if r["provider"].startswith("triton-ema")), default=None)
        row["triton_ema_speedup"] = row["median_ms"] / ours if ours else None


def table(rows) -> str:
    head = (f"{'job':9} {'workload':11} {'dtype':5} {'provider':26} {'shadow':8} {'ms':>9} {'GB/s':>7} {'copy%':>6} "
            f"{'ours x':>7} {'+MB':>8}")
    lines = [head, "-" * len(head)]
    for r in rows:
        gbps = f"{r['gbps']:7.1f}" if r["gbps"] else f"{'-':>7}"
        frac = f"{100 * r['copy_fraction']:5.0f}%" if r["copy_fraction"] else f"{'-':>6}"
        extra = f"{r['peak_extra_mb']:8.1f}" if r["peak_extra_mb"] is not None else f"{'-':>8}"
        lines.append(f"{r['job']:9} {r['workload']:11} {r['dtype']:5} {r['provider']:26} {r['shadow']:8} {r['median_ms']:9.3f} "
                     f"{gbps} {frac} {r['triton_ema_speedup']:6.2f}x {extra}")
    return "\n".join(lines)


def train_table(rows) -> str:
    r0 = rows[0]
    lines = [f"training step: {r0['workload']} ({r0['numel'] / 1e6:.1f}M parameters in {r0['tensors']} tensors), "
             f"{r0['dtype']}, AdamW; EMA share = (step - step without EMA) / step",
             f"{'variant':26} {'ms':>9} {'EMA share':>10}"]
    lines += [f"{r['provider']:26} {r['median_ms']:9.2f} {100 * r['ema_share']:9.1f}%" for r in rows]
    return "\n".join(lines)


def plot(rows, env, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    jobs = [j for j in ("update", *PROFILE_JOBS, "swap") if any(r["job"] == j and r["gbps"] for r in rows)]
    own_dtype = {r["provider"] for r in rows if r["dtype"] == "bf16" and r["shadow"] != "float32"}
    fig, axes = plt.subplots(1, max(1, len(jobs)), figsize=(7 * max(1, len(jobs)), 4.5), squeeze=False)
    for ax, job in zip(axes[0], jobs):
        sel = [r for r in rows if r["job"] == job and r["gbps"]]
        groups = list(dict.fromkeys(f"{r['workload']}\n{r['dtype']}" for r in sel))
        names = list(dict.fromkeys(r["provider"] for r in sel))
        width = 0.8 / len(names)
        for i, name in enumerate(names):
            values = {f"{r['workload']}\n{r['dtype']}": r["gbps"] for r in sel if r["provider"] == name}
            label = f"{name} *" if name in own_dtype else name
            ax.bar([g + i * width for g in range(len(groups))], [values.get(g, 0) for g in groups], width, label=label)
        ax.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))], groups)
        ax.axhline(env["copy_gbps"], color="black", linestyle="--", linewidth=1, label="device copy")
        ax.set(ylabel="GB/s (bytes the job must move / time)", title=f"EMA {job}")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7)
    note = "; * keeps bf16 shadows for bf16 params (moves fewer bytes than counted)" if own_dtype else ""
    fig.suptitle(f"{env['device']}, torch {env['torch']}, triton {env['triton']}{note}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def replot(json_path: Path, png_path: Path) -> None:
    """Draw the plot again from a saved ``bench.json``."""
    result = json.loads(json_path.read_text())
    plot(result["rows"], result["environment"], png_path)


def main(argv=None) -> dict:
    from tqdm.auto import tqdm

    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    measure = timer(args.device, args.warm)
    env = environment(args.device)
    copy_fn, copy_bytes = copy_job(2**16 if args.tiny else 2**26 if args.device.type == "cpu" else 2**28, args.device)
    env["copy_gbps"] = copy_bytes / median(measure(copy_fn, args.reps)) / 1e9
    del copy_fn

    available = [p for p in providers() if p.absent is None]
    env["absent"] = {p.name: p.absent for p in providers() if p.absent is not None}
    batches = target_batches(available, args) if args.targets_only else all_batches(available, args)
    # A tiny row takes milliseconds: there the full garbage collection before each row's memory
    # measurement would take most of the run, so it skips what was alive before the rows.
    with frozen_heap() if args.tiny else contextlib.nullcontext():
        rows = [row for batch in tqdm([b for b in batches if b], desc="bench", unit="row", disable=args.quiet)
                for row in run_rows(batch, args, measure)]
        if "train" in args.jobs:
            found, absent = train_rows(default_config(args.device, args.tiny), args.device, args.reps, measure,
                                       functools.partial(interleaved, warm=args.warm), median)
            rows += found
            env["absent"].update(absent)
    add_ratios(rows, env["copy_gbps"])

    result: dict[str, Any] = {"environment": env, "rows": rows, "targets": check(rows)}
    json_path, png_path = args.out / "bench.json", args.out / "bench.png"
    json_path.write_text(json.dumps(result, indent=1))
    plot(rows, env, png_path)
    print(f"{env['device']}; torch {env['torch']}, triton {env['triton']}; commit {env['commit']}; {env['date']}")
    print(f"device copy: {env['copy_gbps']:.1f} GB/s")
    print(table([r for r in rows if r["job"] != "train"]))
    if "train" in args.jobs:
        print(train_table([r for r in rows if r["job"] == "train"]))
    for name, why in env["absent"].items():
        print(f"absent: {name}: {why}")
    print("GB/s counts the bytes the job must move with the shadow dtype asked for (fp32 for bf16 params); a provider\n"
          "that keeps shadows in the params' dtype (see 'shadow') moves fewer, so its GB/s reads high.\n"
          "update-kK: K EMAs of the same params in one update (param + 2·K·shadow bytes per element).")
    print(report(result["targets"]))
    print(f"wrote {json_path} and {png_path}")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
