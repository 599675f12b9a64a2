"""Where the tests run: CUDA when there is a GPU, else the CPU with Triton's interpreter."""

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
# Without a GPU the Triton kernels run under the interpreter. This must precede any triton import:
# the support package imports this module first, and tests/conftest.py imports support first.
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = "cuda" if HAS_CUDA else "cpu"
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
