"""Bucket layout: grouping, aligned offsets, views in each tensor's own memory order."""

import pytest
import torch

from triton_ema.buckets import ALIGN, build_buckets, default_shadow_dtype, is_dense


def test_grouping_by_dtype_and_default_shadow_dtypes():
    tensors = [torch.zeros(3), torch.zeros(5, dtype=torch.bfloat16), torch.zeros(2), torch.zeros(4, dtype=torch.float64)]
    buckets, where = build_buckets(tensors, list("abcd"), None, None)
    assert [(b.param_dtype, b.shadow.dtype, b.names) for b in buckets] == [
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
    marks = torch.zeros(bucket.shadow.numel(), dtype=torch.int32)
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
    bucket.views[0].copy_(t)
    assert bucket.views[0].stride() == t.stride()
    assert torch.equal(bucket.shadow[:24], torch.arange(24.0))  # the same order as t's storage
