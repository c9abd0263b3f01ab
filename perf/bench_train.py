"""A training step of a GPT-2-shaped transformer without and with each EMA (`pytest perf/bench_train.py`);
the configuration is the bench command's (triton_ema/bench/train.py)."""

import pytest
import torch
from conftest import DEVICE, TINY

from triton_ema.bench.train import CAPTURED, default_config, make_step, variants

VARIANTS = variants()


@pytest.mark.parametrize("name", [pytest.param(name, marks=[pytest.mark.skip(reason=why)] if why else [])
                                  for name, (_, why) in VARIANTS.items()])
def bench_train_step(benchmark, name):
    cfg = default_config(DEVICE, TINY)
    step, params = make_step(VARIANTS[name][0], cfg, DEVICE, captured=name.endswith(CAPTURED))

    def call():
        step()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()

    benchmark.extra_info.update(job="train", workload=cfg.name, variant=name, numel=sum(p.numel() for p in params))
    benchmark.pedantic(call, rounds=3 if TINY else 10, warmup_rounds=1)
