"""Kernels, one module per backend. Each exposes ``forward`` and ``backward`` on flattened ids."""
