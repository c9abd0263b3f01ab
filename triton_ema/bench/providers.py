"""Every EMA a user might pick, each run the way its users run it.

A provider turns (params, shadow dtype) into a zero-argument function that
does one job: ``update`` (one EMA update), ``swap`` (EMA weights in and the
training weights back) or ``step`` (a whole AdamW step, with or without EMA).
Peers that are not installed are reported absent, never faked.
"""

from __future__ import annotations

import copy
import functools
import tempfile
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .. import EMAOptimizer
from .measure import PROFILE_JOBS

MOMENTUM = 1e-3  # decay 0.999: the value does not change the cost
# The K-profile update (jobs update-k2, update-k4): K EMAs of the same params, each with its own
# momentum (_momenta; the values do not change the cost) or, for the peers that take a width, its
# own EDM2 sigma_rel: the paper's two profiles, then two more.
SIGMA_RELS = (0.05, 0.10, 0.15, 0.20)
# Benchmark dtypes: fp32 params and shadows; bf16 params with fp32 shadows.
DTYPES = {"fp32": (torch.float32, torch.float32), "bf16": (torch.bfloat16, torch.float32)}
Job = Callable[[], object]  # what it returns is not used


@dataclass(frozen=True)
class Provider:
    name: str
    jobs: dict[str, Callable[[list[nn.Parameter], torch.dtype], Job]]  # (fresh params, shadow dtype) -> the job
    absent: str | None = None  # why it cannot run here
    own_shadow_dtype: bool = True  # False: keeps shadows in the params' dtype (a deep copy), whatever is asked


def _module(params: list[Tensor]) -> nn.Module:
    return nn.ParameterList([p if isinstance(p, nn.Parameter) else nn.Parameter(p) for p in params])


def _shadows(params: list[Tensor], shadow_dtype: torch.dtype) -> list[Tensor]:
    return [p.detach().to(shadow_dtype, copy=True) for p in params]


def _ends(params: list[Tensor], shadow_dtype: torch.dtype) -> list[Tensor]:
    """What a peer lerps toward: the params, upcast when the shadow is wider."""
    return [p.detach() if p.dtype == shadow_dtype else p.detach().to(shadow_dtype) for p in params]


# --- triton-ema ------------------------------------------------------------


def _ema(params, shadow_dtype, backend, momentum=MOMENTUM) -> EMAOptimizer:
    return EMAOptimizer(torch.optim.SGD(params, lr=0.0), momentum=momentum, shadow_dtype=shadow_dtype,
                        backend=backend)


def _momenta(k: int) -> list[float]:
    return [MOMENTUM / 2**i for i in range(k)]


def _per_profile_count(job: Callable) -> dict[str, Callable]:
    """``job(params, shadow_dtype, k)`` as one job per K-profile job name."""
    return {name: functools.partial(job, k=k) for name, k in PROFILE_JOBS.items()}


def _triton_absent(backend: str) -> str | None:
    if backend != "triton":
        return None
    probe = torch.nn.Parameter(torch.zeros(16, device="cuda" if torch.cuda.is_available() else "cpu"))
    try:
        _ema([probe], None, "triton")
    except (ValueError, ImportError) as err:
        return str(err)
    return None


class _Idle(torch.optim.Optimizer):
    """A base optimizer whose step does nothing: what is left of ``opt.step()`` is the EMA's part."""

    def __init__(self, params):
        super().__init__(params, {})

    def step(self, closure=None):
        return None


def triton_ema(backend: str) -> Provider:
    def update(params, shadow_dtype):
        opt = _ema(params, shadow_dtype, backend)
        return lambda: opt.core.update([MOMENTUM])  # the EMA part of opt.step(), storage checks included

    def swap(params, shadow_dtype):
        opt = _ema(params, shadow_dtype, backend)

        def run():
            with opt.swap_ema():
                pass
        return run

    def step(params, shadow_dtype):
        opt = EMAOptimizer(torch.optim.AdamW(params, lr=1e-6), momentum=MOMENTUM, shadow_dtype=shadow_dtype,
                           backend=backend)
        return opt.step

    def host(params, shadow_dtype):
        return EMAOptimizer(_Idle(params), momentum=MOMENTUM, shadow_dtype=shadow_dtype, backend=backend).step

    def profiles(params, shadow_dtype, k):  # one EMAOptimizer with K profiles: each param read once for all
        momenta = _momenta(k)
        opt = _ema(params, shadow_dtype, backend, {f"ema{i}": m for i, m in enumerate(momenta)})
        return lambda: opt.core.update(momenta)

    # "host": a whole opt.step() over an idle base optimizer, timed on the host without waiting for the device;
    # "parity": the same step, timed with the device, against a bare torch._foreach_lerp_.
    jobs = {"update": update, "swap": swap, "step": step, "host": host, "parity": host, **_per_profile_count(profiles)}
    return Provider(f"triton-ema[{backend}]", jobs, _triton_absent(backend))


def separate_triton_ema(backend: str) -> Provider:
    """K EMAOptimizers of one profile each over the same params: each reads the params."""
    def profiles(params, shadow_dtype, k):
        momenta = _momenta(k)
        opts = [_ema(params, shadow_dtype, backend, m) for m in momenta]

        def run():
            for opt, m in zip(opts, momenta):
                opt.core.update([m])
        return run

    return Provider(f"K x triton-ema[{backend}]", _per_profile_count(profiles), _triton_absent(backend))


# --- torch and the loops other libraries use ----------------------------------


def _foreach_lerp(params, shadow_dtype):
    """The kernel alone: lists built once (params upcast every call for wider shadows: foreach needs one dtype)."""
    shadows = _shadows(params, shadow_dtype)
    if all(p.dtype == shadow_dtype for p in params):
        ends = [p.detach() for p in params]
        return lambda: torch._foreach_lerp_(shadows, ends, MOMENTUM)
    return lambda: torch._foreach_lerp_(shadows, _ends(params, shadow_dtype), MOMENTUM)


def _foreach_lerp_lists_per_step(params, shadow_dtype):
    """As timm's ModelEmaV3 calls it: both lists rebuilt from the two models' state dicts every step."""
    model = _module(params)
    ema = _module(_shadows(params, shadow_dtype))

    def run():
        ema_values, model_values = [], []
        for ema_v, model_v in zip(ema.state_dict().values(), model.state_dict().values()):
            ema_values.append(ema_v)
            model_values.append(model_v if model_v.dtype == ema_v.dtype else model_v.to(ema_v.dtype))
        torch._foreach_lerp_(ema_values, model_values, MOMENTUM)
    return run


def _foreach_lerp_per_profile(params, shadow_dtype, k):
    """K bare torch._foreach_lerp_ calls; params upcast for wider shadows once per update, shared by the K calls."""
    rows = [_shadows(params, shadow_dtype) for _ in range(k)]
    momenta = _momenta(k)

    def run():
        ends = _ends(params, shadow_dtype)
        for shadows, m in zip(rows, momenta):
            torch._foreach_lerp_(shadows, ends, m)
    return run


def _mul_add_loop(params, shadow_dtype):  # mmcv EMAHook
    shadows = _shadows(params, shadow_dtype)

    def run():
        for s, p in zip(shadows, params):
            s.mul_(1 - MOMENTUM).add_(p.detach(), alpha=MOMENTUM)
    return run


def _lerp_loop(params, shadow_dtype):  # mmengine ExponentialMovingAverage
    shadows = _shadows(params, shadow_dtype)

    def run():
        for s, p in zip(shadows, params):
            s.lerp_(p.detach().to(s.dtype), MOMENTUM)
    return run


def _foreach_mul_add(params, shadow_dtype):  # NeMo EMAOptimizer
    shadows = _shadows(params, shadow_dtype)

    def run():
        torch._foreach_mul_(shadows, 1 - MOMENTUM)
        torch._foreach_add_(shadows, [p.detach() for p in params], alpha=MOMENTUM)
    return run


def _averaged_model(params, shadow_dtype):  # keeps the params' dtype: a deep copy
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    module = _module(params)
    averaged = AveragedModel(module, multi_avg_fn=get_ema_multi_avg_fn(1 - MOMENTUM))
    averaged.update_parameters(module)  # the first call only copies
    return lambda: averaged.update_parameters(module)


def _clone_copy_swap(params, shadow_dtype):  # mmengine / NeMo style swap
    shadows = _shadows(params, shadow_dtype)

    def run():
        with torch.no_grad():
            backup = [p.detach().clone() for p in params]
            for p, s in zip(params, shadows):
                p.copy_(s)
            for p, b in zip(params, backup):
                p.copy_(b)
    return run


def _peer(module_name: str) -> str | None:
    try:
        __import__(module_name)
    except ImportError:
        return f"{module_name} is not installed (pip install -e '.[perf]')"
    return None


def _torch_ema_update(params, shadow_dtype):
    from torch_ema import ExponentialMovingAverage

    ema = ExponentialMovingAverage(params, decay=1 - MOMENTUM, use_num_updates=False)
    return ema.update


def _torch_ema_swap(params, shadow_dtype):
    from torch_ema import ExponentialMovingAverage

    ema = ExponentialMovingAverage(params, decay=1 - MOMENTUM, use_num_updates=False)

    def run():
        ema.store()
        ema.copy_to()
        ema.restore()
    return run


def _ema_pytorch_update(params, shadow_dtype):
    from ema_pytorch import EMA

    module = _module(params)
    ema = EMA(module, beta=1 - MOMENTUM, update_after_step=0, update_every=1, power=1.0, inv_gamma=1.0)
    ema.update()  # the first calls only copy
    ema.update()
    return ema.update


def _post_hoc_ema(params, shadow_dtype, k):
    """ema-pytorch's PostHocEMA with K sigma_rels: one KarrasEMA (a deep copy of the model, in the
    params' dtype) per sigma_rel, each updated by its own per-tensor lerp_ loop, reading its step
    counter on the host. update_every=1 so that every call updates (its default, 100, skips 99 calls
    of 100); checkpoints are a separate cost, left out ("manual")."""
    from ema_pytorch import PostHocEMA

    folder = tempfile.TemporaryDirectory(prefix="post-hoc-ema-")  # it makes its checkpoint folder at once
    emas = PostHocEMA(_module(params), sigma_rels=SIGMA_RELS[:k], update_every=1, checkpoint_every_num_steps="manual",
                      checkpoint_folder=folder.name)
    emas.update()  # the first call copies

    def run(_folder=folder):  # the folder lives as long as the job
        emas.update()
    return run


def _edm2_loop(params, shadow_dtype, k):
    """The way EDM2's training code (NVlabs/edm2, training/phema.py) runs its power-function
    EMA, written here from the paper's formulas: after the image count grows by the batch,
    for each profile a beta from its std (the cubic of Eq. 126 solved by numpy on every
    call), then one ``lerp_`` per parameter. The EMAs are deep copies of the net, in the
    params' dtype. Counted here in steps (batch size 1)."""
    import numpy as np

    stds = SIGMA_RELS[:k]
    net = _module(params)
    emas = [copy.deepcopy(net) for _ in stds]
    batch_size = 1
    cur_nimg = [batch_size]  # one update done (the first copies: the deep copies are that copy)

    def std_to_exp(std):
        t = np.float64(std) ** -2
        return np.roots([1, 7, 16 - t, 12 - t]).real.max()

    @torch.no_grad()
    def run():
        cur_nimg[0] += batch_size
        for std, ema in zip(stds, emas):
            beta = (1 - batch_size / cur_nimg[0]) ** (std_to_exp(std) + 1)
            for p_net, p_ema in zip(net.parameters(), ema.parameters()):
                p_ema.lerp_(p_net, 1 - beta)
    return run


def _adamw_step(params, shadow_dtype):
    return torch.optim.AdamW(params, lr=1e-6).step


def providers() -> list[Provider]:
    """Every provider, ours first."""
    return [
        triton_ema("triton"),
        triton_ema("torch"),
        separate_triton_ema("triton"),
        separate_triton_ema("torch"),
        Provider("foreach_lerp", {"update": _foreach_lerp, "parity": _foreach_lerp}),
        Provider("foreach_lerp (lists per step)", {"update": _foreach_lerp_lists_per_step}),
        Provider("K x foreach_lerp", _per_profile_count(_foreach_lerp_per_profile)),
        Provider("loop mul_+add_ (mmcv)", {"update": _mul_add_loop}),
        Provider("loop lerp_ (mmengine)", {"update": _lerp_loop}),
        Provider("foreach mul_+add_ (NeMo)", {"update": _foreach_mul_add}),
        Provider("AveragedModel", {"update": _averaged_model}, own_shadow_dtype=False),
        Provider("torch_ema", {"update": _torch_ema_update, "swap": _torch_ema_swap}, _peer("torch_ema"),
                 own_shadow_dtype=False),
        Provider("ema_pytorch", {"update": _ema_pytorch_update}, _peer("ema_pytorch"), own_shadow_dtype=False),
        Provider("PostHocEMA (ema-pytorch)", _per_profile_count(_post_hoc_ema), _peer("ema_pytorch"),
                 own_shadow_dtype=False),
        Provider("EDM2 loop (transcribed)", _per_profile_count(_edm2_loop), own_shadow_dtype=False),
        Provider("clone+copy swap", {"swap": _clone_copy_swap}),
        Provider("AdamW alone", {"step": _adamw_step}),
    ]


def copy_job(numel: int, device: torch.device) -> tuple[Job, int]:
    """A plain device copy and the bytes it moves: the bandwidth to compare against."""
    src = torch.empty(numel, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    return (lambda: dst.copy_(src)), 2 * src.nbytes


def clone_params(params: list[Tensor]) -> list[nn.Parameter]:
    """Fresh parameters with the same values: every provider gets its own."""
    return [nn.Parameter(copy.deepcopy(p.detach())) for p in params]


def make_job(provider: Provider, job: str, workload, dtype_name: str, device: torch.device) -> Job:
    """``provider``'s ``job`` on fresh params of ``workload`` (with gradients, for a whole step)."""
    param_dtype, shadow_dtype = DTYPES[dtype_name]
    params = clone_params(workload.params(param_dtype, device))
    if job == "step":
        for p in params:
            p.grad = torch.randn_like(p)
    fn = provider.jobs[job](params, shadow_dtype)

    def run(_keep=params):  # the job owns its params (torch_ema holds only weak references)
        return fn()
    return run
