import os

import pytest
import torch

# Without a GPU the Triton kernels run under the interpreter; this must precede any triton import.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
# The compiled CPU backend is part of every build unless NEFT_KERNELS_BUILD_EXT=0 turned it off:
# a missing extension is then a failure, not a skip.
requires_cpu_ext = pytest.mark.skipif(os.environ.get("NEFT_KERNELS_BUILD_EXT") == "0",
                                      reason="built with NEFT_KERNELS_BUILD_EXT=0")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Bits view of each dtype, so that comparisons are bit for bit (NaN and -0.0 included).
BITS = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def to_numpy_raw(t: torch.Tensor):
    """A tensor as NumPy values; bf16 as its uint16 words (what the spec model speaks)."""
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view("uint16")
    return t.numpy()


def assert_bits_equal(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal bits everywhere, except that a NaN need only meet a NaN (spec v1 leaves payloads open)."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    actual, expected = actual.cpu(), expected.cpu()
    a, e = actual.view(BITS[actual.dtype]), expected.view(BITS[expected.dtype])
    both_nan = actual.isnan() & expected.isnan()
    mismatched = ((a != e) & ~both_nan).sum().item()
    assert mismatched == 0, f"{mismatched} of {a.numel()} elements differ in bits"


def _backend_devices() -> list[tuple[str, str]]:
    """(backend, device) for every backend this machine can run, each on its own device."""
    pairs = [("torch", DEVICE), ("triton", DEVICE)]
    if os.environ.get("NEFT_KERNELS_BUILD_EXT") != "0":
        pairs.append(("cpu", "cpu"))
    if torch.cuda.is_available():
        try:
            from neft_kernels import _C_cuda  # noqa: F401
            pairs.append(("cuda", "cuda"))
        except ImportError:
            pass
    return pairs


BACKEND_DEVICES = _backend_devices()
