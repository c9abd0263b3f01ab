"""triton-ema: an exponential moving average of model weights, kept inside any
PyTorch optimizer's ``step()`` and computed over flat buckets by Triton kernels."""

from . import posthoc, schedules
from .hooks import attach
from .optimizer import EMAOptimizer
from .weights import load_ema_weights

__version__ = "0.1.0"

__all__ = ["EMAOptimizer", "attach", "load_ema_weights", "schedules", "posthoc", "__version__"]
