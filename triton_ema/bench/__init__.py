"""Benchmarks of triton-ema against the EMAs users would pick instead (``python -m triton_ema.bench``)."""
