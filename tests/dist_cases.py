"""What each rank runs in the multi-process tests (CPU, gloo). Imported by
spawned processes, so it holds plain module-level functions only."""

import os
import sys

import torch
import torch.distributed as dist
from torch import nn

from triton_ema import EMAOptimizer, posthoc
from triton_ema.schedules import PowerFunction

BATCH, STEPS, MOMENTUM = 12, 6, 0.3  # 12 rows split evenly over 1, 2 or 3 ranks
# Several profiles: two power functions (snapshotted) and a constant (not snapshotted).
PROFILES = {"short": PowerFunction(gamma=2.0), "long": PowerFunction(gamma=7.0), "const": MOMENTUM}
SNAPSHOT_TIMES, DCP_STOP = (2, 4, 6), 3


class Uneven(nn.Module):
    """7 and 3 rows (uneven over 2 and 3 ranks) and a 1-element parameter (smaller than the world)."""

    def __init__(self):
        super().__init__()
        self.l1 = nn.Linear(5, 7)
        self.l2 = nn.Linear(7, 3)
        self.tiny = nn.Parameter(torch.ones(1))

    def forward(self, x):
        return self.l2(torch.relu(self.l1(x))) * self.tiny


def data(step):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(BATCH, 5, generator=g), torch.randn(BATCH, 3, generator=g)


def build(kind, backend="torch", mixed=False, device="cpu", momentum=MOMENTUM):
    """(model to train, optimizer) for kind in single / ddp / ddp-after / fsdp."""
    torch.manual_seed(0)
    model = Uneven().to(device)
    if kind == "ddp-after":  # the optimizer first, over the inner module; DDP wraps it afterwards
        opt = EMAOptimizer(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), momentum=MOMENTUM,
                           model=model, backend=backend)
        return nn.parallel.DistributedDataParallel(model), opt
    if kind == "ddp":
        train = nn.parallel.DistributedDataParallel(model)
    elif kind == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16) if mixed else MixedPrecisionPolicy()
        for layer in (model.l1, model.l2):
            fully_shard(layer, mp_policy=policy)
        fully_shard(model, mp_policy=policy)
        train = model
    else:
        train = model
    opt = EMAOptimizer(torch.optim.SGD(train.parameters(), lr=0.05, momentum=0.9), momentum=momentum,
                       model=train, backend=backend)
    return train, opt


def train(model, opt, steps, after_step=lambda opt: None):
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    for t in steps:
        x, y = (v.to(opt.param_groups[0]["params"][0].device) for v in data(t))
        rows = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
        loss = (model(x[rows]).float() - y[rows]).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        after_step(opt)


def single(backend="torch"):
    """The same run in one process: the reference."""
    model, opt = build("single", backend)
    train(model, opt, range(STEPS))
    return {k: v.clone() for k, v in opt.ema_state_dict().items()}


def snapshotting(folder):
    """An ``after_step`` that saves post-hoc snapshots at SNAPSHOT_TIMES, in the shadows' dtype and in bfloat16."""
    def after_step(opt):
        if opt.num_steps in SNAPSHOT_TIMES:
            posthoc.save_snapshot(opt, os.path.join(folder, "fp32"))
            posthoc.save_snapshot(opt, os.path.join(folder, "bf16"), dtype=torch.bfloat16)
    return after_step


def single_profiles(folder):
    """The run with PROFILES in one process, snapshots in ``folder``: the reference, per profile."""
    model, opt = build("single", momentum=PROFILES)
    train(model, opt, range(STEPS), snapshotting(folder))
    return full_emas(opt)


def full_emas(opt):
    """Every profile's EMA as whole tensors (a collective under FSDP2), on the CPU, by profile name."""
    return {name: {k: v.cpu() for k, v in opt.ema_state_dict(name, full=True).items()} for name in opt.schedules}


def _init(rank, world, store, device="cpu"):
    if device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")
    else:
        torch.cuda.set_device(rank)
    # A file store: no server socket whose owner may leave first, no port to race for.
    dist.init_process_group("gloo" if device == "cpu" else "nccl", init_method=f"file://{store}",
                            rank=rank, world_size=world)


def _finish():
    dist.barrier()  # no rank leaves while another still talks to it
    dist.destroy_process_group()
    # Leave without running C++ destructors: at interpreter exit a gloo thread sometimes
    # aborts the process ("terminate called without an active exception") after all work is done.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_ddp(rank, world, store, out, kind="ddp"):
    _init(rank, world, store)
    model, opt = build(kind)
    train(model, opt, range(STEPS))
    ema = opt.ema_state_dict()
    gathered = [None] * world
    dist.all_gather_object(gathered, {k: v.clone() for k, v in ema.items()})
    if rank == 0:
        torch.save({"ema": gathered[0], "same_on_all_ranks": all(
            all(torch.equal(g[k], gathered[0][k]) for k in g) for g in gathered)}, out)
    _finish()


class Normed(nn.Module):
    """BatchNorm between two layers: its running statistics come from each rank's own rows."""

    def __init__(self):
        super().__init__()
        self.l1 = nn.Linear(5, 7)
        self.bn = nn.BatchNorm1d(7)
        self.l2 = nn.Linear(7, 3)

    def forward(self, x):
        return self.l2(torch.relu(self.bn(self.l1(x))))


def build_normed():
    torch.manual_seed(0)
    model = Normed()
    return model, EMAOptimizer(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), momentum=MOMENTUM,
                               model=model, update_buffers=True)


def run_ddp_batchnorm(rank, world, store, out):
    """DDP with BatchNorm and update_buffers=True, model= the inner module (as the README recommends)."""
    _init(rank, world, store)
    torch.manual_seed(0)
    inner = Normed()
    model = nn.parallel.DistributedDataParallel(inner)
    opt = EMAOptimizer(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), momentum=MOMENTUM,
                       model=model.module, update_buffers=True)
    train(model, opt, range(STEPS))
    gathered = [None] * world
    dist.all_gather_object(gathered, {k: v.clone() for k, v in opt.ema_state_dict().items()})
    if rank == 0:
        torch.save({"ema": gathered, "checkpoint": opt.state_dict()}, out)
    _finish()


def run_fsdp(rank, world, store, out, mixed=False, device="cpu", backend="torch"):
    from triton_ema import sharding

    _init(rank, world, store, device)
    model, opt = build("fsdp", backend=backend, mixed=mixed, device=device)
    backends = sorted({b.backend.name for b in opt.core.store.buckets})
    local_numel = sum(sharding.local(p).numel() for p in model.parameters())
    train(model, opt, range(STEPS))
    x = data(99)[0].to(device)
    before = {k: sharding.local(v).clone() for k, v in model.state_dict().items()}
    with opt.swap_ema():
        swapped_out = model(x).detach().clone()
    restored = all(torch.equal(sharding.local(v), before[k]) for k, v in model.state_dict().items())
    ema = {k: v.cpu() for k, v in opt.ema_state_dict(full=True).items()}
    shard_sd = opt.state_dict()["ema"]["shadow"]
    try:
        opt.ema_module()
        module_refused = None
    except NotImplementedError as err:
        module_refused = str(err)
    if rank == 0:
        torch.save({"ema": ema, "swapped_out": swapped_out.cpu(), "restored": restored, "local_numel": local_numel,
                    "module_refused": module_refused,
                    "shadow_types": sorted({type(v).__name__ for v in shard_sd.values()}), "backends": backends}, out)
    _finish()


def _dcp_state(model, opt):
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    return {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt.optimizer),
            "ema": opt.ema_checkpoint}


def run_dcp_save(rank, world, store, ckpt, stop):
    import torch.distributed.checkpoint as dcp

    _init(rank, world, store)
    model, opt = build("fsdp")
    train(model, opt, range(stop))
    dcp.save(_dcp_state(model, opt), checkpoint_id=ckpt)
    _finish()


def run_dcp_resume(rank, world, store, ckpt, stop, out, momentum=MOMENTUM, snapshots=None):
    """Resume from a DCP checkpoint taken at step ``stop`` and train to STEPS (snapshots into ``snapshots``)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    _init(rank, world, store)
    model, opt = build("fsdp", momentum=momentum)
    state = _dcp_state(model, opt)
    dcp.load(state, checkpoint_id=ckpt)
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, opt.optimizer, state["optim"])
    assert opt.num_steps == stop, opt.num_steps
    loaded = full_emas(opt)
    train(model, opt, range(stop, STEPS), snapshotting(snapshots) if snapshots else lambda opt: None)
    ema = full_emas(opt)
    # This world size's (uneven) shards: each profile swapped in and back, and saved with DCP.
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    from triton_ema import sharding

    before = {k: sharding.local(v).clone() for k, v in model.state_dict().items()}
    swapped = {}
    for name in opt.schedules:
        with opt.swap_ema(name):
            swapped[name] = model(data(99)[0]).detach().clone()
    restored = all(torch.equal(sharding.local(v), before[k]) for k, v in model.state_dict().items())
    gathered = [None] * world
    dist.all_gather_object(gathered, restored)
    dcp.save({"model": get_model_state_dict(model), "ema": opt.ema_checkpoint}, checkpoint_id=f"{out}.dcp")
    if rank == 0:
        torch.save({"loaded": loaded, "ema": ema, "run": opt.run_id, "swapped_out": swapped, "restored": gathered},
                   out)
    _finish()


def run_fsdp_profiles(rank, world, store, folder):
    """FSDP2 with PROFILES: snapshots at SNAPSHOT_TIMES and a DCP checkpoint at DCP_STOP into ``folder``,
    with every profile's whole EMA at those times, at the end, and the model's output inside each profile's swap."""
    import torch.distributed.checkpoint as dcp

    from triton_ema import sharding

    _init(rank, world, store)
    model, opt = build("fsdp", momentum=PROFILES)
    snapshot, taken = snapshotting(os.path.join(folder, "snapshots")), {}

    def after_step(opt):
        snapshot(opt)
        if opt.num_steps in (*SNAPSHOT_TIMES, DCP_STOP):
            taken[opt.num_steps] = full_emas(opt)
        if opt.num_steps == DCP_STOP:
            dcp.save(_dcp_state(model, opt), checkpoint_id=os.path.join(folder, "ckpt"))

    train(model, opt, range(STEPS), after_step)
    x, before = data(99)[0], {k: sharding.local(v).clone() for k, v in model.state_dict().items()}
    swapped_out, held, restored = {}, [], []
    for name in PROFILES:
        shadows = [sharding.local(v).clone() for v in opt.state_dict()["ema"]["profiles"][name]["shadow"].values()]
        with opt.swap_ema(name):
            held.append(all(torch.equal(sharding.local(p), s) for p, s in zip(model.parameters(), shadows)))
            swapped_out[name] = model(x).detach().clone()
        restored.append(all(torch.equal(sharding.local(v), before[k]) for k, v in model.state_dict().items()))
    failed = crash_while_renaming(opt, os.path.join(folder, "crash"))
    everywhere = [None] * world
    dist.all_gather_object(everywhere, {"held": all(held), "restored": all(restored), "failed": failed})
    result = {"ema": full_emas(opt), "taken": taken, "swapped_out": swapped_out, "ranks": everywhere,
              "run": opt.run_id}
    if rank == 0:
        torch.save(result, os.path.join(folder, "result.pt"))
    _finish()


def crash_while_renaming(opt, folder):
    """save_snapshot() where rank 0 fails to put the finished snapshot in place: what this rank raised."""
    real = posthoc._replace_folder

    def crash(new, path):
        raise OSError("disk full")

    if dist.get_rank() == 0:
        posthoc._replace_folder = crash
    try:
        posthoc.save_snapshot(opt, folder)
    except (OSError, RuntimeError) as err:
        return f"{type(err).__name__}: {err}"
    finally:
        posthoc._replace_folder = real
    return None
