"""load_ema_weights and python -m triton_ema.export: the EMA out of every checkpoint form, written by the real
frameworks (Lightning, the transformers Trainer, accelerate, mmengine, DCP), bitwise the EMA the run had and
loading into the unwrapped model with strict=True; files from strangers read safely; Lightning's
test/validate(ckpt_path=) in a fresh Trainer on the checkpoint's EMA. The 2-process DCP forms (FSDP2,
ModelParallelStrategy) are checked in test_distributed.py and test_lightning.py, beside the runs that write them."""

import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import assert_ulps
from models import batches, make_model, regression_data, regression_loss, regression_net, train_step
from torch import nn

from triton_ema import EMAOptimizer, attach, load_ema_weights
from triton_ema.export import main as export_main
from triton_ema.keying import completed
from triton_ema.names import only_wrappers_differ, unwrapped, wrapper_difference
from triton_ema.weights import folder_form


def bitwise(a, b):
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def with_counter_of(ema, model):
    """``ema`` with ``model``'s BatchNorm step counter: an integer buffer, not averaged, so the model's own."""
    return {**ema, "bn.num_batches_tracked": model.state_dict()["bn.num_batches_tracked"]}


def trained(dtype=torch.float32, momentum=0.3, wrap=lambda m: m, steps=3, **kw):
    """(model, EMAOptimizer with model=wrap(model), update_buffers) after ``steps`` steps."""
    model = make_model(dtype)
    opt = EMAOptimizer(torch.optim.AdamW(model.parameters(), lr=0.05, eps=1e-3), momentum=momentum,
                       model=wrap(model), update_buffers=True, **kw)
    for batch in batches(steps, dtype):
        train_step(model, opt, batch)
    return model, opt


# --- names ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, expected", [
    ("fc.weight", "fc.weight"),
    ("module.fc.weight", "fc.weight"),
    ("module.module.fc.weight", "fc.weight"),
    ("_orig_mod.fc.weight", "fc.weight"),
    ("module._orig_mod.fc.weight", "fc.weight"),
    ("_orig_mod.module.fc.weight", "fc.weight"),
    ("_fsdp_wrapped_module.layers.0._fsdp_wrapped_module.weight", "layers.0.weight"),
    ("layers.0._checkpoint_wrapped_module.mlp.weight", "layers.0.mlp.weight"),
    ("encoder.module.weight", "encoder.module.weight"),  # a user's submodule named "module", not a wrapper
    ("module", "module"),
])
def test_unwrapped_removes_wrapper_prefixes_only(name, expected):
    assert unwrapped(name) == expected


def test_names_that_differ_only_by_wrappers_are_told_apart():
    assert only_wrappers_differ("module.fc.weight", "fc.weight")
    assert not only_wrappers_differ("fc.weight", "fc.weight")
    assert not only_wrappers_differ("module.fc.weight", "fc.bias")
    assert "differ only by wrapper prefixes" in wrapper_difference("_orig_mod.fc.weight", "fc.weight")
    assert wrapper_difference("fc.weight", "fc.bias") == ""


# --- optimizer state dicts (opt.state_dict(), in memory and as files) ----------------------------

def test_optimizer_state_dict_file_gives_the_averaged_tensors_bitwise(tmp_path):
    model, opt = trained()
    torch.save(opt.state_dict(), tmp_path / "ckpt.pt")
    weights = load_ema_weights(tmp_path / "ckpt.pt")
    ema = opt.ema_state_dict()
    averaged = [k for k in ema if k != "bn.num_batches_tracked"]  # an integer buffer: not averaged, not saved
    assert sorted(weights) == sorted(averaged)
    assert all(torch.equal(weights[k], ema[k]) for k in averaged)
    fresh = make_model(seed=7)
    fresh.load_state_dict(weights, strict=False)
    assert bitwise(fresh.state_dict(), {**make_model(seed=7).state_dict(), **weights})


def test_a_dict_holding_the_optimizer_and_the_model_gives_the_whole_ema_state_dict(tmp_path):
    model, opt = trained()  # the checkpoint the README saves: the model's weights beside the optimizer + EMA
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "epoch": 3}, tmp_path / "ckpt.pt")
    weights = load_ema_weights(tmp_path / "ckpt.pt")
    assert bitwise(weights, opt.ema_state_dict())
    make_model(seed=7).load_state_dict(weights, strict=True)
    two = {"a": opt.state_dict(), "b": opt.state_dict()}
    with pytest.raises(ValueError, match=r"2 of its optimizer state dicts \['a', 'b'\] hold an EMA"):
        load_ema_weights(two)
    bare = {"model": model.state_dict(), "opt": torch.optim.SGD(model.parameters(), lr=0.1).state_dict()}
    with pytest.raises(ValueError, match=r"its optimizer state dicts \['opt'\] hold no EMA"):
        load_ema_weights(bare)


def test_model_given_fills_what_is_not_averaged_and_takes_its_dtypes():
    model, opt = trained(torch.bfloat16)  # float32 shadows of bfloat16 params
    sd = opt.state_dict()
    alone = load_ema_weights(sd)
    assert all(v.dtype == torch.float32 for v in alone.values())  # the EMA as kept, never rounded
    assert torch.equal(alone["fc.weight"], sd["ema"]["shadow"][5])
    given = make_model(torch.bfloat16, seed=7)
    full = load_ema_weights(sd, model=given)
    assert bitwise(full, with_counter_of(opt.ema_state_dict(), given))
    make_model(torch.bfloat16, seed=7).load_state_dict(full, strict=True)


def test_every_value_is_a_copy_of_its_own():
    model, opt = trained()
    sd = opt.state_dict()  # views of the live EMA
    weights = load_ema_weights(sd)
    before = {k: v.clone() for k, v in weights.items()}
    train_step(model, opt, batches(1, seed=9)[0])
    assert bitwise(weights, before)
    assert all(v.is_contiguous() and v.untyped_storage().nbytes() == v.nbytes for v in weights.values())


@pytest.mark.parametrize("wrap", [nn.DataParallel, torch.compile], ids=["module.", "_orig_mod."])
def test_names_of_a_wrapped_model_come_back_unwrapped(tmp_path, wrap):
    model, opt = trained(wrap=wrap)  # model= the wrapper: the EMA's names carry its prefix, the checkpoint's do not
    saved = opt.state_dict()
    assert saved["ema"]["names"][0] == "scale"
    prefixed = {**saved, "ema": {**saved["ema"], "names": [name for name, _ in opt.model.named_parameters()]}}
    assert prefixed["ema"]["names"][0] != "scale" and unwrapped(prefixed["ema"]["names"][0]) == "scale"
    given = make_model(seed=7)
    for sd in (saved, prefixed):  # a checkpoint whose names carry the prefix reads the same
        weights = load_ema_weights(sd, model=given)
        assert bitwise(weights, with_counter_of({unwrapped(k): v for k, v in opt.ema_state_dict().items()}, given))
        make_model(seed=7).load_state_dict(weights, strict=True)


def test_several_profiles_need_a_name():
    model = make_model()
    opt = EMAOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), momentum={"short": 0.5, "long": 0.1}, model=model)
    for batch in batches(2):
        train_step(model, opt, batch)
    for name in ("short", "long"):
        assert bitwise(load_ema_weights(opt.state_dict(), profile=name, model=model), opt.ema_state_dict(name))
    assert not torch.equal(load_ema_weights(opt.state_dict(), profile="short")["fc.weight"],
                           load_ema_weights(opt.state_dict(), profile="long")["fc.weight"])
    with pytest.raises(ValueError, match=r"several EMA profiles \['short', 'long'\]: pass profile="):
        load_ema_weights(opt.state_dict())


def test_without_names_the_model_names_the_shadows_by_position():
    model = make_model()
    opt = EMAOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), momentum=0.3)  # no model=: no names
    for batch in batches(2):
        train_step(model, opt, batch)
    sd = opt.state_dict()
    with pytest.raises(ValueError, match="saved without parameter names .* pass model="):
        load_ema_weights(sd)
    weights = load_ema_weights(sd, model=make_model(seed=7))
    assert all(torch.equal(weights[name], sd["ema"]["shadow"][i]) for i, (name, _) in enumerate(model.named_parameters()))
    make_model(seed=7).load_state_dict(weights, strict=True)


def test_tied_weights_all_get_the_ema():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Linear(4, 4, bias=False)
            self.head = nn.Linear(4, 4, bias=False)
            self.head.weight = self.embed.weight  # one parameter, two state-dict keys

        def forward(self, x):
            return self.head(self.embed(x).tanh())

    torch.manual_seed(0)
    model = Tied()
    opt = EMAOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), momentum=0.3, model=model)
    model(torch.randn(3, 4)).square().sum().backward()
    opt.step()
    torch.manual_seed(1)
    weights = load_ema_weights(opt.state_dict(), model=Tied())
    assert torch.equal(weights["head.weight"], weights["embed.weight"])
    assert bitwise(weights, opt.ema_state_dict())


def test_export_writes_safetensors_and_torch_files(tmp_path, capsys):
    from safetensors.torch import load_file

    model, opt = trained()
    torch.save(opt.state_dict(), tmp_path / "ckpt.pt")
    expected = load_ema_weights(tmp_path / "ckpt.pt")
    assert export_main([str(tmp_path / "ckpt.pt"), str(tmp_path / "ema.pth")]) == 0
    assert bitwise(torch.load(tmp_path / "ema.pth", weights_only=True), expected)
    assert export_main([str(tmp_path / "ckpt.pt"), str(tmp_path / "ema.out"), "--format", "safetensors"]) == 0
    assert bitwise(load_file(tmp_path / "ema.out"), expected)
    assert export_main([str(tmp_path / "ckpt.pt"), str(tmp_path / "ema.txt")]) == 1
    assert "cannot tell the format from 'ema.txt'" in capsys.readouterr().err
    assert not (tmp_path / "ema.txt").exists()


def test_export_without_safetensors_says_how_to_install_it(tmp_path, monkeypatch, capsys):
    model, opt = trained()
    torch.save(opt.state_dict(), tmp_path / "ckpt.pt")
    monkeypatch.setitem(sys.modules, "safetensors", None)  # as if it were not installed
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    assert export_main([str(tmp_path / "ckpt.pt"), str(tmp_path / "ema.safetensors")]) == 1
    needs = "needs the safetensors package: the export extra (in a clone, pip install -c constraints.txt -e '.[export]')"
    assert needs in capsys.readouterr().err
    assert export_main([str(tmp_path / "ckpt.pt"), str(tmp_path / "ema.safetensors"), "--format", "torch"]) == 0


def test_export_command_in_a_subprocess(tmp_path):
    from safetensors.torch import load_file

    model = make_model()
    opt = EMAOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), momentum={"a": 0.5, "b": 0.1}, model=model)
    train_step(model, opt, batches(1)[0])
    torch.save(opt.state_dict(), tmp_path / "ckpt.pt")
    run = subprocess.run([sys.executable, "-m", "triton_ema.export", str(tmp_path / "ckpt.pt"),
                          str(tmp_path / "ema.safetensors"), "--profile", "b"], capture_output=True, text=True,
                         timeout=300, env={**os.environ, "TRITON_INTERPRET": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    assert "wrote 7 tensors" in run.stdout  # the parameters: no buffers averaged
    ema = opt.ema_state_dict("b")
    assert bitwise(load_file(tmp_path / "ema.safetensors"), {k: ema[k] for k, _ in model.named_parameters()})


# --- files from strangers -------------------------------------------------------------------------

class Payload:
    """Something torch.load(weights_only=True) does not build."""


def test_a_file_that_needs_unpickling_is_refused_unless_trusted(tmp_path):
    model, opt = trained()
    torch.save({**opt.state_dict(), "extra": Payload()}, tmp_path / "ckpt.pt")
    with pytest.raises(pickle.UnpicklingError, match=r"holds test_weights.Payload.*pass weights_only=False"):
        load_ema_weights(tmp_path / "ckpt.pt")
    assert bitwise(load_ema_weights(tmp_path / "ckpt.pt", weights_only=False), load_ema_weights(opt.state_dict()))


def called(value=None):
    Path(os.environ["PAYLOAD_MARK"]).write_text("ran")
    return value


class Reduces:
    """Unpickled, it runs ``called`` (any code could stand there) and becomes ``value``."""

    def __init__(self, value=None):
        self.value = value

    def __reduce__(self):
        return called, (self.value,)


def dcp_folder(tmp_path, opt, model, **extra):
    import torch.distributed.checkpoint as dcp

    dcp.save({"model": model.state_dict(), "ema": opt.ema_checkpoint, **extra}, checkpoint_id=tmp_path / "dcp",
             no_dist=True)
    return tmp_path / "dcp"


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_dcp_folder_of_one_process_and_its_unpickling_refused(tmp_path, monkeypatch):
    from torch.distributed.checkpoint import FileSystemReader

    model, opt = trained()
    folder = dcp_folder(tmp_path, opt, model)
    assert folder_form(folder).name == "a torch.distributed.checkpoint folder"
    weights = load_ema_weights(folder)
    assert bitwise(weights, opt.ema_state_dict())
    make_model(seed=7).load_state_dict(weights, strict=True)
    # DCP unpickles its metadata and non-tensor values in full: here neither is, and nothing in them runs.
    mark = tmp_path / "mark"
    monkeypatch.setenv("PAYLOAD_MARK", str(mark))
    metadata = FileSystemReader(folder).read_metadata()
    (folder / ".metadata").write_bytes(pickle.dumps(Reduces(metadata)))
    with pytest.raises(pickle.UnpicklingError, match=r"\.metadata needs more .* test_weights.called"):
        load_ema_weights(folder)
    assert not mark.exists()
    assert bitwise(load_ema_weights(folder, weights_only=False), weights)  # trusted: read in full, the payload runs
    assert mark.read_text() == "ran"


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_dcp_value_that_needs_unpickling_is_refused(tmp_path, monkeypatch):
    model, opt = trained()
    monkeypatch.setenv("PAYLOAD_MARK", str(tmp_path / "mark"))
    entry = {**opt.ema_checkpoint.state_dict(), "run": Reduces()}
    folder = dcp_folder(tmp_path, opt, model, ema=entry)
    with pytest.raises(pickle.UnpicklingError, match=r"DCP entry ema.run needs more .* test_weights.called"):
        load_ema_weights(folder)
    assert not (tmp_path / "mark").exists()
    assert bitwise(load_ema_weights(folder, weights_only=False), opt.ema_state_dict())  # trusted: the payload runs
    assert (tmp_path / "mark").read_text() == "ran"


def test_weights_of_another_reader_are_completed_like_the_others():
    model, opt = trained(wrap=nn.DataParallel)
    given = make_model(seed=7)
    averaged = {k: v for k, v in opt.ema_state_dict().items() if not k.endswith("num_batches_tracked")}
    weights = completed(averaged, given, "a reader's weights")
    assert bitwise(weights, with_counter_of({unwrapped(k): v for k, v in opt.ema_state_dict().items()}, given))
    assert bitwise(completed(averaged, None, "a reader's weights"), {unwrapped(k): v for k, v in averaged.items()})


def test_a_deepspeed_folder_is_recognised(tmp_path):
    (tmp_path / "global_step4").mkdir()
    (tmp_path / "latest").write_text("global_step4")
    torch.save({}, tmp_path / "global_step4" / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt")
    assert folder_form(tmp_path).name == folder_form(tmp_path / "global_step4").name == "a DeepSpeed checkpoint folder"
    assert folder_form(tmp_path / "global_step4" / "nothing") is None


# --- the frameworks' checkpoints ------------------------------------------------------------------

@pytest.mark.integration
def test_lightning_checkpoint_and_test_validate_in_a_fresh_trainer(tmp_path):
    pytest.importorskip("lightning.pytorch", reason="lightning is not installed (pip install -e '.[test]')")
    import lightning_cases as cases
    from lightning.pytorch.callbacks import ModelCheckpoint

    from triton_ema.integrations.lightning import EMACallback

    class Aliased(cases.Regressor):  # the last layer under a second name: state_dict has it twice, tied
        def __init__(self, seed=0):
            super().__init__(seed)
            self.head = self.net[2]

    callback, reference = EMACallback(cases.MOMENTUM), cases.Reference()
    saver = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    module, val = Aliased(), cases.loader(16, seed=1)
    cases.trainer([callback, reference, saver], 2, enable_checkpointing=True).fit(module, cases.loader(), val)
    ckpt = tmp_path / "epoch=1.ckpt"
    weights = load_ema_weights(ckpt)
    assert bitwise(weights, callback.ema.ema_state_dict())  # head.* too: the EMA, as the tied net.2.* has
    Aliased(seed=5).load_state_dict(weights, strict=True)

    rows = list(val)
    expected = regression_loss(reference.ema, torch.cat([x for x, _ in rows]), torch.cat([y for _, y in rows]))
    training = torch.load(ckpt, weights_only=True)["state_dict"]
    for run, key in (("test", "test_loss"), ("validate", "val_loss")):
        fresh, trainer = Aliased(seed=5), cases.trainer([EMACallback(cases.MOMENTUM)], 2)  # neither ever fitted
        (result,) = getattr(trainer, run)(fresh, val, ckpt_path=str(ckpt), verbose=False)
        assert result[key] == pytest.approx(expected, rel=1e-5), run
        assert bitwise(fresh.state_dict(), training)  # the checkpoint's training weights back after
    with pytest.raises(RuntimeError, match="there is no EMA to validate on"):  # that checkpoint's EMA was the run's
        trainer.validate(fresh, val, verbose=False)


@pytest.mark.integration
def test_trainer_checkpoint_folder_and_its_optimizer_file(tmp_path):
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    import hf_cases as cases

    from triton_ema.integrations.transformers import EMATrainer

    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, num_train_epochs=1, learning_rate=0.1, optim="sgd",
        lr_scheduler_type="constant", eval_strategy="no", save_strategy="epoch", logging_strategy="no",
        report_to="none", use_cpu=True, seed=0, disable_tqdm=True)
    trainer = EMATrainer(model=cases.Regressor(), args=args, train_dataset=cases.dataset(16, 0),
                         ema_momentum=cases.MOMENTUM)
    trainer.train()
    folder = tmp_path / "checkpoint-4"
    ema = trainer.ema.ema_state_dict()
    weights = load_ema_weights(folder)  # optimizer.pt's EMA, model.safetensors for the rest
    assert bitwise(weights, ema)
    assert bitwise(load_ema_weights(folder / "optimizer.pt"), ema)  # everything is averaged here
    cases.Regressor(seed=5).load_state_dict(weights, strict=True)


@pytest.mark.integration
def test_accelerate_save_state_folder(tmp_path):
    accelerate = pytest.importorskip("accelerate", reason="accelerate is not installed")
    import hf_cases as cases
    from torch.utils.data import DataLoader

    accelerator = accelerate.Accelerator(cpu=True)
    model = cases.Regressor()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ema = attach(optimizer, cases.MOMENTUM, model=model)
    loader = DataLoader(cases.dataset(16, 0), batch_size=4)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    for batch in loader:
        accelerator.backward(model(**batch)["loss"])
        optimizer.step()
        optimizer.zero_grad()
    accelerator.save_state(str(tmp_path / "state"))
    assert (tmp_path / "state" / "optimizer.bin").is_file()
    weights = load_ema_weights(tmp_path / "state")
    assert ema.num_steps == 4 and bitwise(weights, ema.ema_state_dict())
    cases.Regressor(seed=5).load_state_dict(weights, strict=True)


@pytest.mark.integration
def test_mmengine_checkpoint_is_refused_unless_trusted(tmp_path):
    pytest.importorskip("mmengine", reason="mmengine is not installed")
    import mmengine_cases as cases

    from triton_ema.integrations.mmengine import TritonEMAHook

    hook = TritonEMAHook(momentum=0.3)
    runner = cases.runner(tmp_path, [hook], 1)
    runner.train()
    ckpt = tmp_path / "epoch_1.pth"
    with pytest.raises(pickle.UnpicklingError, match="HistoryBuffer.*weights_only=False"):
        load_ema_weights(ckpt)  # mmengine's message_hub: numpy arrays inside logging objects
    weights = load_ema_weights(ckpt, weights_only=False)
    assert bitwise(weights, hook.ema.ema_state_dict())
    cases.Regressor(seed=5).load_state_dict(weights, strict=True)


def test_float64_reference_of_a_short_run():
    """The weights read back are the EMA of the steps taken, against a float64 reference."""
    torch.manual_seed(0)
    net = regression_net()
    opt = EMAOptimizer(torch.optim.SGD(net.parameters(), lr=0.1), momentum=0.3, model=net)
    ema = [p.detach().double().clone() for p in net.parameters()]
    x, y = regression_data(8, 0)
    for _ in range(3):
        (net(x) - y).square().mean().backward()
        opt.step()
        opt.zero_grad()
        ema = [s + 0.3 * (p.detach().double() - s) for s, p in zip(ema, net.parameters())]
    weights = load_ema_weights(opt.state_dict())
    for (name, _), expected in zip(net.named_parameters(), ema):
        assert_ulps(weights[name], expected, scale=expected.abs().max().expand_as(expected), ulps=16)
