"""Bit-for-bit comparisons, and the dtypes every kernel supports."""

import torch

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


def assert_uniform_noise_of_alpha(out: torch.Tensor, clean: torch.Tensor, alpha: float, length: int) -> None:
    """``out - clean`` is uniform noise of ``alpha`` at length ``length``: its largest magnitude is just
    below the bound ``alpha / sqrt(L d)`` (given a few thousand elements), and not above it but for
    the rounding of ``clean + noise`` (under 1e-4 of the bound for N(0, 1) weights and alpha >= 0.25)."""
    bound = alpha / (length * out.shape[-1]) ** 0.5
    ratio = ((out.detach() - clean).abs().max() / bound).item()
    assert 0.95 < ratio <= 1 + 1e-3, (alpha, ratio)
