"""Bad input, one row each: every one is answered by an error that names the culprit."""

import os
import pickle
import tempfile
from types import MappingProxyType

import pytest
import torch
from conftest import BACKENDS, DEVICE
from models import make_model

from triton_ema import EMAOptimizer, attach, posthoc
from triton_ema.ema import EMA
from triton_ema.schedules import (
    Constant,
    CopyUntil,
    Cosine,
    MomentumAnnealing,
    Power,
    PowerFunction,
    Ramp,
    Recount,
    Warmup,
    device_schedule,
)


def wrapper(**kw):
    model = make_model(device=DEVICE)
    args = dict(optimizer=torch.optim.SGD(model.parameters(), lr=0.1), momentum=0.1, model=model)
    args.update(kw)
    return EMAOptimizer(**args)


def construct(**kw):
    return lambda: wrapper(**kw)


def stepped(momentum):
    def run():
        p = torch.nn.Parameter(torch.ones(2, device=DEVICE))
        EMAOptimizer(torch.optim.SGD([p], lr=1), momentum=momentum).step()
    return run


def loading(edit):
    def run():
        opt = wrapper()
        sd = opt.state_dict()
        edit(sd)
        opt.load_state_dict(sd)
    return run


def with_ints():
    base = torch.optim.SGD([torch.nn.Parameter(torch.ones(2))], lr=1)
    base.param_groups[0]["params"].append(torch.zeros(3, dtype=torch.int64))
    EMAOptimizer(base, momentum=0.1)


def duplicated():
    p = torch.nn.Parameter(torch.ones(3))
    with pytest.warns(UserWarning, match="duplicate"):  # torch itself only warns
        base = torch.optim.SGD([p, p], lr=0.1)
    EMAOptimizer(base, momentum=0.1)


def shape_changed():
    model = make_model(device=DEVICE)
    opt = EMAOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), momentum=0.5, model=model)
    model.fc.weight.data = torch.zeros(3, 3, device=DEVICE)
    opt.step()


def attached_twice(make):
    def run():
        base = torch.optim.SGD(make_model().parameters(), lr=0.1)
        attach(base, 0.1)
        make(base, 0.2)
    return run


def lightning_callback(**kw):
    from triton_ema.integrations.lightning import EMACallback

    return EMACallback(0.1, **kw)


def lightning_setup(strategy):
    import lightning.pytorch as pl

    trainer = pl.Trainer(strategy=strategy, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    lightning_callback().setup(trainer, None, "fit")


def model_parallel(**kw):
    from lightning.pytorch.strategies import ModelParallelStrategy

    return ModelParallelStrategy(**kw)


def hf_trainer(**kw):
    import tempfile

    import transformers

    from triton_ema.integrations.transformers import EMATrainer

    args = transformers.TrainingArguments(output_dir=tempfile.mkdtemp(), use_cpu=True, report_to="none")
    return EMATrainer(model=make_model(), args=args, **{"ema_momentum": 0.1, **kw})


def mmengine_hook(**kw):
    from triton_ema.integrations.mmengine import TritonEMAHook

    return TritonEMAHook(**kw)


def weights_of(edit=None, save=None, **kw):
    """load_ema_weights of a checkpoint, edited; or of the file ``save(folder)`` writes."""
    def run():
        from triton_ema import load_ema_weights

        if save is None:
            model = make_model()
            opt = EMAOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), momentum=kw.pop("momentum", 0.1),
                               model=kw.pop("saved_with", model))
            sd = opt.state_dict()
            return load_ema_weights(edit(sd) if edit else sd, **kw)
        folder = tempfile.mkdtemp()
        return load_ema_weights(save(folder), **kw)
    return run


def unreadable_file(folder):
    path = os.path.join(folder, "ckpt.pt")
    torch.save({"state": {}, "param_groups": [], "obj": Opaque()}, path)
    return path


class Opaque:
    """A class torch.load(weights_only=True) does not build."""


def safetensors_file(folder):
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, os.path.join(folder, "w.safetensors"))
    return os.path.join(folder, "w.safetensors")


def two_groups(sd):
    sd["param_groups"] = [sd["param_groups"][0], sd["param_groups"][0]]
    return sd


def lightning_test_without_ema():
    import lightning.pytorch as pl
    from lightning.pytorch.trainer.states import TrainerFn

    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    trainer.state.fn = TrainerFn.TESTING
    checkpoint = {"pytorch-lightning_version": "2.6.0", "state_dict": {}, "optimizer_states": [{"state": {}}]}
    lightning_callback().on_load_checkpoint(trainer, None, checkpoint)


def lightning_deepspeed(what):
    """EMACallback's refusals under DeepSpeedStrategy (a Trainer built on the CPU; its fit would need the CUDA
    check of setup_environment dropped, as tests/lightning_deepspeed.py does)."""
    def run():
        import lightning.pytorch as pl
        from lightning.pytorch.strategies import DeepSpeedStrategy
        from lightning.pytorch.trainer.states import TrainerFn

        trainer = pl.Trainer(strategy=DeepSpeedStrategy(stage=3), accelerator="cpu", devices=1, logger=False,
                             enable_progress_bar=False)
        callback = lightning_callback()
        if what == "test a ZeRO-3 checkpoint without a fit":
            trainer.state.fn = TrainerFn.TESTING
            callback.on_load_checkpoint(trainer, None, {})
        else:  # a checkpoint saved while validation runs on the EMA
            callback._on_ema = "validate"
            callback.on_save_checkpoint(trainer, None, {})
    return run


def deepspeed_rank_file(rank):
    """rank_ema of a checkpoint folder whose tag holds rank 0's optimizer-states file only."""
    def run():
        from triton_ema.deepspeed_checkpoint import rank_ema

        with tempfile.TemporaryDirectory() as folder:
            os.makedirs(os.path.join(folder, "mid"))
            torch.save({}, os.path.join(folder, "mid", "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt"))
            rank_ema(folder, "mid", rank)
    return run


def accelerate_fsdp_load_without_ema():
    """fsdp_ema_checkpoints' load hook on a save_state folder written without it (a real Accelerator, one process)."""
    from accelerate import Accelerator

    from triton_ema.integrations.transformers import fsdp_ema_checkpoints

    accelerator = Accelerator(cpu=True)
    model = make_model()
    model, optimizer = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))
    ema = attach(optimizer, 0.1, model=accelerator.unwrap_model(model))
    with tempfile.TemporaryDirectory() as folder:
        accelerator.save_state(folder)
        fsdp_ema_checkpoints(accelerator, ema)
        accelerator.load_state(folder)


def framework_wrapped(framework, make):
    """``make(wrapper)`` for a framework's own optimizer wrapper around an SGD."""
    def run():
        base = torch.optim.SGD(make_model().parameters(), lr=0.1)
        if framework == "accelerate":
            import accelerate

            try:
                make(accelerate.Accelerator(cpu=True).prepare(base))
            finally:  # accelerate's process-wide singletons, reset as its own tests do
                accelerate.state.AcceleratorState._reset_state(reset_partial_state=True)
                accelerate.state.GradientState._reset_state()
        elif framework == "lightning":
            from lightning.pytorch.core.optimizer import LightningOptimizer

            make(LightningOptimizer(base))
        else:
            from mmengine.optim import OptimWrapper, OptimWrapperDict

            wrapper = OptimWrapper(base)
            make(OptimWrapperDict(a=wrapper) if framework == "mmengine dict" else wrapper)
    return run


class Holder(torch.optim.Optimizer):
    """A wrapper of the kind frameworks write: an Optimizer subclass that never runs Optimizer.__init__."""

    def __init__(self, optimizer):
        self.optimizer = optimizer


def model_as_momentum(make):
    def run():
        model = make_model()
        make(torch.optim.SGD(model.parameters(), lr=0.1), model)
    return run


def nested_swap():
    opt = wrapper()
    with opt.swap_ema(), opt.swap_ema():
        pass


def step_in_swap():
    opt = wrapper()
    with opt.swap_ema():
        opt.step()


def module_in_swap():
    opt = wrapper()
    target = opt.ema_module()
    with opt.swap_ema():
        target(torch.randn(2, 3, 4, 4, device=DEVICE))


def moved_module():
    opt = wrapper()
    target = opt.ema_module()
    target.fc.weight.data = target.fc.weight.data.clone()
    target(torch.randn(2, 3, 4, 4, device=DEVICE))


def non_dense_on_triton():
    strided = torch.nn.Parameter(torch.randn(8, 8, device=DEVICE)[:, ::2])
    EMAOptimizer(torch.optim.SGD([strided], lr=0.1), momentum=0.1, backend="triton")


def importing(edit, num_steps=3, **kw):
    def run():
        opt = wrapper(**kw)
        sd = dict(opt.model.state_dict())
        edit(sd)
        opt.load_ema_state_dict(sd, num_steps=num_steps)
    return run


def buffers_twice():
    opt = wrapper(update_buffers=True)
    sd = opt.state_dict()
    buffers = sd["ema"]["buffers"]
    buffers["module.bn.running_mean"] = buffers["bn.running_mean"]
    opt.load_state_dict(sd)


def no_model_for_ema_state_dict():
    EMAOptimizer(torch.optim.SGD(make_model().parameters(), lr=0.1), momentum=0.1).ema_state_dict()


def snapshot_of(momentum, steps=1, interval=1):
    def run():
        p = torch.nn.Linear(2, 2).to(DEVICE)
        opt = EMAOptimizer(torch.optim.SGD(p.parameters(), lr=0.1), momentum=momentum, model=p, interval=interval)
        for _ in range(steps):
            opt.step()
        with tempfile.TemporaryDirectory() as folder:
            posthoc.save_snapshot(opt, folder)
    return run


def synthesizing(prepare=lambda folder: None, **kw):
    def run():
        with tempfile.TemporaryDirectory() as folder:
            prepare(folder)
            posthoc.synthesize(folder, **kw)
    return run


def one_snapshot(folder):
    p = torch.nn.Linear(2, 2)
    opt = EMAOptimizer(torch.optim.SGD(p.parameters(), lr=0.1), momentum=PowerFunction(gamma=7.0), model=p)
    opt.step()
    posthoc.save_snapshot(opt, folder)


def foreign_file(folder):
    torch.save({"weight": torch.zeros(2)}, os.path.join(folder, "snapshot-000000000001.pt"))


def folder_without_header(folder):
    os.mkdir(os.path.join(folder, "snapshot-000000000001"))


ERRORS = [
    # constructor arguments
    ("momentum and decay", construct(decay=0.9), ValueError, "either momentum or decay .* not both"),
    ("no momentum", construct(momentum=None), ValueError, "give momentum"),
    ("momentum > 1", construct(momentum=1.5), ValueError, "momentum must lie in \\(0, 1\\], got 1.5"),
    ("momentum 0", construct(momentum=0.0), ValueError, "momentum must lie in \\(0, 1\\], got 0.0"),
    ("momentum string", construct(momentum="0.1"), TypeError, "momentum must be a float or a callable"),
    ("decay 1", construct(momentum=None, decay=1.0), ValueError, "decay must lie in \\[0, 1\\), got 1.0"),
    ("interval 0", construct(interval=0), ValueError, "interval must be an integer >= 1, got 0"),
    ("interval float", construct(interval=1.5), ValueError, "interval must be an integer >= 1, got 1.5"),
    ("buffers without model", construct(model=None, update_buffers=True), ValueError, "update_buffers=True needs model="),
    ("unknown backend", construct(backend="cuda"), ValueError, "backend must be one of .*'cuda'"),
    ("model not a module", construct(model="net"), TypeError, "model must be an nn.Module, got str"),
    ("model not the optimizer's", construct(model=make_model(device=DEVICE), update_buffers=True), ValueError,
     "model= \\(Net\\) shares no parameter with the optimizer"),
    ("integer shadow dtype", construct(shadow_dtype=torch.int32), TypeError, "shadow_dtype must be one of"),
    ("bad device", construct(device="nowhere"), ValueError, "device must name a torch device, got 'nowhere'"),
    ("not an optimizer", construct(optimizer=[1, 2]), TypeError, "must be a torch.optim.Optimizer, got list"),
    ("wrapped twice", lambda: EMAOptimizer(wrapper(), momentum=0.1), TypeError, "already an EMAOptimizer"),
    ("attached twice", attached_twice(attach), ValueError, "SGD already has an EMA attached"),
    ("wrapping an attached optimizer", attached_twice(EMAOptimizer), ValueError, "SGD already has an EMA attached"),
    ("model as momentum", model_as_momentum(EMAOptimizer), TypeError,
     "momentum is an nn.Module \\(Net\\), not a float or a schedule; pass the model as model="),
    ("model as momentum of attach", model_as_momentum(attach), TypeError, "momentum is an nn.Module \\(Net\\)"),
    ("model as a profile's momentum", construct(momentum={"a": 0.1, "b": make_model()}), TypeError,
     "EMA profile 'b': momentum is an nn.Module \\(Net\\)"),
    # optimizers a framework has wrapped
    ("EMAOptimizer around accelerate's optimizer", framework_wrapped("accelerate", lambda o: EMAOptimizer(o, 0.1)),
     TypeError, "optimizer is accelerate's AcceleratedOptimizer around a SGD.*before accelerator.prepare\\(\\), or "
     "attach\\(optimizer"),
    ("EMAOptimizer around Lightning's optimizer", framework_wrapped("lightning", lambda o: EMAOptimizer(o, 0.1)),
     TypeError, "optimizer is Lightning's LightningOptimizer around a SGD.*configure_optimizers"),
    ("EMAOptimizer around mmengine's OptimWrapper", framework_wrapped("mmengine", lambda o: EMAOptimizer(o, 0.1)),
     TypeError, "optimizer is mmengine's OptimWrapper around a SGD.*use TritonEMAHook"),
    ("attach to mmengine's OptimWrapperDict", framework_wrapped("mmengine dict", lambda o: attach(o, 0.1)), TypeError,
     "OptimWrapperDict holds several optimizers: attach to one of them"),
    ("attach through an unknown wrapper", lambda: attach(Holder(torch.optim.SGD(make_model().parameters(), lr=0.1)),
                                                         0.1), TypeError,
     "optimizer is a Holder around a SGD, which torch's optimizer hooks cannot be attached to; attach to the SGD "
     "before Holder wraps it"),
    # schedules
    ("schedule above 1", stepped(lambda t: 2.0), ValueError, "gave 2.0 at step 0"),
    ("schedule NaN", stepped(lambda t: float("nan")), ValueError, "gave nan at step 0"),
    ("schedule not a number", stepped(lambda t: None), TypeError, "returned None at step 0"),
    ("schedule above 1, at construction", construct(momentum=lambda t: 2.0), ValueError, "gave 2.0 at step 0"),
    ("profile schedule not a number, at construction", construct(momentum={"a": 0.1, "b": lambda t: "x"}), TypeError,
     "EMA profile 'b': momentum schedule .* returned 'x' at step 0"),
    ("cosine without length", lambda: Cosine(0.004), ValueError, "total_steps must be a positive integer"),
    ("negative warm-up", lambda: Warmup(0.1, warm_up=-1), ValueError, "warm_up must be a non-negative integer"),
    ("power decay 1", lambda: Power(decay=1.0), ValueError, "decay must be < 1"),
    ("ramp floor above cap", lambda: Ramp(0.9, min_decay=0.99), ValueError, "min_decay \\(0.99\\) must not exceed decay"),
    ("annealing gamma 0", lambda: MomentumAnnealing(1e-3, gamma=0), ValueError, "gamma must be a finite number > 0"),
    ("delay of a float", lambda: CopyUntil(0.1, 5), TypeError, "schedule must be a schedule .*got float"),
    ("negative delay", lambda: CopyUntil(Constant(0.1), -2), ValueError, "step must be a non-negative integer, got -2"),
    ("recount every 0", lambda: Recount(Ramp(), every=0), ValueError, "every must be an integer >= 1, got 0"),
    ("power function, both", lambda: PowerFunction(gamma=7.0, sigma_rel=0.1), ValueError, "exactly one of gamma"),
    ("power function, sigma_rel too wide", lambda: PowerFunction(sigma_rel=0.3), ValueError,
     "sigma_rel must lie in \\(0, 0.2887\\) \\(gamma > 0\\), got 0.3"),
    ("power function, gamma 0", lambda: PowerFunction(gamma=0), ValueError, "gamma must be a positive finite number"),
    ("user schedule on the device", lambda: device_schedule(lambda t: 0.1), TypeError,
     "momentum schedule <lambda> cannot run on the device \\(capturable=True\\): it has no on_device\\(t\\)"),
    # EMA profiles
    ("empty profiles", construct(momentum={}), ValueError, "the dict of EMA profiles is empty"),
    ("empty profiles, a Mapping", construct(momentum=MappingProxyType({})), ValueError, "the dict of EMA profiles is empty"),
    ("bad profile decay, a Mapping", construct(momentum=None, decay=MappingProxyType({"a": 1.5})), ValueError,
     "EMA profile 'a': decay must lie in \\[0, 1\\), got 1.5"),
    ("profile name not a string", construct(momentum={1: 0.1}), TypeError, "profile names must be non-empty strings, got 1"),
    ("bad profile momentum", construct(momentum={"a": 0.1, "b": 1.5}), ValueError,
     "EMA profile 'b': momentum must lie in \\(0, 1\\], got 1.5"),
    ("profile name missing", lambda: wrapper(momentum={"a": 0.1, "b": 0.2}).ema_state_dict(), ValueError,
     "several profiles \\['a', 'b'\\]: name the one you want"),
    ("unknown profile", lambda: wrapper(momentum={"a": 0.1}).swap_ema("b"), ValueError,
     "no EMA profile named 'b'; the profiles are \\['a'\\]"),
    ("profile name for one unnamed profile", lambda: wrapper(momentum=0.1).swap_ema("b"), ValueError,
     "no EMA profile named 'b': this EMA has one unnamed profile \\(call without a name\\)"),
    ("checkpoint of other profiles", lambda: wrapper(momentum={"a": 0.1}).load_state_dict(
        wrapper(momentum={"b": 0.1}).state_dict()), ValueError,
     "\\['profiles'\\] holds \\['b'\\]; this EMA has profiles \\['a'\\]"),
    # post-hoc EMA
    ("snapshot of a constant EMA", snapshot_of(0.1), ValueError, "needs power-function profiles"),
    ("snapshot before a step", snapshot_of(PowerFunction(gamma=7.0), steps=0), ValueError, "before the first step"),
    ("snapshot with interval", snapshot_of(PowerFunction(gamma=7.0), interval=2), ValueError,
     "needs an update every step \\(interval=1\\), got interval=2"),
    ("no snapshots", synthesizing(sigma_rel=0.1), FileNotFoundError,
     "no snapshots \\(snapshot-\\*.pt files or snapshot-\\* folders\\) in"),
    ("synthesize both targets", synthesizing(one_snapshot, sigma_rel=0.1, gamma=7.0), ValueError,
     "exactly one of sigma_rel and gamma"),
    ("synthesize after the last snapshot", synthesizing(one_snapshot, gamma=7.0, time=5), ValueError,
     "time must lie in \\(0, 1\\] \\(the last snapshot's time\\), got 5"),
    ("not a snapshot", synthesizing(foreign_file, gamma=7.0), ValueError, "is not a triton-ema snapshot"),
    ("snapshot folder without header", synthesizing(folder_without_header, gamma=7.0), ValueError,
     "snapshot-000000000001 is not a triton-ema snapshot \\(no header.pt\\)"),
    # parameters
    ("integer parameter", with_ints, TypeError, "param_groups\\[0\\]\\['params'\\]\\[1\\] has dtype torch.int64"),
    ("duplicate parameter", duplicated, ValueError,
     "param_groups\\[0\\]\\['params'\\]\\[1\\] is the same tensor as param_groups\\[0\\]\\['params'\\]\\[0\\]"),
    ("shape changed", shape_changed, RuntimeError, "fc.weight changed shape from \\(7, 20\\) to \\(3, 3\\)"),
    # state dicts
    ("state dict not a dict", lambda: wrapper().load_state_dict([1]), TypeError, "state_dict must be a dict, got list"),
    ("ema entry not a dict", loading(lambda sd: sd.__setitem__("ema", 3)), TypeError, "state_dict\\['ema'\\] must be a dict"),
    ("shadow wrong shape", loading(lambda sd: sd["ema"]["shadow"].__setitem__(1, torch.zeros(2))), ValueError,
     "saved shadow of conv.weight has shape \\(2,\\), the parameter has \\(5, 3, 3, 3\\)"),
    ("shadow wrong dtype", loading(lambda sd: sd["ema"]["shadow"].__setitem__(0, torch.zeros((), dtype=torch.half))),
     ValueError, "saved shadow of scale has dtype torch.float16, this EMA keeps torch.float32"),
    ("shadow missing", loading(lambda sd: sd["ema"]["shadow"].pop(6)), ValueError, "no shadow for fc.bias"),
    ("names of another model", loading(lambda sd: sd["ema"]["names"].__setitem__(1, "head.weight")), ValueError,
     "shadow 1 is for 'head.weight', this model's parameter 1 is 'conv.weight'.*match_names=False"),
    ("names differ by a module. inside", loading(lambda sd: sd["ema"]["names"].__setitem__(1, "conv.module.weight")),
     ValueError, "shadow 1 is for 'conv.module.weight', this model's parameter 1 is 'conv.weight' \\('conv.module.weight' "
     "and 'conv.weight' differ only by 'module.' components inside the name"),
    ("buffers twice once unwrapped", buffers_twice, ValueError,
     "\\['buffers'\\] has two entries for 'bn.running_mean': 'bn.running_mean' and 'module.bn.running_mean'"),
    ("names not a list", loading(lambda sd: sd["ema"].__setitem__("names", 3)), TypeError,
     "\\['names'\\] must be a list of parameter names, got 3"),
    ("names missing one", loading(lambda sd: sd["ema"]["names"].pop()), ValueError,
     "the checkpoint has shadows for 6 parameters, this optimizer has 7"),
    ("negative step", loading(lambda sd: sd["ema"].__setitem__("step", -3)), ValueError,
     "\\['step'\\] must be a non-negative integer, got -3"),
    # framework integrations
    ("lightning callback given model=", lambda: lightning_callback(model=make_model()), TypeError,
     "EMACallback takes no model="),
    ("lightning test on EMA without a fit", lambda: lightning_callback().on_test_epoch_start(None, None), RuntimeError,
     "there is no EMA to test on; fit with this callback"),
    ("lightning FSDP2 with full checkpoints", lambda: lightning_setup(model_parallel(save_distributed_checkpoint=False)),
     NotImplementedError, r"ModelParallelStrategy\(save_distributed_checkpoint=False\): the EMA is saved only"),
    ("lightning deepspeed test without a fit", lightning_deepspeed("test a ZeRO-3 checkpoint without a fit"),
     NotImplementedError, r"test/validate\(ckpt_path=\) of a ZeRO-3 checkpoint in a process that has not fitted"),
    ("lightning deepspeed save inside the swap", lightning_deepspeed("save"), RuntimeError,
     "EMACallback under DeepSpeedStrategy: a checkpoint saved while validation or testing runs on the EMA"),
    ("deepspeed checkpoint without a rank's file", deepspeed_rank_file(1), FileNotFoundError,
     "holds no optimizer-states file of rank 1"),
    ("deepspeed checkpoint file without EMA", deepspeed_rank_file(0), ValueError,
     "holds no EMA \\(no 'ema_layout' in its optimizer state\\)"),
    ("accelerate FSDP2 load_state without the EMA", accelerate_fsdp_load_without_ema, FileNotFoundError,
     "has no ema/ folder: saved without fsdp_ema_checkpoints"),
    ("transformers trainer given model=", lambda: hf_trainer(ema_kwargs={"model": make_model()}), TypeError,
     "EMATrainer takes no model= in ema_kwargs"),
    ("transformers trainer without momentum", lambda: hf_trainer(ema_momentum=None), ValueError,
     "EMATrainer\\(ema_momentum=..., or ema_kwargs=\\{'decay': ...\\}\\): give momentum"),
    ("transformers trainer given the model as momentum", lambda: hf_trainer(ema_momentum=make_model()), TypeError,
     "EMATrainer\\(ema_momentum=..., or ema_kwargs=\\{'decay': ...\\}\\): momentum is an nn.Module"),
    ("lightning callback given the model as momentum",
     lambda: __import__("triton_ema.integrations.lightning").integrations.lightning.EMACallback(make_model()), TypeError,
     "EMACallback: momentum is an nn.Module"),
    ("lightning callback with a momentum out of range",
     lambda: __import__("triton_ema.integrations.lightning").integrations.lightning.EMACallback(1.5), ValueError,
     "EMACallback: momentum must lie in \\(0, 1\\], got 1.5"),
    ("transformers evaluate before train", lambda: hf_trainer().evaluate(), RuntimeError,
     r"there is no EMA to evaluate on before train\(\)"),
    ("mmengine hook unknown ema_type", lambda: mmengine_hook(ema_type="SWA"), ValueError,
     "ema_type must be one of .*'SWA'"),
    ("mmengine hook begin_iter and begin_epoch", lambda: mmengine_hook(begin_iter=3, begin_epoch=1), ValueError,
     "begin_iter and begin_epoch cannot both be set"),
    ("mmengine hook negative begin_iter", lambda: mmengine_hook(begin_iter=-1), ValueError,
     "begin_iter must be an integer >= 0, got -1"),
    ("mmengine hook given model=", lambda: mmengine_hook(model=make_model()), TypeError,
     "TritonEMAHook takes no model="),
    # EMA weights from elsewhere (load_ema_state_dict)
    ("import: unknown entry", importing(lambda sd: sd.__setitem__("head.weight", torch.zeros(1))), ValueError,
     "entries the model does not: \\['head.weight'\\]"),
    ("import: missing entry", importing(lambda sd: sd.pop("fc.bias")), ValueError, "no entry for fc.bias"),
    ("import: wrong shape", importing(lambda sd: sd.__setitem__("fc.bias", torch.zeros(2))), ValueError,
     "EMA of fc.bias has shape \\(2,\\), the model's has \\(7,\\)"),
    ("import: wrong dtype", importing(lambda sd: sd.__setitem__("fc.bias", torch.zeros(7, dtype=torch.int32))),
     ValueError, "EMA of fc.bias has dtype torch.int32; expected the model's torch.float32"),
    ("import: an entry twice once unwrapped", importing(lambda sd: sd.__setitem__("module.fc.bias", sd["fc.bias"])),
     ValueError, "the EMA state dict has two entries for 'fc.bias': 'fc.bias' and 'module.fc.bias' \\(the same name once "
     "wrapper prefixes are removed\\)"),
    ("import: negative step count", importing(lambda sd: None, num_steps=-1), ValueError,
     "num_steps must be a non-negative integer, got -1"),
    ("import without model", lambda: EMAOptimizer(torch.optim.SGD(make_model().parameters(), lr=0.1), momentum=0.1)
     .load_ema_state_dict({}, num_steps=0), RuntimeError, "load_ema_state_dict\\(\\) needs the model"),
    # EMA weights out of a checkpoint (load_ema_weights, python -m triton_ema.export)
    ("weights: no names", weights_of(saved_with=None), ValueError,
     "saved without parameter names \\(EMAOptimizer or attach without model=\\).*pass model="),
    ("weights: no names, two param groups", weights_of(two_groups, saved_with=None, model=make_model()), ValueError,
     "its optimizer's 2 param groups are not one group of the model's 7 parameters"),
    ("weights: several profiles", weights_of(momentum={"a": 0.1, "b": 0.2}), ValueError,
     "several EMA profiles \\['a', 'b'\\]: pass profile="),
    ("weights: unknown profile", weights_of(momentum={"a": 0.1}, profile="b"), ValueError,
     "no EMA profile named 'b'; the profiles of the checkpoint are \\['a'\\]"),
    ("weights: profile of one unnamed", weights_of(profile="b"), ValueError,
     "no EMA profile named 'b': the checkpoint has one unnamed profile"),
    ("weights: not a checkpoint", weights_of(lambda sd: {"weight": torch.zeros(1)}), ValueError,
     "holds no EMA: its keys \\['weight'\\] are of no checkpoint form known here"),
    ("weights: bare optimizer", weights_of(lambda sd: {k: v for k, v in sd.items() if k != "ema"}), ValueError,
     "an optimizer state dict without an EMA \\(no 'ema' entry"),
    ("weights: Lightning without EMA", weights_of(lambda sd: {"pytorch-lightning_version": "2.6.0", "state_dict": {},
                                                             "optimizer_states": [sd["param_groups"]]}), ValueError,
     "a Lightning checkpoint without an EMA \\(saved without EMACallback"),
    ("weights: mmengine without EMA", weights_of(lambda sd: {"meta": {}, "state_dict": {}, "optimizer": {"state": {}}}),
     ValueError, "an mmengine checkpoint without triton-ema's EMA \\(saved without TritonEMAHook"),
    ("weights: model of another net", weights_of(model=torch.nn.Linear(2, 2)), ValueError,
     "the EMA has entries \\['bn.bias', 'bn.weight', 'conv.bias', 'conv.weight', 'fc.bias'\\] that the model given "
     "lacks \\(7 missing"),
    ("weights: a file that needs unpickling", weights_of(save=unreadable_file), pickle.UnpicklingError,
     "ckpt.pt needs more than loading tensors .*holds test_errors.Opaque.*pass weights_only=False"),
    ("weights: a safetensors file", weights_of(save=safetensors_file), ValueError,
     "w.safetensors holds plain weights \\(safetensors\\), not a checkpoint"),
    ("weights: no such file", weights_of(save=lambda folder: os.path.join(folder, "nothing.pt")), FileNotFoundError,
     "no checkpoint at .*nothing.pt"),
    ("weights: unknown folder", weights_of(save=lambda folder: folder), ValueError,
     "is a folder of no checkpoint form known here"),
    ("weights: not a path", lambda: __import__("triton_ema").load_ema_weights(3), TypeError,
     "source must be a path or a loaded checkpoint \\(a dict\\), got int"),
    ("export: format unknown", lambda: __import__("triton_ema.export").export.export("ckpt.pt", "ema.txt"), ValueError,
     "cannot tell the format from 'ema.txt': name it .safetensors, .pt, .pth or .bin"),
    ("lightning test of a checkpoint without EMA", lightning_test_without_ema, RuntimeError,
     "EMACallback: the checkpoint's EMA cannot be read \\(the checkpoint is a Lightning checkpoint without an EMA"),
    ("EMA core over parameters, not groups", lambda: EMA(make_model().parameters(), 0.1), TypeError,
     "param_groups must be a list of dicts with 'params', .* got generator"),
    ("EMA core over a list of tensors", lambda: EMA([torch.ones(2)], 0.1), TypeError,
     "param_groups must be a list of dicts with 'params', .* got list"),
    # misuse
    ("nested swap", nested_swap, RuntimeError, "swap_ema\\(\\) is already active"),
    ("step inside swap", step_in_swap, RuntimeError, "step\\(\\) inside swap_ema\\(\\)"),
    ("ema_state_dict without model", no_model_for_ema_state_dict, RuntimeError, "needs the model: pass model="),
    ("capturable with a user schedule", construct(momentum=lambda t: 0.1, capturable=True), TypeError,
     "momentum schedule <lambda> cannot run on the device \\(capturable=True\\)"),
    ("ema_module without model", lambda: EMAOptimizer(torch.optim.SGD(make_model().parameters(), lr=0.1),
                                                      momentum=0.1).ema_module(), RuntimeError,
     "ema_module\\(\\) needs the model: pass model="),
    ("ema_module of an unknown profile", lambda: wrapper(momentum={"a": 0.1}).ema_module("b"), ValueError,
     "no EMA profile named 'b'"),
    ("EMA module run inside swap_ema", module_in_swap, RuntimeError, "the EMA module was used inside swap_ema\\(\\)"),
    ("EMA module whose tensors were replaced", moved_module, RuntimeError,
     "fc.weight \\(weight of Linear\\) no longer is the EMA storage"),
]
if "triton" in BACKENDS:
    ERRORS.append(("non-dense param on triton", non_dense_on_triton, ValueError,
                   "param_groups\\[0\\]\\['params'\\]\\[0\\] is a non-dense view"))


@pytest.mark.parametrize("make, error, match", [pytest.param(*row[1:], id=row[0]) for row in ERRORS])
def test_bad_input_is_named(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_the_table_is_long_enough():
    assert len(ERRORS) >= 20
