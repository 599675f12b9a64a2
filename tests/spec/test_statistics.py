"""The noise's statistics: the uniform stream's bounds, mean and per-sequence norm (the paper), and
the Gaussian stream's moments, tails and distance to the normal CDF."""

import math

import pytest
import torch

from neft_kernels import noisy_embedding, spec

from support.asserts import assert_bits_equal
from support.cases import expected, make_weight


@pytest.mark.parametrize("length_mode", ["per_sequence", "padded"])
def test_noise_statistics(length_mode):
    """Noise in [-scale, scale), mean ~ 0, and per-sequence norm ~ alpha / sqrt(3) (the paper)."""
    rows, width, d, alpha = 16, 128, 256, 5.0
    weight = torch.zeros(10, d)
    ids = torch.zeros(rows, width, dtype=torch.long)
    mask = torch.ones(rows, width, dtype=torch.long)
    real = torch.randint(32, width + 1, (rows,), generator=torch.Generator().manual_seed(0))
    for r in range(rows):
        mask[r, real[r]:] = 0
    noise = noisy_embedding(ids, weight, alpha, seed=123, attention_mask=mask, length_mode=length_mode,
                            backend="torch")
    lengths = real if length_mode == "per_sequence" else torch.full((rows,), width)
    scale = (alpha / torch.sqrt(lengths.double() * d)).float()
    for r in range(rows):
        n = noise[r] if length_mode == "padded" else noise[r, :real[r]]
        assert (n >= -scale[r]).all() and (n < scale[r]).all()
        assert abs(n.mean().item()) < 0.02 * scale[r].item()
        assert n.norm().item() == pytest.approx(alpha / math.sqrt(3), rel=0.02)
        if length_mode == "per_sequence":
            assert (noise[r, real[r]:] == 0).all()


def test_gaussian_moments_and_tails_are_those_of_a_standard_normal():
    z = spec.noise(40_000, 64, seed=11, distribution="gaussian").double().reshape(-1)  # 2.56M draws
    n = z.numel()
    assert abs(z.mean()) < 5 / math.sqrt(n)
    assert abs(z.var() - 1) < 0.005
    assert abs((z ** 3).mean()) < 0.01
    assert abs((z ** 4).mean() - 3) < 0.03
    for k in (1, 2, 3, 4):
        want = math.erfc(k / math.sqrt(2))
        got = (z.abs() > k).double().mean().item()
        assert abs(got - want) < 5 * math.sqrt(want / n) + 1e-6, (k, got, want)
    assert z.abs().max() < 6.0  # the 23-bit radius word: |z| <= sqrt(48 ln 2) = 5.77
    # Kolmogorov-Smirnov distance to the normal CDF
    s, _ = torch.sort(z[:200_000])
    cdf = 0.5 * torch.erfc(-s / math.sqrt(2))
    ks = torch.maximum(torch.arange(1, s.numel() + 1) / s.numel() - cdf, cdf - torch.arange(s.numel()) / s.numel())
    assert ks.max() < 1.63 / math.sqrt(s.numel())  # the 1% critical value


def test_gaussian_keeps_the_uniform_stream_and_the_scale():
    w = make_weight(20, 64, torch.float32)
    ids = torch.arange(20).view(2, 10)
    uniform_out = noisy_embedding(ids, w, 5.0, seed=3, backend="torch")
    # v2 keeps v1's uniform stream: the independent NumPy model's v1 bits (the default distribution)
    assert_bits_equal(uniform_out, expected(ids, w, 5.0, 3, 0, None, None, "per_sequence"))
    uniform = uniform_out - w[ids]
    gaussian = noisy_embedding(ids, w, 5.0, seed=3, distribution="gaussian", backend="torch") - w[ids]
    scale = 5.0 / math.sqrt(10 * 64)
    assert uniform.abs().max() <= scale
    assert 0.7 < gaussian.std().item() / scale < 1.3 and gaussian.abs().max() > scale  # N(0, 1), not U(-1, 1)
