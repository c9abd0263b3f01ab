"""The EMA weights of a saved checkpoint, without the objects that trained it.

:func:`load_ema_weights` reads every checkpoint form this package writes: an
optimizer's ``state_dict()`` (a file or a dict; the transformers Trainer's
``optimizer.pt`` and accelerate's ``optimizer.bin`` are such files),
Lightning's ``.ckpt``, mmengine's checkpoints, ``torch.distributed.checkpoint``
folders (``dcp.save`` beside ``opt.ema_checkpoint``, Lightning's
``ModelParallelStrategy``), the Trainer's and accelerate's checkpoint
folders and DeepSpeed's ``save_checkpoint`` folders. Each form is one reader below: files and dicts by what the dict
holds (``DICT_FORMS``), folders by what they contain (``FOLDER_FORMS``).
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from torch import Tensor, nn

from .deepspeed_checkpoint import read_deepspeed_ema
from .keying import Candidate, Found, choose_profile, completed, is_ema_entry, keyed_weights, mapping_candidate
from .names import unwrapped
from .reading import DCPFolder, load_safetensors, load_torch_file

__all__ = ["FOLDER_FORMS", "folder_form", "load_ema_weights"]


def load_ema_weights(source: str | os.PathLike | Mapping[str, Any], *, profile: str | None = None,
                     model: nn.Module | None = None, weights_only: bool = True) -> dict[str, Tensor]:
    """The EMA of a checkpoint, keyed like the unwrapped model's ``state_dict()``.

    ``source`` is a checkpoint file or folder, or a checkpoint already loaded (a dict).
    ``profile`` names the EMA profile where the checkpoint has several. Where the
    checkpoint holds the model's weights (Lightning, mmengine, DCP, the Trainer's
    and accelerate's folders) or ``model`` is given, the result has every entry of
    the model's state dict, the EMA in the model's dtypes in place of the averaged
    ones (what ``opt.ema_state_dict()`` returned); from an optimizer's state dict
    alone it has the averaged tensors only, in the EMA's dtypes. ``model`` also
    names the shadows of a checkpoint saved without ``model=``, by position (an
    optimizer built as ``Optimizer(model.parameters())``). Names lose wrapper
    prefixes (``module.``, ``_orig_mod.``, ...). Every value is a tensor of its own.

    Files are read with ``torch.load(weights_only=True)``; one that needs more
    (any class beyond tensors and plain containers) is refused, unless
    ``weights_only=False`` is given for a checkpoint from a source you trust.

    Args:
        source: A checkpoint file or folder: ``torch.save(opt.state_dict())``, a
            Lightning ``.ckpt`` or ``ModelParallelStrategy`` folder, a transformers
            Trainer ``checkpoint-<step>/`` folder or its ``optimizer.pt``, an
            accelerate ``save_state`` folder or its ``optimizer.bin``, an mmengine
            checkpoint, a DCP folder written beside ``opt.ema_checkpoint``; or a
            checkpoint already loaded (a dict).
        profile: The EMA profile, where the checkpoint has several.
        model: The model, to fill the entries the checkpoint does not hold and to
            name the shadows of a checkpoint saved without ``model=``.
        weights_only: Read files with ``torch.load(weights_only=True)``; False
            only for a checkpoint from a source you trust (mmengine's always need
            it).

    Returns:
        A dict keyed like the unwrapped model's ``state_dict()``, every value a
        tensor of its own.

    Raises:
        FileNotFoundError: No checkpoint at ``source``.
        NotImplementedError: A folder form whose reader this install lacks.
        TypeError: ``source`` is neither a path nor a dict.
        ValueError: No EMA in the checkpoint, a folder of no known form, a
            missing or unknown profile, no parameter names and no ``model``, or
            a checkpoint that needs unpickling beyond tensors (the message names
            what it holds).
    """
    if isinstance(source, Mapping):
        found = from_dict(source, "the checkpoint")
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.is_dir():
            form = folder_form(path)
            if form is None:
                raise ValueError(f"{path} is a folder of no checkpoint form known here ({FORMS_KNOWN})")
            if form.read is None:
                raise NotImplementedError(f"{path} is {form.name}: reading its EMA is not available in this install")
            return form.read(path, profile=profile, model=model, weights_only=weights_only)
        if not path.exists():
            raise FileNotFoundError(f"no checkpoint at {path}")
        if path.suffix == ".safetensors":
            raise ValueError(f"{path} holds plain weights (safetensors), not a checkpoint with an EMA")
        found = from_dict(load_torch_file(path, weights_only), str(path))
    else:
        raise TypeError(f"source must be a path or a loaded checkpoint (a dict), got {type(source).__name__}")
    return keyed_weights(found, profile, model)


# --- checkpoints as dicts: what each form holds -------------------------------------------------

def from_dict(checkpoint: Any, where: str) -> Found:
    """The EMA entry of a loaded checkpoint of any form, and where the model's weights are in it."""
    if not isinstance(checkpoint, Mapping):
        raise TypeError(f"{where} is a {type(checkpoint).__name__}, not a checkpoint (a dict)")
    for recognise, read in DICT_FORMS:
        if recognise(checkpoint):
            return read(checkpoint, where)
    raise ValueError(f"{where} holds no EMA: its keys {sorted(map(str, checkpoint))[:8]} are of no checkpoint form "
                     f"known here ({FORMS_KNOWN}); was it saved with triton-ema's EMA?")


def _ema_entry(d: Mapping, where: str) -> Found:
    return Found(d, None, where, ())


def _optimizer_state(d: Mapping, where: str) -> Found:
    """``opt.state_dict()``: the base optimizer's keys and ``"ema"`` (the Trainer's optimizer.pt, accelerate's
    optimizer.bin); a bare optimizer's has no ``"ema"``."""
    if "ema" not in d:
        raise ValueError(f"{where} is an optimizer state dict without an EMA (no 'ema' entry: saved from an optimizer "
                         "without triton-ema, or by a framework that saves the optimizer its own way)")
    return Found(_checked_entry(d["ema"], f"{where}['ema']"), d.get("param_groups"), where, ())


def _lightning(d: Mapping, where: str) -> Found:
    """A Lightning checkpoint: the EMA in ``optimizer_states[i]["ema"]`` (``optimizer_<i>`` in a distributed
    checkpoint), the LightningModule's weights in ``state_dict``."""
    if "optimizer_states" in d:
        states = {f"['optimizer_states'][{i}]": s for i, s in enumerate(d["optimizer_states"] or [])}
    else:
        states = {f"['{k}']": d[k] for k in sorted(d) if str(k).startswith("optimizer_") and str(k)[10:].isdigit()}
    with_ema = {k: s for k, s in states.items() if isinstance(s, Mapping) and "ema" in s}
    if not with_ema:
        raise ValueError(f"{where} is a Lightning checkpoint without an EMA (saved without EMACallback, or with "
                         "save_weights_only=True)")
    if len(with_ema) > 1:
        raise ValueError(f"{where}: the optimizers {list(with_ema)} each have an EMA; pass the one you want, "
                         "e.g. load_ema_weights(checkpoint['optimizer_states'][0])")
    (key, state), = with_ema.items()
    model = d.get("state_dict")
    models = (mapping_candidate(model),) if isinstance(model, Mapping) else ()
    return Found(_checked_entry(state["ema"], f"{where}{key}['ema']"), state.get("param_groups"), where, models,
                 complete=bool(models))


def _mmengine(d: Mapping, where: str) -> Found:
    """An mmengine checkpoint of a run with ``TritonEMAHook``: the exact EMA in ``optimizer["ema"]``, the EMA
    weights (in the model's dtypes, with the entries not averaged) in ``state_dict``."""
    optimizer = d.get("optimizer")
    if not isinstance(optimizer, Mapping) or "ema" not in optimizer:
        raise ValueError(f"{where} is an mmengine checkpoint without triton-ema's EMA (saved without TritonEMAHook; "
                         "with mmengine's own EMAHook, its state_dict holds the EMA weights: use that)")
    model = d.get("state_dict")
    models = (mapping_candidate(model),) if isinstance(model, Mapping) else ()
    return Found(_checked_entry(optimizer["ema"], f"{where}['optimizer']['ema']"), optimizer.get("param_groups"),
                 where, models, complete=bool(models))


def _beside(d: Mapping, where: str) -> Found:
    """``{"ema": opt.ema_checkpoint, "model": ..., ...}`` as ``dcp.save`` was given it: the model's weights, if
    saved, are the entry that has every name the EMA has."""
    models = tuple(mapping_candidate(v) for k, v in d.items() if k != "ema" and _is_weights(v))
    return Found(_checked_entry(d["ema"], f"{where}['ema']"), None, where, models)


def _holds_optimizer(d: Mapping) -> bool:
    return any(_is_optimizer_state(v) for v in d.values())


def _is_optimizer_state(value: Any) -> bool:
    return isinstance(value, Mapping) and "state" in value and "param_groups" in value


def _inside(d: Mapping, where: str) -> Found:
    """A script's own checkpoint, e.g. ``{"model": model.state_dict(), "opt": opt.state_dict(), "epoch": ...}``:
    the EMA in the one optimizer state dict among its entries, the model's weights beside it."""
    with_ema = [k for k, v in d.items() if _is_optimizer_state(v) and "ema" in v]
    if len(with_ema) != 1:
        found = [k for k, v in d.items() if _is_optimizer_state(v)]
        raise ValueError(f"{where}: {len(with_ema)} of its optimizer state dicts {found} hold an EMA; pass the one "
                         "you want, e.g. load_ema_weights(checkpoint[key])" if with_ema else
                         f"{where}: its optimizer state dicts {found} hold no EMA (no 'ema' entry: saved from an "
                         "optimizer without triton-ema)")
    (key,) = with_ema
    models = tuple(mapping_candidate(v) for k, v in d.items() if k != key and _is_weights(v))
    return Found(_checked_entry(d[key]["ema"], f"{where}[{key!r}]['ema']"), d[key].get("param_groups"), where, models)


def _is_weights(value: Any) -> bool:
    return isinstance(value, Mapping) and bool(value) and all(isinstance(v, Tensor) for v in value.values())


def _checked_entry(entry: Any, where: str) -> Mapping:
    if not is_ema_entry(entry):
        raise ValueError(f"{where} is not the EMA entry triton-ema saves (a dict with 'step' and 'shadow' or "
                         f"'profiles'), got {type(entry).__name__}")
    return entry


DICT_FORMS: Sequence[tuple[Callable[[Mapping], bool], Callable[[Mapping, str], Found]]] = (
    (is_ema_entry, _ema_entry),
    (lambda d: "pytorch-lightning_version" in d or "optimizer_states" in d, _lightning),
    (lambda d: "meta" in d and "optimizer" in d, _mmengine),
    (lambda d: "state" in d and "param_groups" in d, _optimizer_state),
    (lambda d: "state_dict" in d and any(str(k).startswith("optimizer_") for k in d), _lightning),
    (lambda d: "ema" in d, _beside),
    (_holds_optimizer, _inside),
)


# --- folders -------------------------------------------------------------------------------------

class FolderForm(NamedTuple):
    name: str
    detect: Callable[[Path], bool]
    read: Callable[..., dict[str, Tensor]] | None  # (path, *, profile, model, weights_only); None: not available


_DEEPSPEED_FILES = ("*optim_states.pt", "mp_rank_*_model_states.pt")  # ZeRO 1-3; stage 0 (the optimizer inside)


def _is_deepspeed(path: Path) -> bool:
    """DeepSpeed's ``save_checkpoint(dir)``: a ``latest`` file naming the tag folder of ``*optim_states.pt`` files
    (``mp_rank_*_model_states.pt`` at stage 0), or that tag folder itself."""
    return (any(f for pattern in _DEEPSPEED_FILES for f in path.glob(pattern)) or
            ((path / "latest").is_file() and any(f for pattern in _DEEPSPEED_FILES for f in path.glob(f"*/{pattern}"))))


def _read_deepspeed(path: Path, *, profile: str | None, model: nn.Module | None,
                    weights_only: bool) -> dict[str, Tensor]:
    """A DeepSpeed checkpoint folder (``save_dir`` with its ``latest`` file, or one tag's folder): every rank's
    partition of the EMA joined (``read_deepspeed_ema``), keyed like the unwrapped model."""
    if (path / "latest").is_file():
        weights = read_deepspeed_ema(path, profile=profile, trusted=not weights_only)
    else:
        weights = read_deepspeed_ema(path.parent, tag=path.name, profile=profile, trusted=not weights_only)
    return completed(weights, model, str(path))


def _read_dcp(path: Path, *, profile: str | None, model: nn.Module | None, weights_only: bool) -> dict[str, Tensor]:
    """A ``torch.distributed.checkpoint`` folder, read in this process (shards of any world size put together):
    only the EMA (of the profile asked for) and the model's weights are read."""
    folder = DCPFolder(path, weights_only)
    children = {(p[:i], p[i]) for p in folder.paths for i in range(len(p))}
    prefixes = [p[:-1] for p in folder.paths if p[-1] == "step" and
                ((p[:-1], "shadow") in children or (p[:-1], "profiles") in children)]
    if len(prefixes) != 1:
        raise ValueError(f"{path}: a DCP checkpoint with {len(prefixes)} EMA entries "
                         f"{['.'.join(p) for p in prefixes]}; expected one (saved from opt.ema_checkpoint)")
    (prefix,) = prefixes
    n = len(prefix)
    profiles = sorted({p[n + 1] for p in folder.paths if p[:n + 1] == (*prefix, "profiles")})
    chosen = choose_profile(profiles or None, profile, str(path))
    wanted = [p for p in folder.paths if p[:n] == prefix and (p[n] != "profiles" or p[n + 1] == chosen)]
    entry = _nested({p[n:]: v for p, v in folder.read(wanted).items()})
    top = prefix[0] if prefix else None
    models = []
    for key in sorted({p[0] for p in folder.paths if len(p) == 2 and p[0] != top}):
        paths = [p for p in folder.paths if p[0] == key]
        if all(len(p) == 2 and folder.is_tensor[folder.paths[p]] for p in paths):
            models.append(Candidate(frozenset(unwrapped(p[1]) for p in paths),
                                    functools.partial(_model_entries, folder, paths)))
    found = Found(_checked_entry(entry, f"{path} ({'.'.join(prefix) or 'top level'})"), None, str(path), tuple(models),
                  complete=top is not None and top.startswith("optimizer_"))
    return keyed_weights(found, profile, model)


def _nested(flat: dict[tuple[str, ...], Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for path, value in flat.items():
        node = out
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return out


_OPTIMIZER_FILES = ("optimizer.pt", "optimizer.bin", "optimizer_*.bin")


def _is_training_folder(path: Path) -> bool:
    return any(f for pattern in _OPTIMIZER_FILES for f in path.glob(pattern))


def _read_training_folder(path: Path, *, profile: str | None, model: nn.Module | None,
                          weights_only: bool) -> dict[str, Tensor]:
    """A transformers Trainer ``checkpoint-<step>`` folder or an accelerate ``save_state`` folder: the EMA in the
    optimizer's file, the model's weights beside it."""
    files = sorted({f for pattern in _OPTIMIZER_FILES for f in path.glob(pattern)})
    loaded = {f: load_torch_file(f, weights_only) for f in files}
    with_ema = [f for f, d in loaded.items() if isinstance(d, Mapping) and "ema" in d]
    if len(with_ema) != 1:
        raise ValueError(f"{path}: {len(with_ema)} of its optimizer files {[f.name for f in files]} hold an EMA; "
                         "pass the file you want" if with_ema else
                         f"{path}: its optimizer files {[f.name for f in files]} hold no EMA (no 'ema' entry)")
    found = from_dict(loaded[with_ema[0]], str(with_ema[0]))
    return keyed_weights(found._replace(models=tuple(_model_files(path, weights_only))), profile, model)


def _model_files(path: Path, weights_only: bool):
    """The model weights a Trainer or accelerate folder holds, each file (or sharded set) a candidate."""
    for index in sorted(path.glob("*.safetensors.index.json")):
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        yield _file_candidate([path / s for s in shards], weights_only)
    for file in sorted(path.glob("*.safetensors")) + sorted(path.glob("pytorch_model*.bin")):
        if "-of-" not in file.name:
            yield _file_candidate([file], weights_only)


def _model_entries(folder: DCPFolder, paths: list[tuple[str, ...]]) -> dict[str, Tensor]:
    """One model's weights in a DCP folder, keyed by their names in it."""
    return {p[1]: v for p, v in folder.read(paths).items()}


def _file_candidate(files: list[Path], weights_only: bool) -> Candidate:
    def load() -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        for f in files:
            out.update(load_safetensors(f) if f.suffix == ".safetensors" else load_torch_file(f, weights_only))
        return out
    return Candidate(None, load)


FOLDER_FORMS: list[FolderForm] = [
    # Reader: (path, *, profile, model, weights_only) -> weights; one that returns model-keyed weights of its own
    # finishes them with keying.completed(weights, model, str(path)).
    FolderForm("a DeepSpeed checkpoint folder", _is_deepspeed, _read_deepspeed),
    FolderForm("a torch.distributed.checkpoint folder", lambda p: (p / ".metadata").is_file(), _read_dcp),
    FolderForm("a transformers Trainer or accelerate checkpoint folder", _is_training_folder, _read_training_folder),
]

FORMS_KNOWN = ("an optimizer state dict or a dict holding one, a Lightning, mmengine, transformers Trainer or "
               "accelerate checkpoint, a torch.distributed.checkpoint folder, a DeepSpeed checkpoint folder")


def folder_form(path: Path) -> FolderForm | None:
    """The form of checkpoint folder ``path`` is, or None.

    Args:
        path: A folder.

    Returns:
        The first of ``FOLDER_FORMS`` that recognises it, or None.
    """
    return next((form for form in FOLDER_FORMS if form.detect(path)), None)
