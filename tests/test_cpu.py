"""The compiled CPU backend (csrc/cpu) against the spec model, and its backend selection."""

import warnings

import pytest
import torch

from cases import DIMS, KINDS, LENGTH_MODES, check_matches_spec_model, expected, make_weight, scale_cases
from conftest import DTYPES, assert_bits_equal, requires_cpu_ext
from neft_kernels import noisy_embedding
from neft_kernels.backends import resolve
from neft_kernels.lengths import token_scales

pytestmark = requires_cpu_ext


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", DIMS + [4099])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("length_mode", LENGTH_MODES)
def test_cpu_forward_matches_spec_model(dtype, d, kind, length_mode):
    check_matches_spec_model("cpu", dtype, d, kind, length_mode)


@pytest.mark.parametrize("dtype", DTYPES)
def test_cpu_forward_many_tokens_int32_ids_and_counter_carry(dtype):
    """Enough tokens for several threads; an offset whose low counter word wraps mid-row."""
    weight = make_weight(500, 300, dtype)
    ids = torch.randint(0, 500, (4, 129), dtype=torch.int32, generator=torch.Generator().manual_seed(5))
    offset = 2**32 - 1000
    out = noisy_embedding(ids, weight, 5.0, seed=77, offset=offset, backend="cpu")
    assert_bits_equal(out, noisy_embedding(ids, weight, 5.0, seed=77, offset=offset, backend="torch"))
    assert_bits_equal(out, expected(ids.long(), weight, 5.0, 77, offset, None, None, "per_sequence"))


@pytest.mark.parametrize("dtype", DTYPES)
def test_cpu_forward_row_strided_weight(dtype):
    """A column slice keeps unit column stride, so the kernel reads rows 40 apart, not 20."""
    weight = make_weight(64, 40, dtype)[:, :20]
    assert weight.stride() == (40, 1)
    ids = torch.tensor([[3, 1, 60]])
    assert_bits_equal(noisy_embedding(ids, weight, 5.0, seed=3, backend="cpu"),
                      noisy_embedding(ids, weight.contiguous(), 5.0, seed=3, backend="torch"))


def test_auto_picks_the_compiled_cpu_backend():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve("auto", torch.device("cpu")) == "cpu"


def test_cpu_backend_refuses_other_devices():
    with pytest.raises(ValueError, match="runs on cpu"):
        resolve("cpu", torch.device("cuda"))


def test_missing_backend_is_a_clear_error_and_auto_warns_once(monkeypatch):
    from neft_kernels import backends

    monkeypatch.setitem(backends._MODULES, "cpu", "not_built")
    backends._load.cache_clear()
    backends._warn_fallback.cache_clear()
    try:
        with pytest.raises(RuntimeError, match="backend='cpu' is unavailable"):
            resolve("cpu", torch.device("cpu"))
        with pytest.warns(UserWarning, match="'cpu' is unavailable"):
            assert resolve("auto", torch.device("cpu")) == "torch"
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            resolve("auto", torch.device("cpu"))  # once only
    finally:
        backends._load.cache_clear()
        backends._warn_fallback.cache_clear()


def test_vectorised_philox_stream_matches_the_reference_across_a_counter_carry():
    from neft_kernels import _C_cpu
    from neft_kernels.spec import philox4x32_10

    for seed in (0, -5, 2**40 + 7):
        words = torch.empty(1000, 4, dtype=torch.int32)
        _C_cpu.philox_words(words, seed, 2**32 - 300)
        words = words.long() & 0xFFFFFFFF
        assert torch.equal(words, torch.stack(philox4x32_10(torch.arange(2**32 - 300, 2**32 + 700), seed), 1))


@pytest.mark.parametrize("dtype", DTYPES)
def test_cpu_forward_special_values(dtype):
    """inf, NaN, the largest finite values (rounding up to inf) and subnormals, through every path."""
    special = torch.tensor([float("inf"), float("-inf"), float("nan"), 3.3e38, -3.3e38, 6.5e4, 1e-40, -0.0])
    weight = make_weight(4, 40, torch.float32)
    weight[1, :8] = special
    weight[2, 30:38] = special
    weight = weight.to(dtype)
    ids = torch.tensor([[1, 2, 0, 1]])
    out = noisy_embedding(ids, weight, 50.0, seed=4, backend="cpu")
    assert_bits_equal(out, noisy_embedding(ids, weight, 50.0, seed=4, backend="torch"))
    assert out.isnan().sum() == 3  # row 1 twice, row 2 once


@pytest.mark.parametrize("width", [1, 7, 37, 1500])
def test_cpu_scales_match_the_reference(width):
    """The C++ per-token scales (masks of every dtype, broadcast strides, packed rows, cu_seqlens)."""
    from neft_kernels import _C_cpu

    for mask, pos, cu in scale_cases(width):
        for alpha, d in ((5.0, 4096), (3.4641022345673926, 16), (0.0, 7)):
            got = _C_cpu.token_scales(3 * width, alpha, d, width, mask, pos, cu)
            if mask is not None:  # unsigned masks read as well
                assert_bits_equal(_C_cpu.token_scales(3 * width, alpha, d, width, mask.to(torch.uint16), pos, cu), got)
            want = token_scales((3, width), alpha, d, attention_mask=mask, position_ids=pos, cu_seqlens=cu)
            assert_bits_equal(got, want)


def test_an_extension_built_from_other_sources_is_refused_at_import():
    import types

    from neft_kernels.backends._extension import check_abi

    with pytest.raises(ImportError, match="rebuild"):
        check_abi(types.SimpleNamespace(__name__="neft_kernels._C_cpu"))  # no ABI_VERSION: an older build
