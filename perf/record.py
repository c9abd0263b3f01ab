"""Record this machine's results: ``python perf/record.py``.

Runs the test suite (on CUDA when there is a GPU), the bench command and,
on a GPU, the kernel sweep; writes their output to
``perf/results/<device>/`` (tests.txt, bench.txt/json/png, sweep.txt/json),
ready to commit. ``--parts`` runs some of them (one call each on a machine
that limits how long a command may run); ``--jobs`` some of the bench's jobs
(with ``--out`` a folder of their own, so as not to overwrite a full run);
``--tiny --parts bench sweep`` checks the machinery in under half a minute.
"""

import argparse
import re
import subprocess
import sys
from pathlib import Path

import torch

from triton_ema.bench.__main__ import JOBS
from triton_ema.bench.measure import device_name

ROOT = Path(__file__).resolve().parents[1]
PARTS = ["tests", "bench", "sweep"]


def run(cmd: list[str], log: Path) -> int:
    """Run ``cmd`` from the repository root, echoing its output and keeping it in ``log``."""
    print("$", " ".join(cmd), flush=True)
    with subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc, \
            log.open("w") as out:
        for line in proc.stdout:
            sys.stdout.write(line)
            out.write(line)
    return proc.returncode


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, help="default: perf/results/<device name>")
    p.add_argument("--parts", nargs="+", choices=PARTS, default=PARTS, help="the sweep runs on a GPU (or with --tiny)")
    p.add_argument("--jobs", nargs="+", choices=JOBS, help="the bench's jobs (default: all)")
    p.add_argument("--tiny", action="store_true", help="tiny workloads: checks the machinery, measures nothing")
    args = p.parse_args(argv)
    gpu = torch.cuda.is_available()
    device = device_name(torch.device("cuda" if gpu else "cpu"))
    out = args.out or ROOT / "perf" / "results" / re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-")
    out.mkdir(parents=True, exist_ok=True)
    tiny = ["--tiny"] if args.tiny else []
    jobs = ["--jobs", *args.jobs] if args.jobs else []
    commands = {
        "tests": [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"],
        "bench": [sys.executable, "-m", "triton_ema.bench", "--quiet", "--out", str(out), *tiny, *jobs],
        "sweep": [sys.executable, "perf/sweep.py", "--out", str(out / "sweep.json"), *tiny] if gpu or args.tiny else None,
    }
    failed = [part for part in args.parts if commands[part] and run(commands[part], out / f"{part}.txt")]
    print(f"{device}: results in {out}" + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
