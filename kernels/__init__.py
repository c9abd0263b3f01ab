"""Triton kernels (``@triton.jit`` code only), installed as ``triton_ema.kernels``."""
