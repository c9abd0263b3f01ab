"""Triton kernels over buckets, against float64 references (CPU: Triton's
interpreter, small shapes; the same tests run on CUDA when there is a GPU)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import BACKENDS, DEVICE, assert_ulps

from triton_ema.backends import TorchBackend
from triton_ema.buckets import build_buckets

pytestmark = pytest.mark.skipif("triton" not in BACKENDS, reason="triton is not installed")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
PAIRS = [(p, s) for p in DTYPES for s in DTYPES]
SIZES = [0, 1, 7, 1023, 1025, 2**20 + 3]


def pair_id(pair):
    return "-".join(str(d).replace("torch.", "") for d in pair)


def make_tensors(sizes, dtype, seed=0):
    """Tensors of ``sizes``; every third is a misaligned view (a tail-only param)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, n in enumerate(sizes):
        if i % 3 == 2 and n:
            t = torch.randn(n + 1, generator=g).to(DEVICE, dtype)[1:]
        else:
            t = torch.randn(n, generator=g).to(DEVICE, dtype)
        out.append(t)
    return out


def triton_bucket(tensors, shadow_dtype, seed=1, profiles=1):
    from triton_ema.triton_backend import TritonBackend

    (bucket,), _ = build_buckets(tensors, [f"t{i}" for i in range(len(tensors))], shadow_dtype, None, profiles)
    bucket.backend = TritonBackend()
    g = torch.Generator().manual_seed(seed)
    bucket.shadows.fill_(float("nan"))  # padding stays poisoned: no kernel may read it into a result
    for views in bucket.profile_views:
        for view in views:
            view.copy_(torch.randn(view.shape, generator=g))
    return bucket


def mixed_sizes(count=300, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 5000, (count,), generator=g).tolist()


CASES = [pytest.param([n], id=f"n{n}") for n in SIZES] + [pytest.param(mixed_sizes(), id="300-mixed"),
                                                        pytest.param([0, 5, 3000], id="empty-first")]


# The 2**20 + 3 case runs at one momentum, to keep the interpreter fast.
UPDATE_CASES = [pytest.param(c.values[0], m, id=f"{c.id}-m{m}") for c in CASES for m in (2e-4, 0.5, 0.9)
                if m == 0.5 or c.values[0] != [2**20 + 3]]


def check_update(bucket, params, momenta):
    """One update of every profile, against float64; the params stay untouched."""
    before = [[v.clone() for v in views] for views in bucket.profile_views]
    kept = [p.clone() for p in params]
    bucket.backend.update(bucket, momenta)
    for views, olds, m in zip(bucket.profile_views, before, momenta):
        for s, old, p in zip(views, olds, params):
            p64, s64 = p.double(), old.double()
            assert_ulps(s, s64 + m * (p64 - s64), scale=torch.maximum(p64.abs(), s64.abs()))
    assert all(torch.equal(p, q) for p, q in zip(params, kept))


@pytest.mark.parametrize("sizes, momentum", UPDATE_CASES)
@pytest.mark.parametrize("pair", PAIRS, ids=pair_id)
def test_update(sizes, momentum, pair):
    p_dtype, s_dtype = pair
    params = make_tensors(sizes, p_dtype)
    check_update(triton_bucket(params, s_dtype), params, [momentum])


# The 300-tensor layout only with float32 shadows (each param dtype's default): the single-profile
# test runs it for every pair, and under the interpreter each K = 4 run of it takes 10-17 s.
PROFILE_CASES = [pytest.param(c.values[0], pair, id=f"{pair_id(pair)}-{c.id}") for c in CASES for pair in PAIRS
                 if c.values[0] != [2**20 + 3] and (c.id != "300-mixed" or pair[1] == torch.float32)]


@pytest.mark.parametrize("sizes, pair", PROFILE_CASES)
def test_update_of_several_profiles_in_one_launch(sizes, pair):
    """K = 4 shadow rows, each with its own momentum (both sides of 0.5, and 0 and 1)."""
    p_dtype, s_dtype = pair
    params = make_tensors(sizes, p_dtype)
    check_update(triton_bucket(params, s_dtype, profiles=4), params, [2e-4, 0.9, 0.0, 1.0])


@pytest.mark.parametrize("pair", PAIRS, ids=pair_id)
def test_momenta_read_from_memory_update_as_momenta_passed_as_values(pair):
    """``capturable=True`` passes the momenta as a float32 device tensor: the same float32 values, the same bits."""
    p_dtype, s_dtype = pair
    params = make_tensors(mixed_sizes(40), p_dtype)
    momenta = [2e-4, 0.9, 0.0, 1.0]
    by_value, from_memory = triton_bucket(params, s_dtype, profiles=4), triton_bucket(params, s_dtype, profiles=4)
    by_value.backend.update(by_value, momenta)
    from_memory.backend.update(from_memory, torch.tensor(momenta, device=DEVICE))
    for a, b in zip(by_value.profile_views, from_memory.profile_views):
        assert all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("pair", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16)], ids=pair_id)
def test_a_set_skip_flag_writes_nothing_and_a_clear_one_updates(pair):
    """The skip flag is read beside the table row and only the stores wait on it: set, every
    shadow row keeps its bits (full chunks and tails); clear, the update is the usual one."""
    p_dtype, s_dtype = pair
    params = make_tensors([3000, 2048, 7], p_dtype)
    bucket = triton_bucket(params, s_dtype, profiles=2)
    before = bucket.shadows.clone()
    bucket.backend.update(bucket, [0.25, 0.75], torch.ones((), dtype=torch.int32, device=DEVICE))
    bits = {2: torch.int16, 4: torch.int32}[s_dtype.itemsize]
    assert torch.equal(bucket.shadows.view(bits), before.view(bits))  # the NaN padding too
    olds = [[v.clone() for v in views] for views in bucket.profile_views]
    bucket.backend.update(bucket, [0.25, 0.75], torch.zeros((), dtype=torch.int32, device=DEVICE))
    for views, old_views, m in zip(bucket.profile_views, olds, (0.25, 0.75)):
        for s, old, p in zip(views, old_views, params):
            p64, s64 = p.double(), old.double()
            assert_ulps(s, s64 + m * (p64 - s64), scale=torch.maximum(p64.abs(), s64.abs()))


@pytest.mark.parametrize("sizes", CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_exchange_is_bitwise(sizes, dtype):
    params = make_tensors(sizes, dtype)
    p0 = [p.clone() for p in params]
    bucket = triton_bucket(params, dtype, profiles=2)
    s0 = [[v.clone() for v in views] for views in bucket.profile_views]
    bucket.backend.exchange(bucket, 1)  # the second profile; the first stays as it was
    assert all(torch.equal(p, s) for p, s in zip(params, s0[1]))
    assert all(torch.equal(v, p) for v, p in zip(bucket.profile_views[1], p0))
    assert all(torch.equal(v, s) for v, s in zip(bucket.profile_views[0], s0[0]))
    bucket.backend.exchange(bucket, 1)
    assert all(torch.equal(p, q) for p, q in zip(params, p0))


@pytest.mark.parametrize("sizes", CASES)
@pytest.mark.parametrize("pair", PAIRS, ids=pair_id)
def test_copy_both_ways_rounds_like_torch(sizes, pair):
    p_dtype, s_dtype = pair
    params = make_tensors(sizes, p_dtype)
    bucket = triton_bucket(params, s_dtype, profiles=2)
    s0 = [v.clone() for v in bucket.profile_views[1]]
    for p in params:
        p.fill_(float("nan"))  # poison: every element must be written
    bucket.backend.shadow_to_params(bucket, 1)
    assert all(torch.equal(p, s.to(p_dtype)) for p, s in zip(params, s0))
    fresh = make_tensors(sizes, p_dtype, seed=3)
    for p, f in zip(params, fresh):
        p.copy_(f)
    bucket.shadows.fill_(float("nan"))
    bucket.backend.params_to_shadow(bucket)  # every profile
    assert all(torch.equal(v, f.to(s_dtype)) for views in bucket.profile_views for v, f in zip(views, fresh))


@pytest.mark.parametrize("pair", PAIRS, ids=pair_id)
def test_triton_and_torch_agree_within_one_ulp(pair):
    p_dtype, s_dtype = pair
    sizes = mixed_sizes(40, seed=2)
    params = make_tensors(sizes, p_dtype)
    a, b = triton_bucket(params, s_dtype, profiles=2), triton_bucket(params, s_dtype, profiles=2)
    b.backend = TorchBackend()
    for momenta in ((3e-3, 0.5), (0.5, 0.7), (0.7, 3e-3)):
        inputs = [[torch.maximum(s.abs(), p.abs()).double() for s, p in zip(views, params)] for views in a.profile_views]
        a.backend.update(a, momenta)
        b.backend.update(b, momenta)
        for k in range(2):
            for x, y, scale in zip(a.profile_views[k], b.profile_views[k], inputs[k]):
                assert_ulps(x, y.double(), scale=scale, ulps=1)
        b.shadows.copy_(a.shadows)  # the next round starts both from the same shadows


def test_dense_non_contiguous_params():
    params = [torch.randn(6, 5, device=DEVICE).t(), torch.randn(2, 3, 4, 5, device=DEVICE).to(
        memory_format=torch.channels_last)]
    bucket = triton_bucket(params, torch.float32)
    s0 = [v.clone() for v in bucket.profile_views[0]]
    bucket.backend.update(bucket, [0.25])
    for s, old, p in zip(bucket.profile_views[0], s0, params):
        assert s.stride() == p.stride()
        assert_ulps(s, old.double() + 0.25 * (p.double() - old.double()), scale=torch.maximum(old.abs(), p.abs()))


def test_storage_rebinding_rebuilds_the_table():
    from triton_ema import EMAOptimizer

    p = torch.nn.Parameter(torch.zeros(3000, device=DEVICE))
    opt = EMAOptimizer(torch.optim.SGD([p], lr=0.1), momentum=0.5, backend="triton")
    opt.step()
    before = opt.core.store.buckets[0].cache["table"]
    table_before = torch.cat([before.full, before.tail]).clone()  # one full chunk and a tail
    p.data = torch.full((3000,), 2.0, device=DEVICE)  # the old storage is freed
    opt.step()
    after = opt.core.store.buckets[0].cache["table"]
    assert not torch.equal(torch.cat([after.full, after.tail]), table_before)
    assert torch.all(opt.state_dict()["ema"]["shadow"][0] == 1.0)


@pytest.fixture(scope="module")
def ptx_report():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, str(Path(__file__).with_name("ptx_probe.py"))], env=env,
                         capture_output=True, text=True, check=True, timeout=600)
    return json.loads(out.stdout)


def test_changing_momentum_and_table_length_never_recompile(ptx_report):
    # One specialisation key for every momentum, table length and bucket size: one compiled kernel
    # per dtype pair, number of profiles and path (full chunks or tails).
    assert len(ptx_report["update_keys"]) == 1
    assert len(ptx_report["update_keys_2_profiles"]) == 1


@pytest.mark.parametrize("sizes", [[5000, 2048, 100, 0, 4096], mixed_sizes(50)], ids=["few", "50-mixed"])
def test_tables_cover_every_element_once_full_chunks_aligned(sizes):
    """Full rows: 16-byte-aligned runs of exactly BLOCK elements; tails: the rest; together every
    element of every param once, at its offset in the flat shadow."""
    from triton_ema.triton_backend import ALIGN_BYTES, BLOCK, TritonBackend

    params = make_tensors(sizes, torch.float32)
    bucket = triton_bucket(params, torch.float32)
    tables = TritonBackend.tables(bucket)
    assert tables.block == BLOCK and tables.full.shape[0] and tables.tail.shape[0]
    full, tail = tables.full.cpu(), tables.tail.cpu()
    assert torch.all(full[:, 2] == BLOCK) and torch.all(full[:, 0] % ALIGN_BYTES == 0) and torch.all(full[:, 1] % 16 == 0)
    assert torch.all((tail[:, 2] > 0) & (tail[:, 2] <= BLOCK))
    covered = sorted((int(a), int(o), int(n)) for a, o, n in torch.cat([full, tail]).tolist())
    expected = []
    for p, off in zip(params, bucket.offsets):
        for start in range(0, p.numel(), BLOCK):
            expected.append((p.data_ptr() + 4 * start, off + start, min(BLOCK, p.numel() - start)))
    # an unaligned param's chunks all go to the tail table, cut at the same places
    assert covered == sorted(expected)


def test_auto_picks_triton_only_for_cuda(monkeypatch):
    from triton_ema import EMAOptimizer

    p = torch.nn.Parameter(torch.randn(10, device=DEVICE))
    opt = EMAOptimizer(torch.optim.SGD([p], lr=0.1), momentum=0.1, backend="auto")
    assert opt.core.store.buckets[0].backend.name == ("triton" if DEVICE.type == "cuda" else "torch")


@pytest.mark.skipif(DEVICE.type != "cpu", reason="CPU tensors need the interpreter; on a GPU machine they are not used")
def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    from triton_ema import EMAOptimizer

    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        EMAOptimizer(torch.optim.SGD([torch.nn.Parameter(torch.ones(3))], lr=0.1), momentum=0.1, backend="triton")


@pytest.mark.skipif(DEVICE.type != "cuda", reason="compiled-kernel caches exist only on a GPU")
def test_cosine_schedule_compiles_one_kernel_per_dtype_pair():
    from triton_ema import EMAOptimizer
    from triton_ema.kernels.ema import _ema_update_kernel
    from triton_ema.schedules import Cosine

    p = torch.nn.Parameter(torch.randn(5000, device=DEVICE))
    opt = EMAOptimizer(torch.optim.SGD([p], lr=0.1), momentum=Cosine(0.5, 0.0, total_steps=30), backend="triton")
    p.grad = torch.ones_like(p)
    opt.step()
    count = sum(len(cache[0]) for cache in _ema_update_kernel.device_caches.values())
    for _ in range(30):
        opt.step()
    assert sum(len(cache[0]) for cache in _ema_update_kernel.device_caches.values()) == count



@pytest.mark.parametrize("param_dtype, shadow_dtype, skip, profiles, groups", [
    (torch.float32, None, False, 1, 1),  # nothing to convert: one foreach call, as a bare _foreach_lerp_
    (torch.bfloat16, None, False, 1, 4),  # float32 shadows: converted a group at a time
    (torch.float32, None, True, 1, 4),  # a skippable update keeps a copy of each group
    (torch.float32, None, False, 2, 4),  # two profiles: a group's params stay in cache for both
])
def test_torch_backend_cuts_groups_only_where_temporaries_need_them(monkeypatch, param_dtype, shadow_dtype, skip,
                                                                     profiles, groups):
    from triton_ema import backends

    monkeypatch.setitem(backends.GROUP_NUMEL, DEVICE.type, 1000)
    monkeypatch.setattr(backends, "DEFAULT_GROUP_NUMEL", 1000)
    params = [torch.randn(n, device=DEVICE).to(param_dtype) for n in (700, 900, 1500)]  # groups: 700, 900, 1000 + 500
    (bucket,), _ = build_buckets(params, ["a", "b", "c"], shadow_dtype, None, profiles)
    TorchBackend().params_to_shadow(bucket)
    momenta = [0.5, 0.25][:profiles]
    expected = [[v.double() + m * (p.double() - v.double()) for v, p in zip(views, params)]
                for views, m in zip(bucket.profile_views, momenta)]
    TorchBackend()._update(bucket, momenta, torch.zeros((), dtype=torch.int32, device=DEVICE) if skip else None)
    (cut,) = [v for k, v in bucket.cache.items() if k[0] == "torch-groups"]
    assert len(cut) == groups
    for views, profile in zip(bucket.profile_views, expected):
        for view, e in zip(views, profile):
            assert_ulps(view, e)
