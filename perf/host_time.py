"""The EMA's own host time per step on a CPU: ``python perf/host_time.py``.

On a CPU the update's work is host work too, so it is taken out: a step over
N 16-element tensors (a base optimizer that does nothing, the EMA's schedule,
checks and one foreach call) minus the bare ``torch._foreach_lerp_`` of the
same tensors and minus the idle base optimizer's own step. Each time is the
calling thread's CPU time, the least over 40 batches of calls taken in turn:
what the code costs, not what other processes on the machine took. On a GPU the bench's
``host`` row measures the same part directly (the work runs on the device).
"""

import argparse
import functools
import time
from collections.abc import Callable

import torch

from triton_ema import EMAOptimizer
from triton_ema.bench.providers import _Idle


def least_us(fns: dict[str, Callable[[], object]], batches: int) -> dict[str, float]:
    """Each function's least thread CPU time per call, in us, over ``batches`` rounds in which
    every function runs one batch of calls (about 5 ms each) in turn."""
    calls = {}
    for name, fn in fns.items():
        start = time.thread_time()
        fn()
        calls[name] = max(1, int(5e-3 / max(time.thread_time() - start, 1e-6)))
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(batches):
        for name, fn in fns.items():
            start = time.thread_time()
            for _ in range(calls[name]):
                fn()
            best[name] = min(best[name], (time.thread_time() - start) / calls[name])
    return {name: t * 1e6 for name, t in best.items()}


def tiny(n: int) -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(torch.zeros(16)) for _ in range(n)]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tensors", type=int, nargs="+", default=[1, 1000])
    p.add_argument("--batches", type=int, default=40)
    args = p.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; least thread CPU time per call, us; "
          "EMA part = step - bare lerp - idle base step")
    for n in args.tensors:
        opt = EMAOptimizer(_Idle(tiny(n)), momentum=1e-3)
        model = torch.nn.ParameterList(tiny(n))
        with_module = EMAOptimizer(_Idle(model.parameters()), momentum=1e-3, model=model)
        with_module.ema_module()
        params = [p.detach() for p in tiny(n)]
        shadows = [p.clone() for p in params]
        idle = _Idle(tiny(n))
        us = least_us({"lerp": functools.partial(torch._foreach_lerp_, shadows, params, 1e-3), "base": idle.step,
                       "step": opt.step, "module": with_module.step, "check": opt.core.store.refresh}, args.batches)
        lerp, base, step, step_module, check = us.values()
        print(f"{n:5d} tensors: EMA part {step - lerp - base:7.1f} (with an ema_module {step_module - lerp - base:7.1f}; "
              f"storage check {check:6.1f}); step {step:7.1f}, bare lerp {lerp:7.1f}, idle base step {base:5.1f}")


if __name__ == "__main__":
    main()
