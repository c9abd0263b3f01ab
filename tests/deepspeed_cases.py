"""What each rank runs in tests/test_deepspeed.py: DeepSpeed engines on CPU (gloo), an EMA
attached, checked against a float64 EMA of the full fp32 master weights. Imported by the
forked ranks, so it holds plain module-level functions only."""

import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import deepspeed  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from deepspeed.utils import safe_get_full_fp32_param  # noqa: E402
from dist_cases import Uneven  # noqa: E402

from triton_ema.integrations.deepspeed import attach  # noqa: E402

STEPS, SAVE_AT, MOMENTUM, ROWS = 6, 3, 0.3, 4
CONFIGS = {  # name: (ZeRO stage, 16-bit dtype or None, the engine's optimizer class)
    "stage0-fp32": (0, None), "stage0-bf16": (0, "bf16"),
    "stage1-fp32": (1, None), "stage1-bf16": (1, "bf16"), "stage1-bf16-fp32acc": (1, "bf16-fp32acc"),
    "stage2-fp32": (2, None), "stage2-bf16": (2, "bf16"),
    "stage3-fp32": (3, None), "stage3-bf16": (3, "bf16"),
    "stage2-fp16": (2, "fp16"), "stage3-fp16": (3, "fp16"),
}


class Net(Uneven):
    """7 and 3 rows (uneven over 2 ranks), a 1-element parameter; under ZeRO-3 the two
    smaller tensors stay gathered (persistent) and the others are partitioned."""


def data(step, rank, dtype=torch.float32):
    g = torch.Generator().manual_seed(1000 * rank + step)
    return torch.randn(ROWS, 5, generator=g).to(dtype), torch.randn(ROWS, 3, generator=g)


def config(name):
    stage, half = CONFIGS[name]
    cfg = {"train_micro_batch_size_per_gpu": ROWS, "gradient_accumulation_steps": 1, "steps_per_print": 10 ** 9,
           "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 4}}
    if half in ("bf16", "bf16-fp32acc"):
        cfg["bf16"] = {"enabled": True}
    if half == "bf16-fp32acc":
        cfg["data_types"] = {"grad_accum_dtype": "fp32"}
    if half == "fp16":
        cfg["fp16"] = {"enabled": True, "initial_scale_power": 8}
    return cfg


def init(rank, world, store, backend="gloo"):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method=f"file://{store}", rank=rank, world_size=world)
    deepspeed.init_distributed(dist_backend=backend)


def build(name):
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=config(name))
    return engine


def half(engine):
    return next(p for p in engine.module.parameters()).dtype


def step(engine, t, poison=False):
    x, y = (v.to(engine.device) for v in data(t, dist.get_rank(), half(engine)))
    if poison:
        x = x * float("nan")
    loss = (engine(x).float() - y).square().mean()
    engine.backward(loss)
    engine.step()


def full_masters(engine):
    """The full fp32 master weight of every parameter, by name (a collective under ZeRO)."""
    opt = engine.optimizer
    if isinstance(opt, torch.optim.Optimizer):
        return {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    if hasattr(opt, "fp32_groups"):  # FP16_UnfusedOptimizer: a float32 copy of every parameter
        names = {id(p): n for n, p in engine.module.named_parameters()}
        return {names[id(p16)]: p32.detach().clone() for g16, g32 in zip(opt.fp16_groups, opt.fp32_groups)
                for p16, p32 in zip(g16, g32)}
    return {n: safe_get_full_fp32_param(p).detach().clone() for n, p in engine.module.named_parameters()}


def local_state(engine):
    """Copies of everything the EMA's swap touches on this rank: the fp32 masters and the 16-bit weights."""
    opt = engine.optimizer
    if hasattr(opt, "fp32_partitioned_groups_flat"):  # ZeRO-3
        tensors = list(opt.fp32_partitioned_groups_flat) + list(opt.fp16_partitioned_groups_flat)
        tensors += [p.data for p in engine.module.parameters() if p.numel() > 0]  # the persistent ones
    elif isinstance(opt, torch.optim.Optimizer):
        tensors = list(engine.module.parameters())
    else:
        inner = opt.optimizer
        tensors = [p for g in inner.param_groups for p in g["params"]] + list(engine.module.parameters())
    return [t.detach().clone() for t in tensors]


def forward(engine, x):
    with torch.no_grad():
        return engine(x).float()


def plain_forward(weights, dtype, x):
    torch.manual_seed(0)
    net = Net()
    net.load_state_dict(weights)
    with torch.no_grad():
        return net.to(x.device, dtype)(x).float()


def cpu(value):
    """``value`` with every tensor on the CPU (what the test process reads)."""
    if isinstance(value, torch.Tensor):
        return value.cpu()
    if isinstance(value, dict):
        return {k: cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(cpu(v) for v in value)
    return value


def run_cuda(rank, world, store, out, names, folder):
    """The same checks on CUDA (fp16 needs a GPU), one rank per GPU with nccl."""
    init(rank, world, store, "nccl")
    results = {name: cpu(run_one(name, rank, os.path.join(folder, name))) for name in names}
    if rank == 0:
        torch.save(results, out)
    dist.barrier()


def run(rank, world, store, out, names, folder):
    """For every config: train, swap, save at SAVE_AT, and resume in a fresh engine."""
    init(rank, world, store)
    results = {}
    for name in names:
        results[name] = run_one(name, rank, os.path.join(folder, name))
    results["module_only"] = module_only(os.path.join(folder, "module-only"), "stage2-bf16")
    results["errors"] = errors(os.path.join(folder, "stage2-bf16"))
    if rank == 0:
        torch.save(results, out)
    dist.barrier()


def run_one(name, rank, folder):
    engine = build(name)
    ema = attach(engine, momentum=MOMENTUM)
    reference = {k: v.double() for k, v in full_masters(engine).items()}
    result = {"skipped": None}
    for t in range(STEPS):
        step(engine, t)
        for k, v in full_masters(engine).items():
            reference[k] += MOMENTUM * (v.double() - reference[k])
        if t + 1 == SAVE_AT:
            engine.save_checkpoint(folder, tag="mid")
            result["saved"] = ema.ema_state_dict(full=True)
            result["saved_steps"] = ema.num_steps
    result["num_steps"] = ema.num_steps
    result["ema"] = ema.ema_state_dict(full=True)
    result["reference"] = {k: v.clone() for k, v in reference.items()}
    result["local"] = ema.ema_state_dict(full=False)
    result["layout"] = dict(ema.layout)
    result.update(check_swap(engine, ema, result["ema"]))
    result["masters"] = full_masters(engine)

    # Resume: a fresh engine loads the checkpoint of step SAVE_AT and runs the remaining steps.
    resumed = build(name)
    ema2 = attach(resumed, momentum=MOMENTUM)
    resumed.load_checkpoint(folder, tag="mid")
    result["resumed_steps_after_load"] = ema2.num_steps
    for t in range(SAVE_AT, STEPS):
        step(resumed, t)
    result["resumed_ema"] = ema2.ema_state_dict(full=True)
    result["resumed_masters"] = full_masters(resumed)
    result["resumed_num_steps"] = ema2.num_steps

    if CONFIGS[name][1] is not None:  # a step with non-finite gradients: DeepSpeed skips it
        before, count = ema2.ema_state_dict(full=True), ema2.num_steps
        masters_before = full_masters(resumed)
        step(resumed, STEPS, poison=True)
        masters_after = full_masters(resumed)
        result["skipped"] = {"masters_unchanged": all(torch.equal(masters_before[k], masters_after[k])
                                                      for k in masters_before),
                             "ema_unchanged": all(torch.equal(v, ema2.ema_state_dict(full=True)[k])
                                                  for k, v in before.items()),
                             "count_before": count, "count_after": ema2.num_steps}
    return result


def check_swap(engine, ema, full_ema):
    rank = dist.get_rank()
    x = data(99, rank, half(engine))[0].to(engine.device)
    before, out_before = local_state(engine), forward(engine, x)
    with ema.swap_ema():
        inside = forward(engine, x)
        errors = []
        for what, fn in (("step", engine.step), ("nested", lambda: ema.swap_ema().__enter__()),
                         ("save", lambda: engine.save_checkpoint("/nonexistent"))):
            try:
                fn()
                errors.append(f"{what}: no error")
            except RuntimeError as e:
                errors.append(f"{what}: {e}")
    after, out_after = local_state(engine), forward(engine, x)
    try:
        with ema.swap_ema():
            raise KeyError("inside")
    except KeyError:
        pass
    after_raise = local_state(engine)
    return {"swap_back": all(torch.equal(a, b) for a, b in zip(before, after)) and len(before) == len(after),
            "swap_back_after_raise": all(torch.equal(a, b) for a, b in zip(before, after_raise)),
            "out_unchanged": torch.equal(out_before, out_after),
            "inside_is_ema": torch.equal(inside, plain_forward(full_ema, half(engine), x)),
            "inside_differs": not torch.equal(inside, out_before),
            "swap_errors": errors}


def module_only(folder, name):
    """load_module_only=True and load_optimizer_states=False: the EMA restarts from the loaded weights."""
    import warnings

    engine = build(name)
    attach(engine, momentum=MOMENTUM)
    for t in range(SAVE_AT):
        step(engine, t)
    engine.save_checkpoint(folder, tag="m")
    results = {}
    for flag in ({"load_module_only": True}, {"load_optimizer_states": False}):
        fresh = build(name)
        ema = attach(fresh, momentum=MOMENTUM)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fresh.load_checkpoint(folder, tag="m", **flag)
        results[next(iter(flag))] = {"warnings": [str(w.message) for w in caught if "EMA" in str(w.message)],
                                     "ema": ema.ema_state_dict(full=True), "masters": full_masters(fresh),
                                     "num_steps": ema.num_steps}
    return results


def _error(fn):
    try:
        fn()
    except Exception as e:
        return type(e).__name__, str(e)
    return None, "no error"


def errors(folder):
    """(exception type, message) of each wrong use, by name."""
    torch.manual_seed(0)
    model = Net()
    out = {"plain module": _error(lambda: attach(model, momentum=MOMENTUM)),
           "plain optimizer": _error(lambda: attach(torch.optim.SGD(model.parameters(), lr=0.1), momentum=MOMENTUM))}
    engine = build("stage2-bf16")
    ema = attach(engine, momentum=MOMENTUM)
    out["twice"] = _error(lambda: attach(engine, momentum=MOMENTUM))
    out["ema_module"] = _error(lambda: ema.ema_module())
    out["ema_checkpoint"] = _error(lambda: ema.ema_checkpoint)
    out["load_ema_state_dict"] = _error(lambda: ema.load_ema_state_dict({}, num_steps=0))
    out["model="] = _error(lambda: attach(build("stage1-fp32"), momentum=MOMENTUM, model=model))
    bare, *_ = deepspeed.initialize(model=Net(), config=config("stage0-fp32"))
    out["no optimizer"] = _error(lambda: attach(bare, momentum=MOMENTUM))
    cfg = config("stage2-fp32")
    cfg["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
    cfg["zero_force_ds_cpu_optimizer"] = False
    net = Net()
    offloaded, *_ = deepspeed.initialize(model=net, optimizer=torch.optim.AdamW(net.parameters()), config=cfg)
    out["offload_optimizer"] = _error(lambda: attach(offloaded, momentum=MOMENTUM))
    cfg = config("stage2-bf16")
    cfg["checkpoint"] = {"load_universal": True}
    net = Net()
    universal, *_ = deepspeed.initialize(model=net, optimizer=torch.optim.AdamW(net.parameters()), config=cfg)
    attach(universal, momentum=MOMENTUM)
    out["universal"] = _error(lambda: universal.load_checkpoint(folder, tag="mid"))
    return out


def run_other_world(rank, world, store, out, folder, name):
    """Resume a checkpoint saved on 2 ranks on ``world`` ranks: refused."""
    init(rank, world, store)
    engine = build(name)
    attach(engine, momentum=MOMENTUM)
    result = _error(lambda: engine.load_checkpoint(folder, tag="mid"))
    if rank == 0:
        torch.save(result, out)
    dist.barrier()
