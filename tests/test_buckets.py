"""Bucket layout: grouping, aligned offsets, views in each tensor's own memory order."""

import pytest
import torch

from triton_ema.buckets import ALIGN, build_buckets, default_shadow_dtype, is_dense


def test_grouping_by_dtype_and_default_shadow_dtypes():
    tensors = [torch.zeros(3), torch.zeros(5, dtype=torch.bfloat16), torch.zeros(2), torch.zeros(4, dtype=torch.float64)]
    buckets, where = build_buckets(tensors, list("abcd"), None, None)
    assert [(b.param_dtype, b.shadows.dtype, b.names) for b in buckets] == [
        (torch.float32, torch.float32, ["a", "c"]),
        (torch.bfloat16, torch.float32, ["b"]),
        (torch.float64, torch.float64, ["d"]),
    ]
    assert where == [(0, 0), (1, 0), (0, 1), (2, 0)]
    assert default_shadow_dtype(torch.float16) == torch.float32


def test_offsets_are_aligned_and_views_do_not_overlap():
    sizes = [1, 15, 16, 17, 0, 1000]
    (bucket,), _ = build_buckets([torch.zeros(n) for n in sizes], [str(n) for n in sizes], None, None)
    assert all(off % ALIGN == 0 for off in bucket.offsets)
    marks = torch.zeros(bucket.shadows.shape[1], dtype=torch.int32)
    for view in bucket.views_of(marks):
        view += 1
    assert marks.max() == 1 and int(marks.sum()) == sum(sizes)


@pytest.mark.parametrize("make, dense", [
    (lambda: torch.zeros(4, 5), True),
    (lambda: torch.zeros(5, 4).t(), True),
    (lambda: torch.zeros(2, 3, 4, 5).to(memory_format=torch.channels_last), True),
    (lambda: torch.zeros(4, 1, 5)[:, :, :], True),
    (lambda: torch.zeros(0, 3), True),
    (lambda: torch.zeros(4, 6)[:, ::2], False),
    (lambda: torch.zeros(4, 6)[:, :3], False),
    (lambda: torch.zeros(5).expand(3, 5), False),
])
def test_is_dense(make, dense):
    assert is_dense(make()) is dense


def test_views_follow_the_tensors_memory_order():
    t = torch.arange(24.0).reshape(2, 3, 4).permute(2, 0, 1)  # dense, not contiguous
    (bucket,), _ = build_buckets([t], ["t"], None, None)
    bucket.profile_views[0][0].copy_(t)
    assert bucket.profile_views[0][0].stride() == t.stride()
    assert torch.equal(bucket.shadows[0, :24], torch.arange(24.0))  # the same order as t's storage


def test_profiles_are_rows_laid_out_alike():
    t = torch.arange(24.0).reshape(2, 3, 4).permute(2, 0, 1)
    tensors = [torch.zeros(5), t]
    (bucket,), _ = build_buckets(tensors, ["a", "t"], None, None, profiles=3)
    assert bucket.shadows.shape == (3, ALIGN + 32) and len(bucket.rows) == 3
    for k in range(3):
        bucket.profile_views[k][1].copy_(t + k)
        assert bucket.profile_views[k][1].stride() == t.stride()
        assert torch.equal(bucket.shadows[k, ALIGN : ALIGN + 24], torch.arange(24.0) + k)
        assert bucket.views_for(bucket.rows[k]) is bucket.profile_views[k]


@pytest.mark.parametrize("native", [False, True], ids=["data_ptr-pass", "torch-c++-loop"])
def test_storage_watch_sees_every_replaced_storage_and_nothing_else(native, monkeypatch):
    from triton_ema import buckets

    if native and buckets._PTRS_EQUAL is None:
        pytest.skip("this torch build has no _tensors_data_ptrs_at_indices_equal (CUDA builds have it)")
    if not native:
        monkeypatch.setattr(buckets, "_PTRS_EQUAL", None)
    params = [torch.nn.Parameter(torch.randn(n)) for n in (3, 0, 17, 1000)]
    tensors = list(params)
    watch = buckets.StorageWatch(tensors)
    with torch.no_grad():
        for p in params:
            p.mul_(2)  # in place: the same storage
    assert not watch.moved()
    for replace in (
        lambda: setattr(params[2], "data", params[2].detach().clone()),  # p.data = ...
        # module.to() and load_state_dict(assign=True) with torch.__future__'s swapping on:
        lambda: torch.utils.swap_tensors(params[3], torch.nn.Parameter(params[3].detach().to(torch.bfloat16))),
        lambda: tensors.__setitem__(0, torch.randn(3)),  # another object in its place (a replaced buffer)
    ):
        replace()
        assert watch.moved()
        watch.mark()
        assert not watch.moved()
