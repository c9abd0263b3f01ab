"""Workloads, timing, memory and the facts of the machine, for the benchmarks."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import datetime
import functools
import gc
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor


@dataclass(frozen=True)
class Workload:
    name: str
    shapes: tuple[tuple[int, ...], ...]
    gpu_only: bool = False

    @property
    def numel(self) -> int:
        return sum(torch.Size(s).numel() for s in self.shapes)

    def params(self, dtype: torch.dtype, device: torch.device, seed: int = 0) -> list[Tensor]:
        g = torch.Generator(device=device).manual_seed(seed)
        return [torch.nn.Parameter(torch.randn(s, generator=g, device=device).to(dtype)) for s in self.shapes]


def gpt2_small_shapes(d: int = 768, layers: int = 12, vocab: int = 50257, ctx: int = 1024) -> tuple:
    """GPT-2 small's parameter list: 148 tensors, 124.4M elements."""
    block = [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,), (d,), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,)]
    return ((vocab, d), (ctx, d), *block * layers, (d,), (d,))


WORKLOADS = {
    "2000x4096": Workload("2000x4096", ((4096,),) * 2000),
    "gpt2-small": Workload("gpt2-small", gpt2_small_shapes()),
    "1b": Workload("1b", ((4096, 813),) * 300, gpu_only=True),  # 999M in 300 tensors
    "1000x4096": Workload("1000x4096", ((4096,),) * 1000),
    "150x300000": Workload("150x300000", ((300000,),) * 150),
    # Tiny stand-ins, for smoke tests of the machinery itself (few tensors: on a CPU, Triton's
    # interpreter runs a kernel's programs one by one, one or more per tensor).
    "tiny-many": Workload("tiny-many", ((64,),) * 16),
    "tiny-gpt2": Workload("tiny-gpt2", gpt2_small_shapes(d=16, layers=1, vocab=100, ctx=32)),
}

# The K-profile update: K EMAs of the same params in one update, by job name.
PROFILE_JOBS = {"update-k2": 2, "update-k4": 4}


# Bytes a job must move per element, for (param bytes, shadow bytes): the design's formulas.
def job_bytes(job: str, ep: int, es: int) -> int | None:
    if job in ("update", "parity"):  # read param, read + write shadow
        return ep + 2 * es
    if job in PROFILE_JOBS:  # read the param once, read + write K shadows
        return ep + 2 * PROFILE_JOBS[job] * es
    if job == "swap":  # in and out: an in-place exchange twice, or stash + copy in, copy back
        return 4 * (ep + es) if ep == es else 5 * ep + es
    return None  # a whole optimizer step: time only


def timer(device: torch.device, warm: bool = True) -> Callable[[Callable[[], object], int], list[float]]:
    """Seconds per call, for ``reps`` calls after a warm-up call (by default, ``warm``)."""
    def cuda_time(fn, reps, warm=warm):
        import triton.testing

        ms = triton.testing.do_bench(fn, warmup=25 if warm else 1, rep=max(100, reps * 10), return_mode="all")
        return [m / 1e3 for m in ms]

    def cpu_time(fn, reps, warm=warm):
        if warm:
            fn()
        out = []
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            out.append(time.perf_counter() - start)
        return out

    if device.type == "cuda":
        return cuda_time
    steady_allocator()
    return cpu_time


def host_time(fn: Callable[[], object], reps: int, device: torch.device, warm: bool = True) -> list[float]:
    """Seconds the host spends in each call (after a warm-up call, ``warm``), the device idle
    before it and not waited for (on a CPU the work itself is host time)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if warm:
        fn()
    out = []
    for _ in range(reps):
        sync()
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    sync()
    return out


def interleaved(fns: list[Callable[[], object]], reps: int, measure, warm: bool = True) -> list[list[float]]:
    """Seconds per call of each of ``fns``, timed in turn, one call each per round (after a
    warm-up call each, ``warm``): a machine whose speed drifts (other processes, clocks) slows
    them all alike."""
    out: list[list[float]] = [[] for _ in fns]
    if warm:
        for fn in fns:
            fn()
    for _ in range(reps):
        for fn, times in zip(fns, out):
            times += measure(fn, 1, warm=False)
    return out


@contextlib.contextmanager
def frozen_heap():
    """Leaves what is alive on entry (torch's and the peers' objects) out of garbage collection
    until exit: a collection then scans only what was made since (a full one takes 0.1-0.3 s)."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise OSError(f"no {field} in /proc/self/status")


# glibc's malloc settings (mallopt parameters).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
# While timing: what glibc's dynamic thresholds settle at in a long-running process
# (blocks under 32 MB are reused once freed, the largest mapped and unmapped).
_TIMING = {_M_MMAP_THRESHOLD: 32 * 2**20, _M_TRIM_THRESHOLD: 64 * 2**20}
# While measuring memory: every block of 64 KiB or more goes back to the OS when
# freed, so that resident memory follows what is allocated.
_MEASURING = {_M_MMAP_THRESHOLD: 64 * 2**10, _M_TRIM_THRESHOLD: 64 * 2**10}


@functools.cache
def _libc():
    """glibc, or None (another C library, or not Linux)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
    except (OSError, TypeError):
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


def _malloc_settings(settings: dict[int, int]) -> None:
    libc = _libc()
    if libc is not None:
        for param, value in settings.items():
            libc.mallopt(param, value)


def steady_allocator() -> None:
    """Fix glibc's thresholds where a long-running process settles, so every timing
    sees the same allocator whatever ran before it."""
    _malloc_settings(_TIMING)


def peak_extra_bytes(fn: Callable[[], object], device: torch.device) -> int | None:
    """Peak memory a call takes beyond what was in use before it.

    CUDA: the caching allocator's peak. CPU (Linux): the process's peak
    resident memory (VmHWM, reset through /proc/self/clear_refs) over its
    resident memory before the call; None where that cannot be read."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    _malloc_settings(_MEASURING)
    try:
        libc = _libc()
        if libc is not None:
            libc.malloc_trim(0)  # freed memory back to the OS: the baseline is what is in use
        Path("/proc/self/clear_refs").write_text("5")  # peak RSS := current RSS
        base = _rss_kb("VmRSS")
        fn()
        return max(0, _rss_kb("VmHWM") - base) * 1024
    except OSError:
        return None
    finally:
        steady_allocator()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({torch.get_num_threads()} threads)"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def environment(device: torch.device) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                                cwd=Path(__file__).parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {
        "device": device_name(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "commit": commit,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
