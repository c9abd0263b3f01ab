"""Post-hoc EMA (EDM2, Karras et al. 2024): snapshots while training, any EMA length after.

Train with power-function profiles (:class:`~triton_ema.schedules.PowerFunction`),
call :func:`save_snapshot` every N steps, and after training :func:`synthesize`
the EMA of any ``sigma_rel`` (or ``gamma``) as the least-squares combination of
the snapshots (EDM2's Algorithm 3). Reads and writes files; knows no kernels.

A snapshot is one file, ``snapshot-<time>.pt``; under FSDP2 (DTensor parameters)
it is a folder, ``snapshot-<time>/``: a ``torch.distributed.checkpoint`` of every
rank's shards and a header, which :func:`synthesize` reads back whole in one
process, whatever the world size it was written with.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .checkpoint import snapshot_state
from .names import canonical
from .schedules import PowerFunction
from .sharding import is_dtensor

if TYPE_CHECKING:
    from .ema import EMA

__all__ = ["save_snapshot", "synthesize", "solve_weights"]

FORMAT = "triton-ema-snapshot/1"
PREFIX, SUFFIX = "snapshot-", ".pt"
HEADER = "header.pt"  # in a sharded snapshot's folder, beside the checkpoint's own files


def save_snapshot(opt, folder: str | os.PathLike, dtype: torch.dtype | None = None) -> Path:
    """Write every power-function profile's EMA (keyed like the bare model's ``state_dict()``:
    wrapper prefixes removed), with its gamma and the time ``opt.num_steps``, to ``folder``;
    returns the snapshot's path.

    ``dtype`` (float16, bfloat16, ...) makes the floating entries compact on disk;
    None keeps the shadows' dtype. The snapshot appears whole or not at all: it is
    written beside its final name and renamed, so a crash leaves nothing that
    :func:`synthesize` would read.

    Under FSDP2 (DTensor parameters) every rank must call it, with the same
    ``folder`` on a file system all ranks share: each rank writes its own shards
    into one ``torch.distributed.checkpoint`` folder, ``snapshot-<time>/``, written
    under a hidden name and renamed by rank 0 once complete. Under DDP call it on
    one rank (the ranks' EMAs of the parameters are the same).

    Args:
        opt (EMAOptimizer): The :class:`~triton_ema.EMAOptimizer` (wrapper or attached), with
            ``model=``, ``interval=1`` and at least one
            :class:`~triton_ema.schedules.PowerFunction` profile.
        folder: Where to write; created if missing.
        dtype: A floating dtype for the averaged entries on disk, or None.

    Returns:
        The path of the snapshot, ``folder/snapshot-<time>.pt`` (or the folder
        ``snapshot-<time>/`` under FSDP2).

    Raises:
        ValueError: No power-function profile, ``interval != 1``, or no step
            taken yet.
        TypeError: ``dtype`` is not a floating ``torch.dtype``.
    """
    core = opt.core
    profiles = {name: s for name, s in core.schedules.items() if isinstance(s, PowerFunction)}
    if not profiles:
        raise ValueError("save_snapshot() needs power-function profiles: momentum=schedules.PowerFunction(...) "
                         f"or a dict of them; this EMA has {core.schedules!r}")
    if core.interval != 1:
        raise ValueError(f"post-hoc EMA needs an update every step (interval=1), got interval={core.interval}")
    if core.num_steps == 0:
        raise ValueError("save_snapshot() before the first step(): a snapshot's time must be >= 1")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating torch.dtype or None, got {dtype!r}")
    entries, states = [], []
    for name, schedule in profiles.items():
        state, averaged = snapshot_state(core, name)
        states.append({k: _on_disk(v, dtype if k in averaged else None) for k, v in state.items()})
        entries.append({"name": name, "gamma": schedule.gamma, "averaged": sorted(averaged)})
    header = {"format": FORMAT, "run": core.run_id, "time": core.num_steps, "profiles": entries}
    path = Path(folder) / f"{PREFIX}{core.num_steps:012d}"
    if any(is_dtensor(v) for state in states for v in state.values()):
        return _save_sharded(core, header, states, path)
    for entry, state in zip(entries, states):
        entry["state"] = state
    return _save_file(header, path.with_name(path.name + SUFFIX))


def _on_disk(t: Tensor, dtype: torch.dtype | None) -> Tensor:
    if is_dtensor(t):  # written shard by shard, each copied as it goes
        return t.detach().to(dtype or t.dtype)
    if t.device.type == "meta" or type(t) is not Tensor:
        raise TypeError(f"save_snapshot() takes plain tensors or DTensors; got a {type(t).__name__} on {t.device}")
    return t.detach().to("cpu", dtype or t.dtype, copy=True)


def _save_file(content: dict[str, Any], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(content, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _save_sharded(core: EMA, header: dict[str, Any], states: list[dict[str, Tensor]], path: Path) -> Path:
    """Every rank's shards into one DCP checkpoint under a hidden name; rank 0 adds the
    header and renames the folder once the checkpoint is complete (a collective)."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    tmp = path.with_name(f".{path.name}.tmp")

    def clean():
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # left by a crash

    def finish():
        _save_file(header, tmp / HEADER)
        _replace_folder(tmp, path)

    _by_rank_0(clean, path)  # no rank writes before the folder is clean
    # Rank 0's run id for every rank (each drew its own), so that the checkpoints
    # of this run carry it whichever rank writes them.
    run = [core.run_id]
    dist.broadcast_object_list(run, src=0)
    core.run_id = header["run"] = run[0]
    dcp.save({f"{j}/{key}": v for j, state in enumerate(states) for key, v in state.items()}, checkpoint_id=tmp)
    _by_rank_0(finish, path)  # every rank returns once the snapshot is in place
    return path


def _by_rank_0(action, path: Path) -> None:
    """``action()`` on rank 0, and on every rank an error if it failed (a collective)."""
    import torch.distributed as dist

    failed: list[str | None] = [None]
    error = None
    if dist.get_rank() == 0:
        try:
            action()
        except Exception as err:
            failed[0], error = f"{type(err).__name__}: {err}", err
    dist.broadcast_object_list(failed, src=0)
    if error is not None:
        raise error
    if failed[0] is not None:
        raise RuntimeError(f"rank 0 could not complete the snapshot {path}: {failed[0]}")


def _replace_folder(new: Path, path: Path) -> None:
    """``new`` renamed to ``path``; a snapshot already there (of a resumed run) is replaced."""
    if not path.exists():
        os.replace(new, path)
        return
    old = path.with_name(f".{path.name}.old.tmp")
    shutil.rmtree(old, ignore_errors=True)
    os.replace(path, old)
    os.replace(new, path)
    shutil.rmtree(old)


def power_function_correlation(t_a: Tensor, g_a: Tensor, t_b: Tensor, g_b: Tensor) -> Tensor:
    """Inner products of power-function profiles of lengths ``t`` and exponents ``g`` (EDM2 Algorithm 3)."""
    ratio = t_a / t_b
    exponent = torch.where(t_a < t_b, g_b, -g_a)
    return (g_a + 1) * (g_b + 1) * ratio**exponent / ((g_a + g_b + 1) * torch.maximum(t_a, t_b))


def solve_weights(times: Sequence[float], gammas: Sequence[float], time: float,
                  targets: Sequence[float]) -> Tensor:
    """EDM2's least-squares weights (its Algorithm 3), float64.

    Args:
        times: Each snapshot profile's time (``opt.num_steps`` when it was taken).
        gammas: Each snapshot profile's exponent.
        time: The time of the profiles to synthesize.
        targets: The exponents of the profiles to synthesize.

    Returns:
        A ``[len(times), len(targets)]`` tensor; column j combines the snapshots
        into the profile of exponent ``targets[j]`` at ``time``; each column is
        normalised to sum 1.
    """
    t_in = torch.tensor(times, dtype=torch.float64)
    g_in = torch.tensor(gammas, dtype=torch.float64)
    t_out = torch.full((len(targets),), float(time), dtype=torch.float64)
    g_out = torch.tensor(targets, dtype=torch.float64)
    a = power_function_correlation(t_in[:, None], g_in[:, None], t_in[None, :], g_in[None, :])
    b = power_function_correlation(t_in[:, None], g_in[:, None], t_out[None, :], g_out[None, :])
    x = torch.linalg.solve(a, b)
    return x / x.sum(0, keepdim=True)


def _read(path: Path) -> dict[str, Any]:
    """A snapshot's header; a file's tensors come memory-mapped (read from disk as they are used)."""
    file = path / HEADER if path.is_dir() else path
    try:
        content = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except FileNotFoundError as err:
        raise ValueError(f"{path} is not a triton-ema snapshot (no {HEADER})") from err
    except Exception as err:
        raise ValueError(f"{path} is not a readable snapshot: {err}") from err
    if not isinstance(content, dict) or content.get("format") != FORMAT:
        raise ValueError(f"{path} is not a triton-ema snapshot (no format {FORMAT!r})")
    for profile in content["profiles"]:
        gamma = profile.get("gamma")
        if not isinstance(gamma, float) or not gamma > 0:
            raise ValueError(f"{path}: profile {profile.get('name')!r} is not a power function (gamma {gamma!r})")
    return content


def _profile_states(path: Path, content: dict[str, Any]):
    """Each profile's state dict in turn: a file's mapped tensors, or a sharded
    snapshot's tensors read whole with DCP, one profile at a time."""
    if not path.is_dir():
        yield from (profile["state"] for profile in content["profiles"])
        return
    from torch.distributed.checkpoint import FileSystemReader

    reader = FileSystemReader(path)
    for j in range(len(content["profiles"])):
        yield _read_sharded_profile(reader, path, j)


def _read_sharded_profile(reader, path: Path, profile: int) -> dict[str, Tensor]:
    from torch.distributed.checkpoint import load
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    prefix = f"{profile}/"
    try:
        saved = reader.read_metadata().state_dict_metadata
        state = {key: torch.empty(m.size, dtype=m.properties.dtype) for key, m in saved.items()
                 if key.startswith(prefix) and isinstance(m, TensorStorageMetadata)}
        with warnings.catch_warnings():  # one process on purpose: DCP says so each time
            warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
            load(state, storage_reader=reader, no_dist=True)  # whole tensors, from the shards of any world size
    except CheckpointException as err:  # a BaseException: the reading's own errors inside
        causes = "; ".join(f"{type(e).__name__}: {e}" for e, _ in err.failures.values())
        raise ValueError(f"{path} is not a readable snapshot: {causes}") from err
    except Exception as err:
        raise ValueError(f"{path} is not a readable snapshot: {err}") from err
    return {key.removeprefix(prefix): v for key, v in state.items()}


def _snapshots(folder: Path, time: int | None) -> tuple[list[Path], list[dict], int]:
    """The snapshots to combine (files and sharded folders), their headers, and the target time."""
    found = sorted(folder.glob(f"{PREFIX}*")) if folder.is_dir() else []
    paths = [p for p in found if p.suffix == SUFFIX or p.is_dir()]
    if not paths:
        raise FileNotFoundError(f"no snapshots ({PREFIX}*{SUFFIX} files or {PREFIX}* folders) in {folder}: "
                                "call posthoc.save_snapshot() while training")
    headers = [_read(p) for p in paths]
    runs = {h["run"] for h in headers}
    if len(runs) > 1:
        by_run = {run: [p.name for p, h in zip(paths, headers) if h["run"] == run][:3] for run in runs}
        raise ValueError(f"{folder} holds snapshots of {len(runs)} different runs; keep one run per folder: {by_run}")
    last = max(h["time"] for h in headers)
    time = last if time is None else int(time)
    if not 0 < time <= last:
        raise ValueError(f"time must lie in (0, {last}] (the last snapshot's time), got {time}")
    kept = [(p, h) for p, h in zip(paths, headers) if h["time"] <= time]
    if not kept:
        raise ValueError(f"no snapshot in {folder} was taken at or before time {time}")
    return [p for p, _ in kept], [h for _, h in kept], time


def _targets(sigma_rel, gamma) -> tuple[list[float], bool]:
    if (sigma_rel is None) == (gamma is None):
        raise ValueError("synthesize() takes exactly one of sigma_rel and gamma")
    given = sigma_rel if gamma is None else gamma
    many = isinstance(given, Sequence)
    values = list(given) if many else [given]
    gammas = [PowerFunction(sigma_rel=v).gamma if gamma is None else PowerFunction(gamma=v).gamma for v in values]
    return gammas, many  # type: ignore[return-value]  # PowerFunction's __post_init__ sets gamma from sigma_rel


def synthesize(folder: str | os.PathLike, sigma_rel: float | Sequence[float] | None = None,
               gamma: float | Sequence[float] | None = None,
               time: int | None = None) -> dict[str, Tensor] | list[dict[str, Tensor]]:
    """The EMA of profile ``sigma_rel`` (or ``gamma``) at ``time`` (default: the last
    snapshot's), combined from the snapshots in ``folder`` taken at or before ``time``:
    a float32 state dict keyed like ``model.state_dict()``. A sequence of targets gives
    a list of state dicts, all from one pass over the files. Keys carry no wrapper
    prefixes (``module.``, ``_orig_mod.``, ...): the bare model's ``load_state_dict``
    takes the result, whether the snapshots were taken of it or of a wrapper around it.

    Entries that are not averaged (integer buffers, buffers without ``update_buffers``)
    come from the latest snapshot used. Memory: one float64 accumulator per target
    and one snapshot, whatever the number of snapshots (a file is read from disk as
    it is used; a sharded snapshot one profile at a time, its shards put together
    whatever the world size that wrote them). It runs in one process, without a
    process group.

    Args:
        folder: The folder :func:`save_snapshot` wrote to.
        sigma_rel: The width of the profile to synthesize, or a sequence of them.
        gamma: Or its exponent, or a sequence of them; give exactly one of the two.
        time: Combine the snapshots taken at or before this time (default: the
            last snapshot's time).

    Returns:
        A float32 state dict keyed like ``model.state_dict()``, or a list of them
        for a sequence of targets.

    Raises:
        FileNotFoundError: No snapshot in ``folder`` (or no such folder).
        ValueError: Both or neither of ``sigma_rel`` and ``gamma``; a time after
            the last snapshot; snapshots of two runs in one folder; two snapshots
            of one profile at one time; a sharded snapshot missing a rank's
            shards; files that are not snapshots.
    """
    targets, many = _targets(sigma_rel, gamma)
    paths, headers, time = _snapshots(Path(folder), time)
    columns = [(h["time"], p["gamma"]) for h in headers for p in h["profiles"]]
    if len(set(columns)) < len(columns):
        raise ValueError(f"{folder} holds two snapshots of the same profile at the same time; keep one")
    weights = solve_weights([c[0] for c in columns], [c[1] for c in columns], time, targets)
    latest = max(range(len(headers)), key=lambda i: headers[i]["time"])
    sums: list[dict[str, Tensor]] = [{} for _ in targets]
    col = 0
    for i, path in enumerate(paths):
        content, headers[i] = headers[i], None  # type: ignore[call-overload]  # the mapped file goes once it is summed
        for profile, state in zip(content["profiles"], _profile_states(path, content)):
            _accumulate(sums, profile, state, weights[col], path, keep_rest=i == latest)
            col += 1
    out = [{k: v.to(torch.float32) if v.dtype == torch.float64 else v for k, v in s.items()} for s in sums]
    return out if many else out[0]


def _accumulate(sums: list[dict[str, Tensor]], profile: dict, state: dict[str, Tensor], weights: Tensor, path: Path,
                keep_rest: bool) -> None:
    # Keys without wrapper prefixes (as save_snapshot writes them; a file may hold them otherwise), so that
    # snapshots of the bare model and of a wrapper around it combine.
    keys = dict(zip(state, canonical(list(state))))
    averaged = {keys.get(key, key) for key in profile["averaged"]}
    for old, value in state.items():
        key = keys[old]
        for total, w in zip(sums, weights.tolist()):
            if key not in averaged:
                if keep_rest:
                    total[key] = value.clone()
                continue
            acc = total.get(key)
            if acc is None:
                total[key] = acc = torch.zeros(value.shape, dtype=torch.float64)
            elif acc.shape != value.shape:
                raise ValueError(f"{path}: {key} has shape {tuple(value.shape)}, earlier snapshots "
                                 f"{tuple(acc.shape)}; snapshots of different models cannot be combined")
            acc.add_(value.to(torch.float64), alpha=w)

