"""Tune the Triton kernels' launch shape: ``python perf/sweep.py`` on a GPU.

For each (BLOCK, num_warps), applied to every launch of the Triton backend,
it times the update and the swap (``--jobs``: also the K-profile updates) on
the benchmark workloads and prints GB/s and the fraction of the device's copy
bandwidth; ``--out`` writes the JSON to keep under perf/results/.
``--tiny`` checks the machinery anywhere (CPU: Triton's interpreter).
"""

import argparse
import itertools
import json
import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from triton_ema import triton_backend  # noqa: E402
from triton_ema.bench.measure import PROFILE_JOBS, WORKLOADS, environment, job_bytes, median, timer  # noqa: E402
from triton_ema.bench.providers import DTYPES, copy_job, make_job, triton_ema  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--blocks", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    p.add_argument("--warps", type=int, nargs="+", default=[4, 8, 16])
    p.add_argument("--workloads", nargs="+", default=["1b", "2000x4096"], choices=sorted(WORKLOADS))
    p.add_argument("--jobs", nargs="+", default=["update", "swap"], choices=["update", *PROFILE_JOBS, "swap"])
    p.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=sorted(DTYPES))
    p.add_argument("--reps", type=int, default=100, help="timed calls per row (do_bench: at least 10 x reps ms)")
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.tiny:
        args.blocks, args.warps, args.workloads = [256, 512], [4], ["tiny-many"]
    elif device.type != "cuda":
        p.error("the sweep measures GPU kernels: run it on a GPU (or --tiny to check it)")
    measure, reps = timer(device, warm=not args.tiny), 1 if args.tiny else args.reps  # tiny: no warm-up, one call
    env = environment(device)
    copy_fn, copy_bytes = copy_job(2**16 if args.tiny else 2**28, device)
    env["copy_gbps"] = copy_bytes / median(measure(copy_fn, reps)) / 1e9
    provider, rows = triton_ema("triton"), []
    for block, warps, name, dtype, job in itertools.product(args.blocks, args.warps, args.workloads, args.dtypes,
                                                            args.jobs):
        triton_backend.FORCED_SHAPE = (block, warps)  # every launch of the backend
        param_dtype, shadow_dtype = DTYPES[dtype]
        workload = WORKLOADS[name]
        fn = make_job(provider, job, workload, dtype, device)
        seconds = median(measure(fn, reps))
        gbps = job_bytes(job, param_dtype.itemsize, shadow_dtype.itemsize) * workload.numel / seconds / 1e9
        rows.append({"block": block, "num_warps": warps, "workload": name, "dtype": dtype, "job": job,
                     "median_ms": seconds * 1e3, "gbps": gbps, "copy_fraction": gbps / env["copy_gbps"]})
        print(f"BLOCK={block:5d} warps={warps:2d} {name:10} {dtype} {job:9} {seconds * 1e3:9.3f} ms "
              f"{gbps:8.1f} GB/s {100 * gbps / env['copy_gbps']:5.1f}% of copy", flush=True)
        del fn
        if device.type == "cuda":
            torch.cuda.empty_cache()
    triton_backend.FORCED_SHAPE = None
    if args.out:
        args.out.write_text(json.dumps({"environment": env, "rows": rows}, indent=1))
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
