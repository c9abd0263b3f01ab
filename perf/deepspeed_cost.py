"""The EMA's cost per step under DeepSpeed ZeRO-3, bf16, on 2 CPU ranks (gloo):
``python perf/deepspeed_cost.py`` (needs the deepspeed and test extras).

Three runs of the same training, each in fresh processes: no EMA; triton-ema's
``integrations.deepspeed.attach`` (the EMA of each rank's fp32 master partition);
diffusers' ``EMAModel`` used as its training scripts use it with DeepSpeed
ZeRO-3 (a full fp32 copy of the model on every rank, built outside ZeRO, and
``step()`` gathering every parameter each step, which it does when
transformers reports ZeRO-3). Per rank: the median wall time of a step (the
difference to the run without it is the EMA's share, within the noise of a
shared machine), the EMA's update alone (triton-ema: the core's ``after_step``, which
the adaptor calls once every master has stepped; diffusers: its ``step()``), the bytes the EMA keeps, and the peak
resident memory of the process.
"""

import argparse
import copy
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
from torch import nn  # noqa: E402


def model(width, depth):
    torch.manual_seed(0)
    return nn.Sequential(*[m for _ in range(depth) for m in (nn.Linear(width, width), nn.Tanh())])


def rank_main(rank, world, store, variant, width, depth, steps, out):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    cfg = {"train_micro_batch_size_per_gpu": 8, "steps_per_print": 10 ** 9, "bf16": {"enabled": True},
           "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
    net = model(width, depth)
    keep = None
    if variant == "diffusers":
        import diffusers.training_utils
        from diffusers.training_utils import EMAModel
        from transformers.integrations import HfDeepSpeedConfig

        # diffusers imports deepspeed only where accelerate finds a CUDA build of it; the path is the same.
        diffusers.training_utils.deepspeed = deepspeed

        keep = HfDeepSpeedConfig(cfg)  # what makes EMAModel.step gather each parameter (ZeRO-3 detected)
        shadow_model = copy.deepcopy(net)  # the scripts build the EMA model outside ZeRO: a full copy per rank
        ema = EMAModel(shadow_model.parameters(), decay=0.999)
        del shadow_model
    engine, *_ = deepspeed.initialize(model=net, optimizer=torch.optim.AdamW(net.parameters(), lr=1e-4), config=cfg)
    if variant == "triton-ema":
        from triton_ema.integrations.deepspeed import attach

        ema = attach(engine, decay=0.999)
        # The update alone: the core's after_step, which the adaptor calls once every master has stepped.
        after_step = ema.core.after_step

        def timed(update):
            start = time.perf_counter()
            after_step(update)
            ema_times.append(time.perf_counter() - start)

        ema.core.after_step = timed
    ema_bytes, step_times, ema_times = 0, [], []
    if variant == "triton-ema":
        ema_bytes = sum(t.numel() * t.element_size() for t in ema.shadows())
    elif variant == "diffusers":
        ema_bytes = sum(t.numel() * t.element_size() for t in ema.shadow_params)
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(8, width, generator=g).bfloat16()
    for _ in range(steps + 3):
        start = time.perf_counter()
        loss = engine(x).float().square().mean()
        engine.backward(loss)
        engine.step()  # triton-ema: the update runs inside it
        if variant == "diffusers":
            before = time.perf_counter()
            ema.step(engine.module.parameters())
            ema_times.append(time.perf_counter() - before)
        step_times.append(time.perf_counter() - start)
    result = {"variant": variant, "rank": rank, "step_ms": 1e3 * statistics.median(step_times[3:]),
              "ema_bytes": ema_bytes, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
              "params": sum(p.ds_numel for p in engine.module.parameters())}
    if ema_times:
        result["ema_ms"] = 1e3 * statistics.median(ema_times[3:])
    del keep
    with open(f"{out}.{variant}.{rank}", "w") as f:
        json.dump(result, f)
    dist.barrier()
    dist.destroy_process_group()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--depth", type=int, default=6)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", default=os.path.join(tempfile.gettempdir(), "deepspeed_cost"),
                        help="prefix of the per-rank result files")
    args = parser.parse_args()
    rows = []
    for i, variant in enumerate(("none", "triton-ema", "diffusers")):
        store = f"{args.out}.store{i}.{os.getpid()}"
        mp.start_processes(rank_main, args=(2, store, variant, args.width, args.depth, args.steps, args.out),
                           nprocs=2, join=True, start_method="spawn")
        os.remove(store)
        for rank in range(2):
            with open(f"{args.out}.{variant}.{rank}") as f:
                rows.append(json.load(f))
    base = {r["rank"]: r["step_ms"] for r in rows if r["variant"] == "none"}
    import deepspeed

    print(f"# ZeRO-3 bf16, 2 CPU ranks (gloo, 1 thread each), {rows[0]['params'] / 1e6:.1f}M params "
          f"({args.depth} x Linear({args.width}, {args.width})), batch 8 per rank, median of {args.steps} steps")
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"deepspeed {deepspeed.__version__}, python {sys.version.split()[0]}")
    print("| EMA | rank | step (ms) | vs no EMA (ms) | EMA step alone (ms) | EMA kept (MB) | peak RSS (MB) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        alone = f"{r['ema_ms']:.1f}" if "ema_ms" in r else "-"
        print(f"| {r['variant']} | {r['rank']} | {r['step_ms']:.1f} | {r['step_ms'] - base[r['rank']]:+.1f} | {alone} | "
              f"{r['ema_bytes'] / 2 ** 20:.1f} | {r['peak_rss_mb']:.0f} |")


if __name__ == "__main__":
    main()
