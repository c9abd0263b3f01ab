"""EMA work that ``torch.compile`` never traces: the kernels reach params through
address tables that tracing cannot see. Under ``torch.compile(opt.step)`` the base
step compiles and the EMA runs as written."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any

import torch


@functools.cache
def _disabled(fn: Callable[..., Any]) -> Callable[..., Any]:
    return torch.compiler.disable(fn)


def call_untraced(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)``, never traced. Once dynamo is loaded it also takes over calls made
    from frames it runs uncompiled, so from then on ``fn`` always goes through
    ``compiler.disable``."""
    if torch.compiler.is_compiling():
        return torch.compiler.disable(fn)(*args)
    if "torch._dynamo" in sys.modules:
        return _disabled(fn)(*args)
    return fn(*args)
