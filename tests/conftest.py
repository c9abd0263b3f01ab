"""Test set-up: Triton kernels run on CPU tensors in Triton's interpreter when
there is no GPU (TRITON_INTERPRET must be set before triton is imported)."""

import gc
import os
import sys
import warnings

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402
from torch._subclasses.fake_tensor import is_fake  # noqa: E402

try:
    import triton  # noqa: F401,E402

    HAVE_TRITON = True
except ImportError:
    if sys.platform.startswith("linux"):  # triton is a dependency there: its absence is a broken install
        raise
    HAVE_TRITON = False

# Property tests: a fixed, CI-sized sample by default; HYPOTHESIS_PROFILE=thorough for a long search.
settings.register_profile("ci", max_examples=25, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
settings.register_profile("thorough", max_examples=500, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BACKENDS = ["torch", "triton"] if HAVE_TRITON else ["torch"]

# Unit roundoff-scale tolerances: a value stored in `dtype` may differ from the
# exact (float64) result by this many units of its last place.
ULPS = {torch.float64: 1, torch.float32: 2, torch.bfloat16: 1, torch.float16: 1}


def assert_ulps(actual: torch.Tensor, expected: torch.Tensor, *, scale: torch.Tensor | None = None, ulps: int | None = None):
    """``actual`` (any dtype) equals the float64 ``expected`` to within a few
    units in the last place of ``actual.dtype``, measured against ``scale``
    (the magnitudes the computation involved; defaults to ``expected``)."""
    dtype = actual.dtype
    eps = torch.finfo(dtype).eps
    ulps = ULPS[dtype] if ulps is None else ulps
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    s = e.abs() if scale is None else torch.maximum(e.abs(), scale.detach().double().cpu().abs())
    tol = ulps * eps * s.clamp_min(torch.finfo(dtype).tiny)
    err = (a - e).abs()
    bad = err > tol
    assert not bad.any(), (
        f"{int(bad.sum())} of {a.numel()} elements off by more than {ulps} ulp of {dtype}; "
        f"worst: got {a[bad][0].item()!r}, expected {e[bad][0].item()!r}")


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


def live_tensor_bytes():
    """Bytes of every distinct storage a live Python tensor holds (CPU or GPU)."""
    gc.collect()
    storages = {}
    with warnings.catch_warnings():  # isinstance() on some deprecated torch objects warns
        warnings.simplefilter("ignore")
        tensors = [obj for obj in gc.get_objects() if isinstance(obj, torch.Tensor)]
    for obj in tensors:
        if obj.device.type != "meta" and not is_fake(obj):  # torch.compile leaves fake tensors behind
            storage = obj.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    total = sum(storages.values())
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()
        total += torch.cuda.memory_allocated()
    return total
