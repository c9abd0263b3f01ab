"""Every Triton kernel launch of the backend, compiled without a GPU: ``python perf/occupancy.py``.

For each dtype pair the Triton backend runs, the launches it makes are
recorded (``TritonBackend.launch``; nothing runs) on a bucket holding both
full chunks and a tail: the update of K = 1, 2 and 4 profiles, with and
without the non-finite skip flag and with the momenta as values or read from
device memory (``capturable=True``), the swap, the copies both ways and the
non-finite scan; each full-chunk launch and each tail launch. Each is compiled
with the specialisation Triton would give it at run time, for sm_90a (Hopper)
and sm_80 (Ampere), and shown with:

- REG, STACK, LOCAL: registers per thread and stack/local bytes (spills land
  there), from ``cuobjdump -res-usage`` on the cubin (Triton's own metadata
  has no register counts without a GPU: the driver fills them at load);
- SMEM: shared memory per block (Triton's metadata);
- blocks/SM and occupancy: resident blocks per SM from registers (allocated
  per warp in units of 256, a quarter of the 64 Ki registers per SM for each
  of the 4 warp schedulers), warps (at most 64 per SM), blocks (at most 32)
  and shared memory (228 KiB per SM on sm_90, 164 KiB on sm_80, plus 1 KiB
  reserved per block);
- 128b: the share of the launch's data bytes (params and shadows, per thread:
  BLOCK / threads elements of each stream) moved by 128-bit ``ld/st.global``
  in the PTX; the table row, the skip flag and the momenta are scalars apart
  from that. Tails are masked and move their data in narrower accesses;
- trips: dependent memory round trips of a program: the table row, then each
  run of data loads that a store ends (loads after a store wait for it: the
  compiler cannot tell the rows apart). 2 when every load comes before the
  first store;
- the Little's-law margin: bytes an SM keeps moving (resident threads x
  data bytes per thread) over the bytes it must move in ``trips`` loaded
  latencies to run at the device's DRAM bandwidth (bandwidth / SMs x trips
  x latency). Above 1, the resident programs can in principle saturate
  memory; below 1 they cannot. Assumed: H100 SXM 3.35 TB/s and H200 4.8
  TB/s (peak), 132 SMs each, for sm_90a; A100 80 GB 2.04 TB/s, 108 SMs, for
  sm_80; a loaded DRAM latency of 600-900 ns (the range shows both ends; the
  table row counted at the same latency, though it often hits in L2). A
  model to rank launch shapes, not a measurement: perf/gpu_check.py measures.

``--json`` prints the report as JSON (tests/test_occupancy.py reads it);
``--full-only`` compiles the full-chunk launches only; ``--arch 90`` one
target; ``--summary`` one row per launch kind, the worst of its variants.
Run it from any Python that has torch and Triton (TRITON_INTERPRET is
ignored: this script compiles).
"""

from __future__ import annotations

import os

os.environ.pop("TRITON_INTERPRET", None)  # before triton is imported: the interpreter compiles nothing

import argparse  # noqa: E402
import concurrent.futures  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402

import torch  # noqa: E402

from triton_ema import triton_backend  # noqa: E402
from triton_ema.backends import TRITON_DTYPES  # noqa: E402
from triton_ema.buckets import build_buckets  # noqa: E402

NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
PROFILES = (1, 2, 4)
# sm: (register file per SM, shared memory per SM in bytes); 64 warps and 32 blocks per SM on both.
ARCHS = {90: (65536, 228 * 1024), 80: (65536, 164 * 1024)}
# The GPUs of each architecture the margin is shown for: DRAM bytes/s (peak), SMs.
GPUS = {90: {"H100": (3.35e12, 132), "H200": (4.8e12, 132)}, 80: {"A100": (2.04e12, 108)}}
LATENCY_NS = (600, 900)
ACCESS = re.compile(r"\b(ld|st)\.global[.\w:]*?(?:\.v(\d))?\.[bfus](\d+)\b")
RES = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


@dataclasses.dataclass
class Launch:
    job: str
    pair: str
    profiles: int
    skip: bool
    in_memory: bool
    full: bool
    kernel: object
    args: tuple
    num_warps: int
    constexprs: dict

    @property
    def name(self) -> str:
        flags = "".join(f for f, on in ((" skip", self.skip), (" mem", self.in_memory)) if on)
        return f"{self.job}{flags}"


class Recorder(triton_backend.TritonBackend):
    """The Triton backend with every launch kept instead of run, as on a GPU (hardware bf16 rounding)."""

    def __init__(self):
        self.launches: list[tuple] = []

    def tables(self, bucket):
        return dataclasses.replace(super().tables(bucket), round_by_hand=False)

    def launch(self, kernel, table, args, num_warps, **constexprs):
        self.launches.append((kernel, (table, *args), num_warps, constexprs))


def _jobs(p_dtype, s_dtype):
    """(job, profiles, skip, momenta from memory, what it does on a backend and bucket) for one dtype pair."""
    for k in PROFILES:
        for skip in (False, True):
            for in_memory in (False, True):
                momenta = torch.full((k,), 1e-3) if in_memory else [1e-3] * k
                flag = torch.zeros((), dtype=torch.int32) if skip else None
                yield f"update K={k}", k, skip, in_memory, lambda rec, b, m=momenta, f=flag: rec.update(b, m, f)
    if p_dtype == s_dtype:
        yield "swap", 1, False, False, lambda rec, b: rec.exchange(b, 0)
    yield "copy to shadow", 1, False, False, lambda rec, b: rec.copy(b, b.rows[0], to_params=False)
    yield "copy to params", 1, False, False, lambda rec, b: rec.copy(b, b.rows[0], to_params=True)
    if s_dtype == torch.float32:  # the scan reads params only: one pair per param dtype
        yield "nonfinite", 1, False, False, lambda rec, b: rec.nonfinite(b)


def record(pairs=None) -> list[Launch]:
    """Every launch the backend makes for the dtype pairs (all it runs by default)."""
    out = []
    for p_dtype in TRITON_DTYPES:
        for s_dtype in TRITON_DTYPES:
            pair = f"{NAMES[p_dtype]}/{NAMES[s_dtype]}"
            if pairs and pair not in pairs:
                continue
            block = triton_backend.block()
            params = [torch.zeros(2 * block, dtype=p_dtype), torch.zeros(100, dtype=p_dtype)]  # full chunks and a tail
            for job, profiles, skip, in_memory, fn in _jobs(p_dtype, s_dtype):
                rec = Recorder()
                (bucket,), _ = build_buckets(params, ["a", "b"], s_dtype, None, profiles)
                fn(rec, bucket)
                out += [Launch(job, pair, profiles, skip, in_memory, constexprs["FULL"], kernel, args, warps, constexprs)
                        for kernel, args, warps, constexprs in rec.launches]
    return out


def _compile(kernel, args, num_warps, constexprs, arch):
    """(PTX, cubin bytes, shared bytes) of the launch, specialised as Triton's launcher would."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature, find_paths_if, get_iterable_path

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    kwargs = {**constexprs, "num_warps": num_warps, "enable_fp_fusion": triton_backend.FP_FUSION}
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, _ = binder(*args, **kwargs)
    options = backend.parse_options(kwargs)
    sigvals = [s[0] for s in specialization]
    signature = dict(zip([p.name for p in kernel.params], sigvals))
    paths = find_paths_if(sigvals, lambda _, v: v == "constexpr")
    constants = {path: get_iterable_path(list(bound.values()), path) for path in paths}
    attrvals = ["" if s[0] == "constexpr" else s[1] for s in specialization]
    attr_paths = find_paths_if(attrvals, lambda _, x: isinstance(x, str))
    attrs = {k: backend.parse_attr(get_iterable_path(attrvals, k)) for k in attr_paths}
    compiled = triton.compile(ASTSource(kernel, signature, constants, attrs), target=target, options=options.__dict__)
    return compiled.asm["ptx"], compiled.asm["cubin"], compiled.metadata.shared


def resources(cubin: bytes) -> dict:
    """REG, STACK, SHARED, LOCAL of the cubin's kernel, from cuobjdump."""
    import triton

    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([triton.knobs.nvidia.cuobjdump.path, "-res-usage", f.name], capture_output=True,
                             text=True, check=True).stdout
    reg, stack, shared, local = map(int, RES.search(out).groups())
    return {"reg": reg, "stack": stack, "cubin_shared": shared, "local": local}


def accesses(ptx: str) -> list[tuple[str, int]]:
    """The global accesses in PTX order: ('ld' or 'st', bits)."""
    return [(op, int(vec or 1) * int(width)) for op, vec, width in ACCESS.findall(ptx)]


def data_bytes(launch: Launch) -> tuple[int, int]:
    """Data bytes (loaded, stored) per thread: params and shadows."""
    per_thread = launch.constexprs["BLOCK"] // (32 * launch.num_warps)
    if launch.job == "nonfinite":  # (table, typed param, flag)
        return per_thread * launch.args[1].element_size(), 0
    ep, es = launch.args[2].element_size(), launch.args[1].element_size()  # (table, flat, typed param, ...)
    if launch.job == "swap":
        return 2 * per_thread * ep, 2 * per_thread * ep
    if launch.job.startswith("copy"):
        src, dst = (es, ep) if launch.constexprs["TO_PARAMS"] else (ep, es)
        return per_thread * src, per_thread * dst
    k = launch.profiles
    return per_thread * (ep + k * es), per_thread * k * es


def round_trips(acc: list[tuple[str, int]]) -> int:
    """The table row (its 64-bit loads), then one trip per run of other loads that a store ends."""
    runs, last = 0, "st"
    for op, bits in acc:
        if op == "ld" and bits == 64:
            continue
        if op == "ld" and last == "st":
            runs += 1
        last = op
    return 1 + runs


def resident_blocks(reg: int, warps: int, shared: int, arch: int) -> int:
    regfile, smem = ARCHS[arch]
    per_warp = -(-max(reg, 1) * 32 // 256) * 256
    by_regs = 4 * ((regfile // 4) // per_warp) // warps
    by_smem = smem // (shared + 1024)
    return min(32, 64 // warps, by_regs, by_smem)


def analyse(launch: Launch, arch: int) -> dict:
    ptx, cubin, shared = _compile(launch.kernel, launch.args, launch.num_warps, launch.constexprs, arch)
    res = resources(cubin)
    acc = accesses(ptx)
    loaded, stored = data_bytes(launch)
    wide = sum(bits // 8 for _, bits in acc if bits == 128)
    blocks = resident_blocks(res["reg"], launch.num_warps, shared, arch)
    threads = blocks * launch.num_warps * 32
    trips = round_trips(acc)
    row = {"job": launch.name, "pair": launch.pair, "path": "full" if launch.full else "tail", "arch": arch,
           "block": launch.constexprs["BLOCK"], "warps": launch.num_warps, **res, "shared": shared,
           "blocks_per_sm": blocks, "occupancy": threads / 2048, "wide_share": wide / (loaded + stored),
           "trips": trips, "other_accesses": sorted({f"{op}{bits}" for op, bits in acc if bits != 128})}
    row["margins"] = {gpu: [threads * (loaded + stored) / (bandwidth / sms * trips * ns * 1e-9) for ns in LATENCY_NS]
                      for gpu, (bandwidth, sms) in GPUS[arch].items()}
    return row



def _analyse_job(item):
    index, arch = item
    return analyse(_LAUNCHES[index], arch)


_LAUNCHES: list[Launch] = []


def report(launches: list[Launch], archs, workers: int) -> list[dict]:
    """One row per (launch, arch), compiled in ``workers`` processes (Triton caches compiles on disk)."""
    _LAUNCHES[:] = launches
    items = [(i, arch) for arch in archs for i in range(len(launches))]
    if workers <= 1:
        return [_analyse_job(item) for item in items]
    ctx = __import__("multiprocessing").get_context("fork")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
        return list(pool.map(_analyse_job, items, chunksize=4))


def table(rows: list[dict]) -> str:
    head = (f"{'sm':>2} {'launch':22} {'pair':9} {'path':4} {'BLOCK':>5} {'warps':>5} {'REG':>3} {'STACK':>5} {'LOCAL':>5} "
            f"{'SMEM':>5} {'blk/SM':>6} {'occ':>4} {'128b':>5} {'trips':>5}  Little's-law margin")
    lines = [head, "-" * len(head)]
    for r in rows:
        margins = ", ".join(f"{g} {m[1]:.1f}-{m[0]:.1f}x" for g, m in r["margins"].items())
        lines.append(f"{r['arch']:2d} {r['job']:22} {r['pair']:9} {r['path']:4} {r['block']:5d} {r['warps']:5d} {r['reg']:3d} "
                     f"{r['stack']:5d} {r['local']:5d} {r['shared']:5d} {r['blocks_per_sm']:6d} {r['occupancy']:4.0%} "
                     f"{r['wide_share']:5.0%} {r['trips']:5d}  {margins}")
    return "\n".join(lines)


def summarise(rows: list[dict]) -> list[dict]:
    """One row per launch kind, pair, path and arch over the skip and momenta variants: the worst of each."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        job = r["job"].replace(" skip", "").replace(" mem", "")
        groups.setdefault((r["arch"], job, r["pair"], r["path"]), []).append(r)
    out = []
    for (_, job, _, _), group in groups.items():
        worst = max(group, key=lambda r: r["reg"])
        out.append({**worst, "job": job + (" (all)" if len(group) > 1 else ""), "stack": max(r["stack"] for r in group),
                    "local": max(r["local"] for r in group), "wide_share": min(r["wide_share"] for r in group),
                    "trips": max(r["trips"] for r in group),
                    "margins": {g: min((r["margins"][g] for r in group), key=lambda m: m[1]) for g in worst["margins"]}})
    return out


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, nargs="+", choices=sorted(ARCHS), default=[90, 80])
    p.add_argument("--pairs", nargs="+", help="dtype pairs param/shadow, e.g. fp32/fp32 bf16/fp32 (default: all)")
    p.add_argument("--full-only", action="store_true", help="the full-chunk launches only (the tails are masked)")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compiling processes")
    p.add_argument("--summary", action="store_true",
                   help="one row per launch kind over its skip/momenta variants (all): the most registers, the least margin")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    import triton

    launches = [x for x in record(args.pairs) if x.full or not args.full_only]
    rows = report(launches, args.arch, args.jobs)
    if args.json:
        json.dump({"triton": triton.__version__, "gpus": {str(a): g for a, g in GPUS.items()}, "latency_ns": LATENCY_NS,
                   "rows": rows}, sys.stdout)
    else:
        archs = ", ".join(f"sm_{a}{'a' if a >= 90 else ''}" for a in args.arch)  # Triton targets sm_90a on Hopper
        print(f"triton {triton.__version__}, torch {torch.__version__}; compiled for {archs}; margins at "
              f"{LATENCY_NS[1]}-{LATENCY_NS[0]} ns loaded latency, "
              + ", ".join(f"{g} {b / 1e12:g} TB/s, {n} SMs" for a in args.arch for g, (b, n) in GPUS[a].items()))
        print(table(summarise(rows) if args.summary else rows))
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
