"""The performance targets, checked against a bench run's rows.

Each target names one row (job, workload, dtype) of ``triton-ema[triton]``
(or, for the CPU's parity with bare ``torch._foreach_lerp_`` calls, of
``triton-ema[torch]``) and a bound: a fraction of the device's copy bandwidth,
a speed-up over another provider's row (``torch._foreach_lerp_`` on lists
built once, unless the target names another: the same call with its lists
rebuilt from the params every step, as peers make it, or another EMA), or the
host time of the EMA part of a step. ``device``: where the target's rows are
measured (``python perf/gpu_check.py`` runs those of "cuda"). A target
whose rows were not measured (no GPU, or the workload was left out) says so;
it is never counted as met.
"""

from __future__ import annotations

from dataclasses import dataclass

from .measure import PROFILE_JOBS

OURS = "triton-ema[triton]"
PEER = "foreach_lerp"  # prebuilt lists: the kernel alone
PEER_AS_CALLED = "foreach_lerp (lists per step)"  # the lists rebuilt from the params every step, as timm's ModelEmaV3 does


@dataclass(frozen=True)
class Target:
    job: str
    workload: str
    dtype: str
    # "copy_fraction" (at least), "speedup" over ``peer`` (at least), "host_us" (at most), "ema_share"
    # (at most: the EMA's share of a training step), or "over_kernel" (at most: how many times the EMA
    # kernel's own time, the update row of the same params, ``provider``'s step takes beyond ``peer``'s)
    measure: str
    bound: float
    provider: str = OURS
    peer: str = PEER
    device: str = "cuda"  # where its rows are measured: "cuda" or "cpu"

    def __str__(self) -> str:
        what = {"copy_fraction": f">= {self.bound:.0%} of copy bandwidth",
                "speedup": f">= {self.bound:g}x faster than {self.peer}" if self.bound != 1 else
                f"at least as fast as {self.peer}",
                "host_us": f"host time <= {self.bound:g} us",
                "ema_share": f"EMA share of the step <= {self.bound:.0%}",
                "over_kernel": f"at most {self.bound:g}x the update kernel's time slower than {self.peer}"}[self.measure]
        who = "" if self.provider == OURS else f"{self.provider} "
        return f"{self.job} {self.workload} {self.dtype}: {who}{what}"

    def needs(self) -> list[tuple[str, str, str, str]]:
        """The (provider, job, workload, dtype) rows its value is computed from."""
        if self.measure == "over_kernel":
            return [(self.provider, self.job, self.workload, self.dtype), (self.peer, self.job, self.workload, self.dtype),
                    (OURS, "update", self.workload, "bf16")]
        own = [(self.provider, self.job, self.workload, self.dtype)]
        return own + [(self.peer, self.job, self.workload, self.dtype)] if self.measure == "speedup" else own

    def value(self, rows: list[dict]) -> float | None:
        """The measured figure, or None when a row it needs is missing."""
        ours, peer = _row(rows, self.provider, self), _row(rows, self.peer, self)
        if ours is None:
            return None
        if self.measure == "copy_fraction":
            return ours["copy_fraction"]
        if self.measure == "speedup":
            return None if peer is None else peer["median_ms"] / ours["median_ms"]
        if self.measure == "ema_share":
            return ours["ema_share"]
        if self.measure == "over_kernel":
            kernel = _row(rows, OURS, Target("update", self.workload, "bf16", "copy_fraction", 0))
            return None if kernel is None or peer is None else (ours["median_ms"] - peer["median_ms"]) / kernel["median_ms"]
        return ours["median_ms"] * 1e3

    def met(self, value: float) -> bool:
        return value <= self.bound if self.measure in ("host_us", "ema_share", "over_kernel") else value >= self.bound


STEP = "bf16 autocast"  # the training step's dtype on a GPU


def _row(rows: list[dict], provider: str, target: Target) -> dict | None:
    key = (provider, target.job, target.workload, target.dtype)
    return next((r for r in rows if (r["provider"], r["job"], r["workload"], r["dtype"]) == key), None)


TARGETS = (
    # 1B fp32: the update moves the same 12 bytes per element as _foreach_lerp_ (parity is the limit there).
    *(Target(job, "1b", dtype, "copy_fraction", 0.90) for job in ("update", "swap") for dtype in ("fp32", "bf16")),
    Target("update", "1b", "fp32", "speedup", 1.0),
    Target("update", "2000x4096", "fp32", "speedup", 3.0, peer=PEER_AS_CALLED),
    Target("update", "2000x4096", "fp32", "speedup", 1.2),
    Target("host", "1000x4096", "fp32", "host_us", 50.0),
    # On a CPU: a whole opt.step() over a base optimizer that does nothing, against a bare
    # torch._foreach_lerp_(shadows, params, m) on the same tensors.
    *(Target("parity", workload, "fp32", "speedup", 1.0, "triton-ema[torch]", device="cpu")
      for workload in ("2000x4096", "150x300000")),
    # K EMA profiles in one update (param + 2·K·shadow bytes per element).
    *(Target(job, "1b", dtype, "copy_fraction", 0.90) for job in PROFILE_JOBS for dtype in ("fp32", "bf16")),
    Target("update-k2", "1b", "fp32", "speedup", 1.15, peer="K x triton-ema[triton]"),
    Target("update-k2", "gpt2-small", "fp32", "speedup", 5.0, peer="PostHocEMA (ema-pytorch)"),
    # A whole GPT-2 small training step (bf16 autocast, fused AdamW) on a GPU.
    Target("train", "gpt2-small", STEP, "ema_share", 0.01, "triton-ema overlap"),
    Target("train", "gpt2-small", STEP, "over_kernel", 1.0, "triton-ema (captured)", "no EMA (captured)"),
    # On a CPU: the torch backend's K profiles against K bare torch._foreach_lerp_ calls on the same tensors.
    *(Target(job, workload, dtype, "speedup", 1.0, "triton-ema[torch]", "K x foreach_lerp", device="cpu")
      for job in PROFILE_JOBS for workload in ("2000x4096", "gpt2-small") for dtype in ("fp32", "bf16")),
)


def check(rows: list[dict]) -> list[dict]:
    """Every target with its measured value and a status: met, missed or not measured."""
    out = []
    for target in TARGETS:
        value = target.value(rows)
        status = "not measured" if value is None else "met" if target.met(value) else "missed"
        out.append({"target": str(target), "value": value, "status": status})
    return out


def report(results: list[dict]) -> str:
    lines = [f"targets ({OURS} where no other provider is named):"]
    for r in results:
        value = "-" if r["value"] is None else f"{r['value']:.3g}"
        lines.append(f"  {r['status']:12} {value:>7}  {r['target']}")
    if any(r["status"] == "not measured" for r in results):
        lines.append(f"  (not measured: a row is missing; {OURS} runs on a GPU, and 1b is a GPU-only workload)")
    return "\n".join(lines)
