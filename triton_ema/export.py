"""Write a checkpoint's EMA weights as a file a model loads:

    python -m triton_ema.export CHECKPOINT OUT [--profile NAME] [--format safetensors|torch]

The weights are :func:`triton_ema.load_ema_weights`'s; the format follows OUT's
suffix (``.safetensors``, or ``.pt`` / ``.pth`` / ``.bin`` for ``torch.save``)
unless ``--format`` names it. Safetensors is the format transformers and
diffusers load (the ``export`` extra)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor

from .weights import load_ema_weights

__all__ = ["export", "main", "save_weights"]

SUFFIXES = {".safetensors": "safetensors", ".pt": "torch", ".pth": "torch", ".bin": "torch"}


def export(checkpoint: str | os.PathLike, out: str | os.PathLike, *, profile: str | None = None,
           format: str | None = None, weights_only: bool = True) -> dict[str, Tensor]:
    """Write the EMA weights of ``checkpoint`` to ``out``; returns them.

    Args:
        checkpoint: Any checkpoint :func:`~triton_ema.load_ema_weights` reads.
        out: The file to write.
        profile: The EMA profile, where the checkpoint has several.
        format: ``"safetensors"`` or ``"torch"``; None: from ``out``'s suffix
            (``.safetensors``, or ``.pt`` / ``.pth`` / ``.bin``).
        weights_only: As for :func:`~triton_ema.load_ema_weights`.

    Returns:
        The weights written, keyed like the unwrapped model's ``state_dict()``.

    Raises:
        ValueError: A suffix that names no format, or what
            :func:`~triton_ema.load_ema_weights` raises.
    """
    fmt = output_format(Path(out), format)  # before reading a checkpoint that may be large
    weights = load_ema_weights(checkpoint, profile=profile, weights_only=weights_only)
    save_weights(weights, out, fmt)
    return weights


def output_format(out: Path, format: str | None) -> str:
    if format is not None:
        if format not in ("safetensors", "torch"):
            raise ValueError(f"format must be 'safetensors' or 'torch', got {format!r}")
        return format
    if out.suffix not in SUFFIXES:
        raise ValueError(f"cannot tell the format from {out.name!r}: name it .safetensors, .pt, .pth or .bin, or "
                         "pass --format safetensors|torch")
    return SUFFIXES[out.suffix]


def save_weights(weights: Mapping[str, Tensor], out: str | os.PathLike, format: str) -> None:
    """``weights`` as one file: safetensors (contiguous tensors, none sharing memory, as it requires) or torch.

    Args:
        weights: Tensors keyed by name.
        out: The file to write.
        format: ``"safetensors"`` (needs the ``export`` extra) or ``"torch"``.
    """
    tensors = {}
    seen = set()
    for key, value in weights.items():
        t = value.detach().cpu()
        storage = t.untyped_storage().data_ptr()
        if storage in seen or not t.is_contiguous() or t.untyped_storage().nbytes() != t.nbytes:
            t = t.contiguous().clone()  # a file of its own for every tensor, never a larger shared storage
        seen.add(t.untyped_storage().data_ptr())
        tensors[key] = t
    if format == "torch":
        torch.save(tensors, out)
        return
    try:
        from safetensors.torch import save_file
    except ImportError as error:
        raise ImportError("writing safetensors needs the safetensors package: the export extra (in a clone, "
                          "pip install -c constraints.txt -e '.[export]'), or write a torch file: --format torch") from error
    save_file(tensors, str(out), metadata={"format": "pt"})  # the metadata transformers checks


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m triton_ema.export CHECKPOINT OUT [--profile NAME] [--format F] [--no-weights-only]``.

    Args:
        argv: The command's arguments; None: ``sys.argv[1:]``.

    Returns:
        The exit status: 0, or 1 with the error printed to stderr.
    """
    parser = argparse.ArgumentParser(prog="python -m triton_ema.export", description=(
        "Write the EMA weights of a checkpoint (an optimizer state dict, a Lightning, mmengine, transformers "
        "Trainer or accelerate checkpoint, a torch.distributed.checkpoint or DeepSpeed checkpoint folder) as "
        "safetensors or a torch file, "
        "keyed like the model's state_dict()."))
    parser.add_argument("checkpoint", help="the checkpoint file or folder")
    parser.add_argument("out", help="the file to write (.safetensors, .pt, .pth or .bin)")
    parser.add_argument("--profile", help="the EMA profile, where the checkpoint has several")
    parser.add_argument("--format", choices=("safetensors", "torch"), help="default: from OUT's suffix")
    parser.add_argument("--no-weights-only", dest="weights_only", action="store_false", help=(
        "read a checkpoint that needs full unpickling (torch.load(weights_only=False)); only for a checkpoint "
        "from a source you trust: unpickling can run any code the file holds"))
    args = parser.parse_args(argv)
    try:
        weights = export(args.checkpoint, args.out, profile=args.profile, format=args.format,
                         weights_only=args.weights_only)
    except Exception as error:  # a command line: the reason, not a traceback
        print(f"error: {type(error).__name__}: {error}", file=sys.stderr)
        return 1
    count = sum(t.numel() for t in weights.values())
    print(f"wrote {len(weights)} tensors ({count:,} elements) to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
