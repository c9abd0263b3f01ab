"""``python -m triton_ema.demo --posthoc``: choose the EMA length after training.

The demo's training, with power-function profiles (``--profiles``) in place of
the cosine EMA: :class:`Snapshots` writes every profile's EMA to OUT/snapshots
every ``--snapshot-every`` steps, and :func:`finish` then synthesizes each
sigma_rel of ``--sweep`` from them in one pass (:func:`triton_ema.posthoc.synthesize`)
and scores it on the held-out split, beside the tracked profiles' own EMA and
the training weights.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from torch import nn

from . import EMAOptimizer, posthoc
from .demo_common import CHECKPOINT, Data, DigitsNet, evaluate, two_panel_figure

SNAPSHOTS = "snapshots"
PLOT = "posthoc.png"


class Snapshots:
    """``after_step`` for :func:`triton_ema.demo.train_epoch`: a snapshot every ``every`` steps."""

    def __init__(self, opt: EMAOptimizer, out: Path, every: int, fresh: bool) -> None:
        self.opt, self.every, self.folder = opt, every, out / SNAPSHOTS
        if fresh:  # an earlier run's snapshots here would be refused beside this run's
            for old in self.folder.glob(f"{posthoc.PREFIX}*{posthoc.SUFFIX}"):
                old.unlink()

    def __call__(self) -> None:
        if self.opt.num_steps % self.every == 0:
            posthoc.save_snapshot(self.opt, self.folder)

    def last(self) -> None:
        """A snapshot at the current step if there is none: the time the sweep is synthesized at."""
        if self.opt.num_steps % self.every:
            posthoc.save_snapshot(self.opt, self.folder)


def finish(args: argparse.Namespace, model: nn.Module, opt: EMAOptimizer, data: Data, history: list[dict],
           snapshots: Snapshots) -> dict:
    """Synthesize and score the sweep, print its table, plot it; returns the demo's
    results with ``sweep`` (one row per sigma_rel) and ``states`` (sigma_rel -> the
    synthesized state dict); stopped before ``--epochs``, only the history."""
    if history[-1]["epoch"] < args.epochs:
        print(f"stopped after epoch {history[-1]['epoch']}: continue with --posthoc --resume for the rest and the sweep")
        return {"history": history, "model": model, "optimizer": opt, "data": data}
    snapshots.last()
    sigma_rels = sorted(set(args.sweep) | set(args.profiles))
    states = dict(zip(sigma_rels, posthoc.synthesize(snapshots.folder, sigma_rel=sigma_rels)))
    probe = DigitsNet().to(args.device)
    tracked = {f"{s:g}" for s in args.profiles}
    final = history[-1]
    sweep = []
    for sigma_rel, state in states.items():
        probe.load_state_dict(state)
        acc, loss = evaluate(probe, data.x_test, data.y_test)
        name = f"{sigma_rel:g}"
        own = (final[f"{name}_acc"], final[f"{name}_loss"]) if name in tracked else (None, None)
        sweep.append({"sigma_rel": sigma_rel, "acc": acc, "loss": loss, "tracked_acc": own[0],
                      "tracked_loss": own[1]})
    plot_path = args.out / PLOT
    plot(sweep, final, plot_path)
    count = len(list(snapshots.folder.glob(f"{posthoc.PREFIX}*{posthoc.SUFFIX}")))
    print(report(sweep, final, args, opt.num_steps, count))
    print(f"plot: {plot_path}\nsnapshots: {snapshots.folder}\n"
          f"checkpoint: {args.out / CHECKPOINT} (continue with --posthoc --resume --epochs N)")
    return {"history": history, "sweep": sweep, "states": states, "plot": plot_path,
            "checkpoint": args.out / CHECKPOINT, "snapshots": snapshots.folder, "model": model, "optimizer": opt,
            "data": data}


def report(sweep: list[dict], final: dict, args: argparse.Namespace, steps: int, count: int) -> str:
    profiles = ", ".join(f"{s:g}" for s in args.profiles)
    lines = [f"post-hoc EMA, {args.device}, lr {args.lr}: each sigma_rel synthesized at step {steps} from "
             f"{count} snapshots (every {args.snapshot_every} steps) of the profiles {profiles}",
             "held-out accuracy (%) and loss",
             "sigma_rel | synthesized: acc   loss | tracked profile: acc   loss",
             "----------+-------------------------+" + "-" * 28]
    for row in sweep:
        own = "" if row["tracked_acc"] is None else f"{row['tracked_acc']:20.2f} {row['tracked_loss']:6.4f}"
        lines.append(f"{row['sigma_rel']:9.3f} | {row['acc']:16.2f} {row['loss']:6.4f} | {own}".rstrip())
    best = min(sweep, key=lambda row: row["loss"])
    lines.append(f"training weights: acc {final['train_acc']:.2f}, loss {final['train_loss']:.4f}; lowest "
                 f"synthesized loss: sigma_rel {best['sigma_rel']:g}, acc {best['acc']:.2f}, loss {best['loss']:.4f}")
    return "\n".join(lines)


def plot(sweep: list[dict], final: dict, path: Path) -> None:
    sigma_rels = [row["sigma_rel"] for row in sweep]
    own = [row for row in sweep if row["tracked_acc"] is not None]
    with two_panel_figure("8x8 digits: EMA lengths synthesized from snapshots after training", path) as axes:
        for ax, key, label in ((axes[0], "acc", "held-out accuracy (%)"), (axes[1], "loss", "held-out cross-entropy")):
            ax.plot(sigma_rels, [row[key] for row in sweep], marker="o", label="synthesized after training")
            ax.scatter([row["sigma_rel"] for row in own], [row[f"tracked_{key}"] for row in own], s=120,
                       facecolors="none", edgecolors="C3", linewidths=2, label="tracked while training", zorder=3)
            ax.axhline(final[f"train_{key}"], color="C2", linestyle="--", label="training weights")
            ax.set(xlabel="sigma_rel (EMA width relative to the run)", ylabel=label)
