"""Parameter names as the unwrapped model has them.

Wrappers put a component into every name of the module they wrap: DDP,
DataParallel and mmengine's model wrappers a leading ``module.``;
``torch.compile`` ``_orig_mod.``; FSDP1 ``_fsdp_wrapped_module.`` and
activation checkpointing ``_checkpoint_wrapped_module.``, at every module
they wrap. Names are compared once these are removed, and written so
(:func:`canonical`) where they are saved."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TypeVar

__all__ = ["WRAPPER_PREFIXES", "by_unwrapped", "canonical", "only_wrappers_differ", "rekeyed", "unwrapped", "wrapper_difference",
           "wrapper_hint"]

WRAPPER_PREFIXES = ("module.", "_orig_mod.", "_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")

# Wrapper-only components, removed wherever they stand: no user module is named so.
_INNER = frozenset(prefix[:-1] for prefix in WRAPPER_PREFIXES[1:])

V = TypeVar("V")


def unwrapped(name: str) -> str:
    """``name`` without wrapper components: every ``_orig_mod``, ``_fsdp_wrapped_module`` and
    ``_checkpoint_wrapped_module``, and the leading ``module`` components (those of DDP and
    DataParallel; a ``module`` further in may be the user's own submodule and stays)."""
    parts = [part for part in name.split(".") if part not in _INNER]
    start = 0
    while start < len(parts) - 1 and parts[start] == "module":
        start += 1
    return ".".join(parts[start:])


def only_wrappers_differ(a: str, b: str) -> bool:
    """Whether ``a`` and ``b`` differ, but only by wrapper prefixes."""
    return a != b and unwrapped(a) == unwrapped(b)


def _loose(name: str) -> str:
    """``name`` without wrapper components and without any ``module`` component, wherever it stands."""
    return ".".join(part for part in unwrapped(name).split(".") if part != "module")


def wrapper_difference(a: str, b: str) -> str:
    """A clause for an error message when ``a`` and ``b`` differ only by wrapper components, else ``""``:
    by wrapper prefixes (then they match wherever names are compared), or by a ``module.`` inside
    the name (a wrapper around a submodule, which names alone cannot tell from a submodule of that name)."""
    if a == b:
        return ""
    if unwrapped(a) == unwrapped(b):
        return (f" ({a!r} and {b!r} differ only by wrapper prefixes, {', '.join(repr(p) for p in WRAPPER_PREFIXES)}: "
                "one side is a wrapped model)")
    if _loose(a) == _loose(b):
        return (f" ({a!r} and {b!r} differ only by 'module.' components inside the name, which are kept: only a "
                "leading 'module.' is taken for a wrapper's; a submodule wrapped in DataParallel or DDP on one side?)")
    return ""


def wrapper_hint(name: str, candidates: Iterable[str]) -> str:
    """:func:`wrapper_difference` of ``name`` and the first of ``candidates`` it differs from by wrappers only."""
    for candidate in candidates:
        clause = wrapper_difference(name, candidate)
        if clause:
            return clause
    return ""


def canonical(names: Sequence[str]) -> list[str]:
    """The names as they are saved: unwrapped, or all as they are where unwrapping would make
    two of them the same (a model with both ``module.x`` and ``x``)."""
    out = [unwrapped(name) for name in names]
    return out if len(set(out)) == len(set(names)) else list(names)


def by_unwrapped(named: Iterable[tuple[str, V]]) -> dict[str, V | None]:
    """Each value by its name once wrapper prefixes are removed; None where two names become one
    (only the exact names tell those apart)."""
    out: dict[str, V | None] = {}
    for name, value in named:
        u = unwrapped(name)
        out[u] = None if u in out else value
    return out


def rekeyed(given: Mapping[str, V], ours: Iterable[str], where: str) -> dict[str, V]:
    """``given`` keyed by ``ours``: each entry under our name that equals its key, else under the one
    that does once wrapper prefixes are removed; an entry matching none of ours keeps its key
    (the caller reports it). Two entries for one of our names are an error naming both."""
    ours = list(ours)
    exact = set(ours)
    ours_unwrapped = by_unwrapped((name, name) for name in ours)
    out: dict[str, V] = {}
    origin: dict[str, str] = {}
    for key, value in given.items():
        target = key if key in exact or not isinstance(key, str) else ours_unwrapped.get(unwrapped(key)) or key
        if target in out:
            raise ValueError(f"{where} has two entries for {target!r}: {origin[target]!r} and {key!r} (the same "
                             "name once wrapper prefixes are removed)")
        out[target], origin[target] = value, key
    return out
