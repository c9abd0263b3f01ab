"""triton-ema: an exponential moving average of model weights, kept inside any
PyTorch optimizer's ``step()`` and computed over flat buckets by Triton kernels."""

from . import posthoc, schedules
from .hooks import attach
from .optimizer import EMAOptimizer
from .weights import load_ema_weights

__version__ = "0.2.0.dev0"
"""The package's version (PEP 440); a ``.dev`` version is an unreleased development state."""

__all__ = ["EMAOptimizer", "attach", "load_ema_weights", "schedules", "posthoc", "__version__"]
