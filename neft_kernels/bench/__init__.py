"""Benchmarks: ``python -m neft_kernels.bench --help``."""
