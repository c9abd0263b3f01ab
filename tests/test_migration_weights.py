"""Bring your EMA with you: switch to EMAOptimizer mid-training, starting its
shadows from a checkpoint the peer library wrote, and continue its schedule.

Each case trains 60 steps with the bare base optimizer and the peer, saves the
peer's EMA as the peer saves it (``torch.save`` of its own state dict), loads
that file into ``EMAOptimizer.load_ema_state_dict`` with ``num_steps=60``,
and trains 60 more steps with both: the EMAs agree at the switch exactly and
after it within rounding."""

import pytest
import torch
import torch.nn.functional as F
from migration_cases import TOL64, base_optimizer, data, flat, load_file, make_net

from triton_ema import EMAOptimizer, migrate
from triton_ema.schedules import Constant, CopyUntil, Power, Ramp, Recount

SWITCH = 60


def torch_ema_case():
    torch_ema = pytest.importorskip("torch_ema")

    def peer(model):
        ema = torch_ema.ExponentialMovingAverage(model.parameters(), decay=0.99)
        return ema.update, lambda: ema.shadow_params, ema.state_dict

    return peer, lambda sd, model: migrate.from_shadow_params(sd["shadow_params"], model), Recount(Ramp(0.99), start=1)


def diffusers_case():
    training_utils = pytest.importorskip("diffusers.training_utils")

    def peer(model):
        ema = training_utils.EMAModel(model.parameters(), decay=0.999, use_ema_warmup=True, power=3 / 4)
        return lambda: ema.step(model.parameters()), lambda: ema.shadow_params, ema.state_dict

    return (peer, lambda sd, model: migrate.from_shadow_params(sd["shadow_params"], model),
            CopyUntil(Power(0.999, power=3 / 4)))


def ema_pytorch_case():
    ema_pytorch = pytest.importorskip("ema_pytorch")

    def peer(model):
        ema = ema_pytorch.EMA(model, beta=0.999, update_after_step=20, update_every=1, include_online_model=False)
        return ema.update, lambda: list(ema.ema_model.parameters()), ema.state_dict

    return peer, lambda sd, model: migrate.strip_prefix(sd, "ema_model."), CopyUntil(Power(0.999), 20)


def timm_case():
    model_ema = load_file("timm_model_ema", "timm", "utils/model_ema.py")

    def peer(model):
        ema = model_ema.ModelEmaV3(model, decay=0.995, use_warmup=True)
        steps = [0]

        def update():
            steps[0] += 1  # as timm's train.py: num_updates, incremented before the call
            ema.update(model, step=steps[0])

        return update, lambda: list(ema.module.parameters()), ema.module.state_dict  # train.py's state_dict_ema

    return peer, lambda sd, model: sd, CopyUntil(Power(0.995))


def averaged_model_case():
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    def peer(model):
        ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.98))
        return lambda: ema.update_parameters(model), lambda: list(ema.module.parameters()), ema.state_dict

    return peer, lambda sd, model: migrate.strip_prefix(sd, "module."), CopyUntil(Constant(0.02))


CASES = {"torch_ema": torch_ema_case, "diffusers": diffusers_case, "ema_pytorch": ema_pytorch_case,
         "timm": timm_case, "AveragedModel": averaged_model_case}


@pytest.mark.parametrize("name", CASES)
def test_switch_mid_training_from_a_peers_checkpoint(tmp_path, name):
    peer, convert, schedule = CASES[name]()
    model = make_net()
    base = base_optimizer(model.parameters())
    update, peer_ema, peer_state = peer(model)
    batches = data(steps=2 * SWITCH)
    for x, y in batches[:SWITCH]:
        F.mse_loss(model(x), y).backward()
        base.step()
        base.zero_grad()
        update()
    torch.save(peer_state(), tmp_path / "peer.pt")

    opt = EMAOptimizer(base, momentum=schedule, model=model)
    opt.load_ema_state_dict(convert(torch.load(tmp_path / "peer.pt", weights_only=False), model), num_steps=SWITCH)
    assert opt.num_steps == SWITCH
    assert torch.equal(flat(opt.ema_state_dict().values()), flat(peer_ema()))  # an exact copy at the switch
    tol = 1e-7 if name == "ema_pytorch" else TOL64  # its momentum is computed in float32 (test_migration_peers)
    for x, y in batches[SWITCH:]:
        F.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        update()
        diff = float((flat(opt.ema_state_dict().values()) - flat(peer_ema())).abs().max())
        assert diff <= tol, f"{name}: the EMAs differ by {diff:.3g} at step {opt.num_steps - 1}"


def test_mmengine_checkpoint(tmp_path):
    """A checkpoint written by mmengine's Runner with its EMAHook: the EMA sits in
    ``"state_dict"`` (the hook swaps it there for deployment), the training
    weights under ``"ema_state_dict"`` with the ``module.`` prefix."""
    pytest.importorskip("mmengine")
    from mmengine.model import BaseModel
    from mmengine.runner import Runner

    class Model(BaseModel):
        def __init__(self):
            super().__init__()
            self.net = make_net()

        def forward(self, x, y, mode="loss"):
            return {"loss": F.mse_loss(self.net(x), y)}

    model = Model()
    loader = torch.utils.data.DataLoader([{"x": x, "y": y} for x, y in data(steps=SWITCH)], batch_size=None)
    runner = Runner(model=model, work_dir=str(tmp_path), train_dataloader=loader,
                    optim_wrapper=dict(optimizer=dict(type="SGD", lr=0.05, momentum=0.9)),
                    train_cfg=dict(by_epoch=False, max_iters=SWITCH),
                    custom_hooks=[dict(type="EMAHook", momentum=0.01)],
                    default_hooks=dict(checkpoint=dict(type="CheckpointHook", interval=SWITCH, by_epoch=False),
                                       logger=None, timer=None, param_scheduler=None, sampler_seed=None),
                    log_level="ERROR", experiment_name=f"ckpt-{id(model)}")
    runner.train()
    hook = next(h for h in runner.hooks if type(h).__name__ == "EMAHook")
    ckpt = torch.load(tmp_path / f"iter_{SWITCH}.pth", weights_only=False)

    fresh = make_net()
    fresh.load_state_dict(migrate.strip_prefix(ckpt["ema_state_dict"], "module.net."))  # the training weights
    assert torch.equal(flat(fresh.parameters()), flat(model.net.parameters()))
    opt = EMAOptimizer(base_optimizer(fresh.parameters()), momentum=CopyUntil(Constant(0.01)), model=fresh)
    opt.load_ema_state_dict(migrate.strip_prefix(ckpt["state_dict"], "net."), num_steps=ckpt["meta"]["iter"])
    assert opt.num_steps == SWITCH
    assert torch.equal(flat(opt.ema_state_dict().values()), flat(hook.ema_model.module.net.parameters()))
    live = migrate.strip_prefix(hook.ema_model.state_dict(), "module.net.")  # the live hook's, same values
    assert all(torch.equal(live[k], v) for k, v in opt.ema_state_dict().items())


def test_mmcv_ema_buffers():
    """mmcv 1.x does not install here (test_migration_peers says why): its checkpoint
    layout, an ``ema_<name with dots as underscores>`` buffer per parameter in the
    model's state dict (``EMAHook.before_run``), is built from its source."""
    model = make_net()
    sd = dict(model.state_dict())
    for name, p in model.named_parameters():
        sd["ema_" + name.replace(".", "_")] = p.detach() * 0.5
    opt = EMAOptimizer(base_optimizer(model.parameters()), momentum=0.1, model=model)
    opt.load_ema_state_dict(migrate.from_mmcv(sd, model), num_steps=7)
    assert opt.num_steps == 7
    assert all(torch.equal(v, p.detach() * 0.5) for v, p in zip(opt.ema_state_dict().values(), model.parameters()))


BAD = [
    ("unknown name", lambda sd: sd.__setitem__("body.9.weight", torch.zeros(1)), ValueError,
     "entries the model does not: \\['body.9.weight'\\]"),
    ("missing entry", lambda sd: sd.pop("body.2.bias"), ValueError, "no entry for body.2.bias"),
    ("wrong shape", lambda sd: sd.__setitem__("body.0.bias", torch.zeros(3)), ValueError,
     "EMA of body.0.bias has shape \\(3,\\), the model's has \\(12,\\)"),
    ("wrong dtype", lambda sd: sd.__setitem__("body.0.bias", torch.zeros(12, dtype=torch.float16)), ValueError,
     "EMA of body.0.bias has dtype torch.float16; expected the model's torch.float64"),
    ("not a tensor", lambda sd: sd.__setitem__("body.0.bias", [0.0] * 12), TypeError, "EMA of body.0.bias is a list"),
]


@pytest.mark.parametrize("edit, error, match", [pytest.param(*row[1:], id=row[0]) for row in BAD])
def test_a_bad_ema_state_dict_changes_nothing(edit, error, match):
    model = make_net()
    opt = EMAOptimizer(base_optimizer(model.parameters()), momentum=0.1, model=model)
    x, y = data(steps=1)[0]
    F.mse_loss(model(x), y).backward()
    opt.step()
    before = {k: v.clone() for k, v in opt.ema_state_dict().items()}
    sd = {k: v * 2 for k, v in model.state_dict().items()}
    edit(sd)
    with pytest.raises(error, match=match):
        opt.load_ema_state_dict(sd, num_steps=5)
    assert opt.num_steps == 1
    assert all(torch.equal(before[k], v) for k, v in opt.ema_state_dict().items())


def test_load_needs_the_model_and_a_step_count():
    model = make_net()
    with pytest.raises(RuntimeError, match="needs the model: pass model="):
        EMAOptimizer(base_optimizer(model.parameters()), momentum=0.1).load_ema_state_dict({}, num_steps=0)
    opt = EMAOptimizer(base_optimizer(model.parameters()), momentum=0.1, model=model)
    with pytest.raises(ValueError, match="num_steps must be a non-negative integer, got -1"):
        opt.load_ema_state_dict(model.state_dict(), num_steps=-1)
    with pytest.raises(ValueError, match="shadow_params holds 2 tensors, the model has 4 parameters"):
        migrate.from_shadow_params([torch.zeros(1)] * 2, model)
    with pytest.raises(ValueError, match="no key of the state dict starts with 'ema_model.'"):
        migrate.strip_prefix(model.state_dict(), "ema_model.")
    with pytest.raises(ValueError, match="no mmcv EMA buffer 'ema_body_0_weight'"):
        migrate.from_mmcv(model.state_dict(), model)
