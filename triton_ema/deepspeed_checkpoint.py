"""The EMA in a DeepSpeed checkpoint folder, put together from every rank's partition.

Attached to an engine (:mod:`triton_ema.integrations.deepspeed`), the EMA of
each rank's fp32 master partition rides in that rank's optimizer-states file
(``<folder>/<tag>/*optim_states.pt``), inside the wrapped torch optimizer's
state dict: ``"ema"`` (the shadows, one per master tensor) and
``"ema_layout"`` (where every parameter lies in them). This module reads
those files without importing DeepSpeed and joins the partitions the way
DeepSpeed's ``zero_to_fp32`` joins the weights. It is also what the live
``ema_state_dict(full=True)`` uses once the partitions are gathered.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["read_deepspeed_ema", "assemble", "rank_ema"]

LAYOUT_FORMAT = 1
# Where the layout says a parameter lies, by how DeepSpeed partitions the master weights:
# "whole": master i is the parameter (stage 0); "flat": the concatenation of every rank's
# master i holds the parameter at [offset, offset + numel) (ZeRO 1/2, BF16_Optimizer);
# "sharded": every rank holds ceil(numel / world) elements of it at [offset, ...) of its
# master i, rank order, the last padded (ZeRO-3).
KINDS = ("whole", "flat", "sharded")


def assemble(layout: dict[str, Any], partitions: Sequence[Sequence[Tensor]]) -> dict[str, Tensor]:
    """Model-keyed full tensors from ``partitions[rank][i]`` (every rank's master tensors, or their EMA).

    Args:
        layout: The ``"ema_layout"`` entry a checkpoint holds (kind, world size,
            names, shapes, masters, offsets).
        partitions: For each rank, its master tensors (or their EMA), in order.

    Returns:
        A dict of whole tensors keyed by parameter name.

    Raises:
        ValueError: An unknown layout kind, or partitions that do not fit the layout.
    """
    kind, world = layout["kind"], int(layout["world_size"])
    if kind not in KINDS:
        raise ValueError(f"unknown DeepSpeed EMA layout kind {kind!r}; expected one of {KINDS}")
    if len(partitions) != world:
        raise ValueError(f"the layout is of {world} ranks, got the partitions of {len(partitions)}")
    out: dict[str, Tensor] = {}
    for name, shape, master, offset in zip(layout["names"], layout["shapes"], layout["masters"], layout["offsets"]):
        numel = math.prod(shape)
        if kind == "whole":
            value = partitions[0][master].reshape(-1)
        elif kind == "flat":
            value = torch.cat([p[master].reshape(-1) for p in partitions])[offset:offset + numel]
        else:
            part = math.ceil(numel / world)
            value = torch.cat([p[master].reshape(-1)[offset:offset + part] for p in partitions])[:numel]
        if value.numel() != numel:
            raise ValueError(f"the EMA partitions hold {value.numel()} elements of {name}, which has {numel} "
                             f"(shape {tuple(shape)}): the files are of another layout")
        out[name] = value.reshape(shape).clone()
    return out


def local_pieces(layout: dict[str, Any], shadows: Sequence[Tensor], rank: int) -> dict[str, Tensor]:
    """This rank's pieces of every parameter (1-d copies) in its master tensors ``shadows``, by name: what
    ``ema_state_dict(full=False)`` gives on a rank of a ZeRO 1-3 engine."""
    out, world = {}, int(layout["world_size"])
    for name, shape, master, offset in zip(*(layout[k] for k in ("names", "shapes", "masters", "offsets"))):
        numel, size = math.prod(shape), shadows[master].numel()
        if layout["kind"] == "sharded":
            part = math.ceil(numel / world)
            out[name] = shadows[master][offset:offset + part].clone()
            continue
        start, end = max(offset - rank * size, 0), min(offset + numel - rank * size, size)
        if start < end:
            out[name] = shadows[master][start:end].clone()
    return out


def layout_mismatch(key: str, saved: Any, ours: Any) -> str:
    """Why a checkpoint's EMA layout entry ``key`` (``saved``) cannot be loaded where it is ``ours``."""
    if key == "world_size":
        return (f"the checkpoint's EMA was saved on {saved} ranks, this engine runs on {ours}: the EMA of the "
                "master partitions resumes only on the number of ranks it was saved with (DeepSpeed's universal "
                "checkpoint does not carry it); export it with read_deepspeed_ema and start a new EMA from it")
    if saved is None:
        return "the checkpoint has an 'ema' entry but no 'ema_layout': it was not saved by this DeepSpeed adaptor"
    return (f"the checkpoint's EMA layout differs in {key!r} (saved {str(saved)[:80]}, here {str(ours)[:80]}): a "
            "checkpoint of another model or ZeRO configuration")


def read_deepspeed_ema(folder: str | os.PathLike, *, tag: str | None = None, profile: str | None = None,
                       trusted: bool = False) -> dict[str, Tensor]:
    """The EMA saved in a DeepSpeed checkpoint folder, keyed like the unwrapped model's parameters.

    ``folder`` is what ``engine.save_checkpoint(folder)`` wrote to; ``tag`` the
    checkpoint's tag (default: the one named in ``folder/latest``). Every rank's
    optimizer-states file is read and the partitions are joined (float32, the
    dtype of the EMA of the master weights). With several EMA profiles, name one.

    DeepSpeed pickles some objects of its own (its loss scaler, enums) in those
    files; they are read as inert placeholders, so the load keeps
    ``weights_only=True`` and runs no code from the file. A file holding
    anything else is refused; ``trusted=True`` then loads it with
    ``weights_only=False`` (only for a file you trust: that runs its pickled code).

    Args:
        folder: The folder ``engine.save_checkpoint`` wrote to.
        tag: The checkpoint's tag; None: the one ``folder/latest`` names.
        profile: The EMA profile, where there are several.
        trusted: Load files holding more than tensors and DeepSpeed's own
            objects with ``weights_only=False``.

    Returns:
        A float32 dict keyed like the unwrapped model's parameters.

    Raises:
        ValueError: A rank's file missing, layouts of different runs, a missing
            or unknown profile.
    """
    files = optim_files(folder, tag)
    entries = [_ema_entry(path, trusted) for path in files]
    layout = entries[0][1]
    ranks: list[Any] = [e[1].get("rank") for e in entries]  # as the files say: checked to be 0, 1, ... next
    if len(entries) != int(layout["world_size"]) or sorted(ranks) != list(range(len(entries))):
        raise ValueError(f"{os.fspath(folder)!r} holds the EMA of ranks {ranks}; the layout is of "
                         f"{layout['world_size']} ranks (a file is missing or of another run)")
    shadows: list[list[Tensor]] = [[] for _ in entries]  # by rank: each filled once, the ranks being 0, 1, ...
    for (ema, entry_layout), rank in zip(entries, ranks):
        if {k: v for k, v in entry_layout.items() if k != "rank"} != {k: v for k, v in layout.items() if k != "rank"}:
            raise ValueError(f"rank {rank}'s EMA layout differs from rank {ranks[0]}'s: the files are of different runs")
        shadows[rank] = _profile_shadows(ema, profile)
    return assemble(layout, shadows)


def rank_ema(folder: str | os.PathLike, tag: str | None, rank: int, *, trusted: bool = False) -> tuple[dict, dict]:
    """The ``"ema"`` and ``"ema_layout"`` entries that one rank saved in a checkpoint.

    Args:
        folder: What ``engine.save_checkpoint(folder)`` wrote to.
        tag: The checkpoint's tag; None: the one named in ``folder/latest``.
        rank: The data-parallel rank.
        trusted: As for :func:`read_deepspeed_ema`.

    Raises:
        FileNotFoundError: No such tag, or no file of that rank.
        ValueError: The file holds no EMA, or the EMA of another rank.
    """
    files = optim_files(folder, tag)
    numbered = [f for f in files if re.search(rf"zero_pp_rank_{int(rank)}_", os.path.basename(f))]
    if len(files) == 1 and not re.search(r"zero_pp_rank_\d+_", os.path.basename(files[0])):
        numbered = files  # stage 0: one file for every rank
    if len(numbered) != 1:
        raise FileNotFoundError(f"{os.fspath(folder)!r} holds no optimizer-states file of rank {rank} "
                                f"({[os.path.basename(f) for f in files]})")
    ema, layout = _ema_entry(numbered[0], trusted)
    if layout.get("rank") != rank:
        raise ValueError(f"{numbered[0]!r} holds the EMA of rank {layout.get('rank')}, not of rank {rank}")
    return ema, layout


def optim_files(folder: str | os.PathLike, tag: str | None) -> list[str]:
    """Every rank's optimizer-states file of checkpoint ``tag`` in ``folder``."""
    folder = os.fspath(folder)
    if tag is None:
        latest = os.path.join(folder, "latest")
        if not os.path.isfile(latest):
            raise FileNotFoundError(f"{folder!r} has no 'latest' file naming its checkpoint: pass tag=")
        with open(latest) as f:
            tag = f.read().strip()
    path = os.path.join(folder, str(tag))
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no checkpoint {tag!r} in {folder!r}")
    # zero_pp_rank_<r>_mp_rank_<m>_optim_states.pt (ZeRO) or mp_rank_<m>_model_states.pt (stage 0: one file).
    names = sorted(n for n in os.listdir(path) if n.endswith("optim_states.pt"))
    if not names:
        names = sorted(n for n in os.listdir(path) if re.fullmatch(r"mp_rank_\d+_model_states\.pt", n))
    if not names:
        raise FileNotFoundError(f"{path!r} holds no DeepSpeed optimizer-states file")
    return [os.path.join(path, n) for n in names]


class _Placeholder:
    """Stands in for a DeepSpeed object pickled in a checkpoint (a loss scaler, an enum): holds nothing, runs nothing."""

    def __new__(cls, *args: Any, **kwargs: Any) -> _Placeholder:
        return object.__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass


# DeepSpeed's classes that its ZeRO optimizers pickle into the optimizer-states files.
_DEEPSPEED_GLOBALS = ("deepspeed.runtime.fp16.loss_scaler.LossScaler",
                      "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
                      "deepspeed.runtime.zero.config.ZeroStageEnum",
                      "deepspeed.utils.tensor_fragment.fragment_address")


def _load(path: str, trusted: bool) -> Any:
    if trusted:
        return torch.load(path, map_location="cpu", weights_only=False)
    placeholders: list[Callable[..., Any] | tuple[Callable[..., Any], str]] = [
        (type(name.rsplit(".", 1)[1], (_Placeholder,), {}), name) for name in _DEEPSPEED_GLOBALS]
    try:
        with torch.serialization.safe_globals(placeholders):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, or RuntimeError around it
        raise ValueError(f"{path!r} holds objects that a weights_only load refuses ({str(e).splitlines()[0]}); "
                         "if you trust this file, read it with trusted=True") from e


def _ema_entry(path: str, trusted: bool) -> tuple[dict, dict]:
    """The ``"ema"`` and ``"ema_layout"`` entries of one rank's file."""
    sd = _load(path, trusted)
    found = _find_layout(sd)
    if found is None:
        raise ValueError(f"{path!r} holds no EMA (no 'ema_layout' in its optimizer state): it was saved without "
                         "triton_ema.integrations.deepspeed.attach")
    if found.get("ema") is None:
        raise ValueError(f"{path!r} has an 'ema_layout' but no 'ema' entry")
    layout = found["ema_layout"]
    if layout.get("format") != LAYOUT_FORMAT:
        raise ValueError(f"{path!r} has an EMA layout of format {layout.get('format')!r}; this reader knows {LAYOUT_FORMAT}")
    return found["ema"], layout


def _find_layout(value: Any, depth: int = 0) -> dict | None:
    """The optimizer state dict holding ``"ema_layout"``, wherever DeepSpeed nests it."""
    if not isinstance(value, dict) or depth > 4:
        return None
    if "ema_layout" in value:
        return value
    for v in value.values():
        found = _find_layout(v, depth + 1)
        if found is not None:
            return found
    return None


def _profile_shadows(ema: dict, profile: str | None) -> list[Tensor]:
    """One profile's shadows, in master order."""
    if "profiles" in ema:
        names = list(ema["profiles"])
        if profile is None:
            raise ValueError(f"the checkpoint's EMA has several profiles {names}: pass profile=")
        if profile not in ema["profiles"]:
            raise ValueError(f"no EMA profile named {profile!r} in the checkpoint; it has {names}")
        ema = ema["profiles"][profile]
    elif profile is not None:
        raise ValueError(f"the checkpoint's EMA has one unnamed profile; got profile={profile!r}")
    shadow = ema["shadow"]
    return [shadow[i] for i in sorted(shadow)]
