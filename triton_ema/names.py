"""Parameter names as the unwrapped model has them.

Wrappers put a component into every name of the module they wrap: DDP,
DataParallel and mmengine's model wrappers a leading ``module.``;
``torch.compile`` ``_orig_mod.``; FSDP1 ``_fsdp_wrapped_module.`` and
activation checkpointing ``_checkpoint_wrapped_module.``, at every module
they wrap. Names are compared once these are removed."""

from __future__ import annotations

__all__ = ["WRAPPER_PREFIXES", "only_wrappers_differ", "unwrapped", "wrapper_difference"]

WRAPPER_PREFIXES = ("module.", "_orig_mod.", "_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")

# Wrapper-only components, removed wherever they stand: no user module is named so.
_INNER = frozenset(prefix[:-1] for prefix in WRAPPER_PREFIXES[1:])


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


def wrapper_difference(a: str, b: str) -> str:
    """A clause for an error message when ``a`` and ``b`` differ only by wrapper prefixes, else ``""``."""
    if not only_wrappers_differ(a, b):
        return ""
    return (f" ({a!r} and {b!r} differ only by wrapper prefixes, {', '.join(repr(p) for p in WRAPPER_PREFIXES)}: "
            "one side is a wrapped model)")
