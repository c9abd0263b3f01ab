"""The compiled full-chunk kernels stay within their limits, on any machine: every launch the
Triton backend makes, compiled for sm_90a by perf/occupancy.py (registers and stack from
cuobjdump on the cubin, access widths from the PTX)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import BACKENDS

pytestmark = pytest.mark.skipif("triton" not in BACKENDS, reason="triton is not installed")

ROOT = Path(__file__).resolve().parents[1]
PAIRS = [f"{p}/{s}" for p in ("fp32", "bf16", "fp16") for s in ("fp32", "bf16", "fp16")]
MAX_REGISTERS = 64  # 8 blocks of 4 warps (or 4 of 8) per SM at least


@pytest.fixture(scope="module")
def full_chunks():
    """perf/occupancy.py's rows for the full-chunk launches on sm_90a (Triton caches the compiles on disk)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "perf/occupancy.py", "--json", "--arch", "90", "--full-only"], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout)["rows"]


def test_every_launch_of_the_backend_is_compiled(full_chunks):
    launches = {(r["job"], r["pair"]) for r in full_chunks}
    updates = {f"update K={k}{skip}{mem}" for k in (1, 2, 4) for skip in ("", " skip") for mem in ("", " mem")}
    expected = {(job, pair) for pair in PAIRS for job in (*updates, "copy to shadow", "copy to params")}
    expected |= {("swap", f"{d}/{d}") for d in ("fp32", "bf16", "fp16")}
    expected |= {("nonfinite", f"{d}/fp32") for d in ("fp32", "bf16", "fp16")}
    assert launches == expected
    assert len(full_chunks) == len(expected)  # one full-chunk launch each
    assert all(r["path"] == "full" and r["arch"] == 90 for r in full_chunks)


def test_full_chunks_need_at_most_64_registers_and_never_spill(full_chunks):
    over = [(r["job"], r["pair"], r["reg"]) for r in full_chunks if r["reg"] > MAX_REGISTERS]
    spills = [(r["job"], r["pair"], r["stack"], r["local"]) for r in full_chunks if r["stack"] or r["local"]]
    assert not over and not spills


def test_full_chunks_move_all_their_data_in_128_bit_accesses(full_chunks):
    """Params and shadows: every byte through ld/st.global.v4 on sm_90a; the only other global
    accesses are the table row (64-bit), the skip flag and momenta read on the device (32-bit
    loads), and the scan's flag (a 32-bit store)."""
    for r in full_chunks:
        assert r["wide_share"] == 1.0, r
        allowed = {"ld64"} | ({"ld32"} if " skip" in r["job"] or " mem" in r["job"] else set())
        allowed |= {"st32"} if r["job"] == "nonfinite" else set()
        assert set(r["other_accesses"]) <= allowed, r


def test_every_load_of_a_program_comes_before_its_first_store(full_chunks):
    """Two dependent round trips per program: the table row, then the param and all K shadow rows."""
    assert {r["trips"] for r in full_chunks} == {2}


def test_occupancy_and_margins_follow_from_the_resident_blocks(full_chunks):
    for r in full_chunks:
        occupancy = r["blocks_per_sm"] * r["warps"] * 32 / 2048
        assert r["occupancy"] == occupancy and 0 < occupancy <= 1
        assert set(r["margins"]) == {"H100", "H200"}
        for at_600, at_900 in r["margins"].values():  # ns of loaded latency
            assert at_600 / at_900 == pytest.approx(900 / 600)
