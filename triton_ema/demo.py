"""What EMA buys, in one command: ``python -m triton_ema.demo``.

Trains a small CNN on scikit-learn's 8x8 handwritten digits (shipped with
the package, no download) with AdamW at a deliberately noisy learning rate,
keeps an EMA of the weights with :class:`EMAOptimizer`, and evaluates the
training weights and the EMA weights on a held-out split after every epoch.
With ``--posthoc`` it tracks power-function profiles instead, snapshots them
while training and afterwards synthesizes a sweep of EMA lengths
(:mod:`triton_ema.demo_posthoc`). Needs the ``demo`` extra: scikit-learn, tqdm,
matplotlib.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import EMAOptimizer, schedules
from .demo_common import CHECKPOINT, Data, DigitsNet, evaluate, load_data, two_panel_figure

PLOT = "demo.png"
# What a run is: saved in its checkpoint, and --resume continues with these, whatever the command line says
# (schedule_epochs: the cosine's length, the --epochs of the run's first command).
RUN_SETTINGS = ("lr", "batch_size", "momentum", "end_momentum", "warm_up", "seed", "max_batches", "posthoc",
                "profiles", "snapshot_every", "schedule_epochs")
NOT_POSTHOC, ONLY_POSTHOC = ("momentum", "end_momentum", "warm_up", "schedule_epochs"), ("profiles", "snapshot_every")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m triton_ema.demo", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--epochs", type=int, default=15, help="epochs to train (with --resume: the total, by default the "
                   "run's own; the cosine keeps the run's first length)")
    p.add_argument("--lr", type=float, default=0.05, help="AdamW learning rate (deliberately noisy)")
    p.add_argument("--batch-size", type=int, default=16, help="examples per step")
    p.add_argument("--momentum", type=float, default=0.02, help="EMA momentum at the start of the cosine")
    p.add_argument("--end-momentum", type=float, default=0.005, help="EMA momentum at the end of the cosine")
    p.add_argument("--warm-up", choices=("power", "none"), default="power",
                   help="power: the momentum is at least 1 / (1 + t) at step t (the power warm-up of timm and "
                        "ema-pytorch with power=1): the EMA averages all weights so far, forgetting the random "
                        "initial ones, until the cosine's window is shorter; none: the cosine alone")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, default=argparse.SUPPRESS,
                   help="folder for the checkpoint and the plot (default: runs/demo, with --posthoc runs/demo-posthoc)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data split, the model and the batches")
    p.add_argument("--resume", action="store_true", help=f"continue from OUT/{CHECKPOINT}, with its run's settings "
                   "(an option given that differs from them is an error)")
    p.add_argument("--stop-after", type=int, default=None, metavar="EPOCH",
                   help="stop after this epoch as if interrupted (then continue with --resume)")
    p.add_argument("--max-batches", type=int, default=None, help="batches per epoch (for quick checks)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    post = p.add_argument_group("post-hoc EMA", "choose the EMA length after training (EDM2); "
                                "--momentum, --end-momentum and --warm-up do not apply")
    post.add_argument("--posthoc", action="store_true",
                      help="track power-function profiles, snapshot them into OUT/snapshots, and after training "
                           "synthesize and evaluate a sweep of sigma_rel")
    post.add_argument("--profiles", type=float, nargs="+", default=[0.05, 0.10], metavar="SIGMA_REL",
                      help="the profiles tracked while training")
    post.add_argument("--snapshot-every", type=int, default=50, metavar="STEPS",
                      help="steps between snapshots (and one at the last step)")
    post.add_argument("--sweep", type=float, nargs="+", default=[0.01, 0.02, 0.03, 0.05, 0.07, 0.10, 0.15, 0.20, 0.25],
                      metavar="SIGMA_REL", help="the sigma_rel synthesized after training (with the profiles')")
    args = p.parse_args(argv)
    if args.epochs < 1 or args.batch_size < 1 or args.lr <= 0 or args.snapshot_every < 1:
        p.error("--epochs, --batch-size and --snapshot-every must be >= 1 and --lr > 0")
    for value in args.profiles + args.sweep:
        try:
            schedules.PowerFunction(sigma_rel=value)
        except ValueError as err:
            p.error(f"--profiles and --sweep: {err}")
    if "out" not in vars(args):
        args.out = Path("runs/demo-posthoc" if args.posthoc else "runs/demo")
    args.schedule_epochs = args.epochs  # the cosine's length; a resumed run keeps its checkpoint's
    unset = object()  # parsed again into a namespace that has every option already: only those given change
    again = vars(p.parse_args(argv, argparse.Namespace(**{k: unset for k in vars(args)})))
    args.given = {k for k, v in again.items() if v is not unset}  # the options on the command line
    return args


def applying(posthoc: bool) -> list[str]:
    """The run settings that a run with or without ``--posthoc`` uses."""
    return [name for name in RUN_SETTINGS if name not in (NOT_POSTHOC if posthoc else ONLY_POSTHOC)]


def options(args, names) -> str:
    """The settings ``names`` of ``args`` as the command line writes them."""
    out = []
    for name in names:
        value, flag = getattr(args, name), "--" + name.replace("_", "-")
        if isinstance(value, bool):
            out.append(flag if value else f"no {flag}")
        elif value is not None and name != "schedule_epochs":
            out.append(f"{flag} {' '.join(f'{v:g}' for v in value) if isinstance(value, list) else value}")
    return " ".join(out)


def resumed_args(args: argparse.Namespace, ckpt: dict) -> argparse.Namespace:
    """``args`` with the checkpoint's run settings; an error naming every option given that they override."""
    saved = ckpt.get("settings")
    if saved is None:
        raise SystemExit(f"--resume: {args.out / CHECKPOINT} does not record its run's settings (an older demo's "
                         "checkpoint); start a new run without --resume")
    clashes = [name for name in applying(saved["posthoc"]) if name in args.given and getattr(args, name) != saved[name]]
    if clashes:
        given, theirs = options(args, clashes), options(argparse.Namespace(**saved), clashes)
        verb = "differs" if len(clashes) == 1 else "differ"
        raise SystemExit(f"--resume continues the run in {args.out / CHECKPOINT} with its own settings: {given} "
                         f"{verb} from the checkpoint's ({theirs}); leave them out, or start a new run without "
                         "--resume (or with another --out)")
    done = ckpt["epoch"]
    if "epochs" in args.given and args.epochs < done:
        raise SystemExit(f"--resume --epochs {args.epochs}: the checkpoint is after epoch {done} already; pass "
                         f"--epochs {done} or more (the total to train), or leave it out to finish its run's "
                         f"{ckpt['epochs']}")
    vars(args).update(saved)
    if "epochs" not in args.given:
        args.epochs = ckpt["epochs"]
    return args


def build(args: argparse.Namespace, data: Data) -> tuple[nn.Module, EMAOptimizer]:
    torch.manual_seed(args.seed)
    model = DigitsNet().to(args.device)
    batches = math.ceil(len(data.y_train) / args.batch_size)
    if args.max_batches:
        batches = min(batches, args.max_batches)
    if args.posthoc:
        profiles = {f"{s:g}": schedules.PowerFunction(sigma_rel=s) for s in args.profiles}
        return model, EMAOptimizer(torch.optim.AdamW(model.parameters(), lr=args.lr), momentum=profiles,
                                   model=model, update_buffers=True)
    schedule: schedules.Schedule = schedules.Cosine(args.momentum, args.end_momentum,
                                                    total_steps=args.schedule_epochs * batches)
    if args.warm_up == "power":
        schedule = schedules.Max(schedule, schedules.Power(decay=1 - args.end_momentum, power=1.0))
    opt = EMAOptimizer(torch.optim.AdamW(model.parameters(), lr=args.lr), momentum=schedule, model=model,
                       update_buffers=True)
    return model, opt


def train_epoch(model: nn.Module, opt: EMAOptimizer, data: Data, args: argparse.Namespace,
                shuffle: torch.Generator, after_step: Callable[[], object] | None = None) -> None:
    """One pass over the shuffled training split (at most ``--max-batches`` batches);
    ``after_step()`` after every step."""
    order = torch.randperm(len(data.y_train), generator=shuffle).to(args.device)
    model.train()
    for idx in order.split(args.batch_size)[: args.max_batches]:
        loss = F.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
        loss.backward()
        opt.step()
        opt.zero_grad()
        if after_step is not None:
            after_step()


def scores(model: nn.Module, opt: EMAOptimizer, data: Data) -> dict[str, float]:
    """Held-out accuracy and loss of the training weights and of each EMA profile
    (``ema_acc``, ``ema_loss`` with one; ``<name>_acc``, ``<name>_loss`` with several)."""
    row = dict(zip(("train_acc", "train_loss"), evaluate(model, data.x_test, data.y_test)))
    names = list(opt.schedule) if isinstance(opt.schedule, dict) else [None]
    for name in names:
        with opt.swap_ema(name):
            row[f"{name or 'ema'}_acc"], row[f"{name or 'ema'}_loss"] = evaluate(model, data.x_test, data.y_test)
    return row


def run(argv: list[str] | None = None) -> dict:
    """Train, evaluate, plot; returns the history (one row per epoch) and paths
    (with ``--posthoc`` also the sweep, see :func:`triton_ema.demo_posthoc.finish`)."""
    from tqdm.auto import tqdm

    args = parse_args(argv)
    args.device = torch.device(args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    ckpt_path = args.out / CHECKPOINT
    if args.resume:
        if not ckpt_path.exists():
            raise SystemExit(f"--resume: no checkpoint at {ckpt_path}; run without --resume first (or set --out)")
        ckpt = torch.load(ckpt_path, map_location=args.device, weights_only=True)
        args = resumed_args(args, ckpt)
    data = load_data(args.device, args.seed)
    model, opt = build(args, data)
    shuffle = torch.Generator().manual_seed(args.seed + 1)
    history, start = [], 0
    if args.resume:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        shuffle.set_state(ckpt["shuffle"])
        history, start = ckpt["history"], ckpt["epoch"]
        args.lr = opt.param_groups[0]["lr"]  # what the optimizer really steps with
        print(f"resumed from {ckpt_path} after epoch {start} of {args.epochs}, with its settings: "
              f"{options(args, [name for name in applying(args.posthoc) if name != 'posthoc' or args.posthoc])}")
    snapshots = None
    if args.posthoc:
        from . import demo_posthoc

        snapshots = demo_posthoc.Snapshots(opt, args.out, args.snapshot_every, fresh=not args.resume)

    stop = args.epochs if args.stop_after is None else min(args.stop_after, args.epochs)
    bar = tqdm(total=stop - start, desc="epochs", unit="epoch", disable=args.quiet)
    for epoch in range(start, stop):
        train_epoch(model, opt, data, args, shuffle, snapshots)
        row = {"epoch": epoch + 1, **scores(model, opt, data)}
        if not args.posthoc:
            row["momentum"] = opt.schedule(opt.num_steps - 1)
        history.append(row)
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "shuffle": shuffle.get_state(),
                    "history": history, "epoch": epoch + 1, "epochs": args.epochs,
                    "settings": {name: getattr(args, name) for name in RUN_SETTINGS}}, ckpt_path)
        bar.set_postfix({k.removesuffix("_acc"): f"{v:.1f}" for k, v in row.items() if k.endswith("_acc")})
        bar.update()
    bar.close()
    if snapshots is not None:  # --posthoc
        return demo_posthoc.finish(args, model, opt, data, history, snapshots)

    plot_path = args.out / PLOT
    plot(history, plot_path)
    print(report(history, args))
    print(f"plot: {plot_path}\ncheckpoint: {ckpt_path} (continue with --resume --epochs N)")
    return {"history": history, "plot": plot_path, "checkpoint": ckpt_path, "model": model, "optimizer": opt,
            "data": data}


def report(history: list[dict], args: argparse.Namespace) -> str:
    length = "" if args.schedule_epochs == args.epochs else f" over {args.schedule_epochs} epochs"
    lines = [f"held-out accuracy (%) and loss, {args.device}, lr {args.lr:g}, EMA momentum "
             f"{args.momentum:g} -> {args.end_momentum:g} (cosine{length}, warm-up: {args.warm_up})",
             "epoch | train weights: acc  loss  | EMA weights: acc  loss | EMA momentum",
             "------+---------------------------+------------------------+-------------"]
    for h in history:
        lines.append(f"{h['epoch']:5d} | {h['train_acc']:19.2f} {h['train_loss']:6.4f} | "
                     f"{h['ema_acc']:16.2f} {h['ema_loss']:6.4f} | {h['momentum']:12.4f}")
    last = history[-1]
    tail = history[len(history) // 2:]
    mean = {k: sum(h[k] for h in tail) / len(tail) for k in ("train_acc", "ema_acc", "train_loss", "ema_loss")}
    lines.append(f"final: EMA {last['ema_acc'] - last['train_acc']:+.2f} accuracy points, "
                 f"loss {last['ema_loss'] - last['train_loss']:+.4f}; second half of the run on average: "
                 f"{mean['ema_acc'] - mean['train_acc']:+.2f} points, loss {mean['ema_loss'] - mean['train_loss']:+.4f}")
    gain = (mean["train_loss"] - mean["ema_loss"]) / mean["train_loss"]
    if gain > 0.05:
        lines.append(f"EMA helped: {gain:.0%} lower held-out loss over the second half; its weights are less noisy.")
    elif gain > -0.05:
        lines.append("EMA made no clear difference at this setting (within 5% of held-out loss); it pays off "
                     "when the training weights are noisy (higher learning rate, smaller batches).")
    else:
        lines.append(f"EMA did not help at this setting: {-gain:.0%} higher held-out loss than the training weights "
                     "(a momentum too small for this run length lags behind).")
    return "\n".join(lines)


def plot(history: list[dict], path: Path) -> None:
    epochs = [h["epoch"] for h in history]
    with two_panel_figure("8x8 digits, AdamW at a noisy learning rate: training vs EMA weights", path) as (acc, loss):
        for key, label in (("train", "training weights"), ("ema", "EMA weights")):
            acc.plot(epochs, [h[f"{key}_acc"] for h in history], marker="o", label=label)
            loss.plot(epochs, [h[f"{key}_loss"] for h in history], marker="o", label=label)
        acc.set(xlabel="epoch", ylabel="held-out accuracy (%)", title="Accuracy")
        loss.set(xlabel="epoch", ylabel="held-out cross-entropy", title="Loss")


def main(argv: list[str] | None = None) -> int:
    run(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
