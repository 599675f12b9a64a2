"""The compiled CPU backend (csrc/cpu) beyond the spec-model grid (tests/kernels/test_spec_equivalence.py):
noise_mask forms, long streams, strides, special values, its scales and Philox seams, backend selection,
and the CUDA backend's Python side."""

import itertools
import warnings

import pytest
import torch

from neft_kernels import noisy_embedding, spec
from neft_kernels.backends import resolve
from neft_kernels.lengths import token_scales

from support.asserts import DTYPES, assert_bits_equal
from support.backends import requires
from support.cases import expected, make_weight, noise_mask_for, scale_cases, side_inputs

pytestmark = requires("cpu")


@pytest.mark.parametrize("form", ["bool", "uint8", "int32", "broadcast row", "broadcast column", "all zero"])
def test_cpu_noise_mask_forms(form):
    """A noise_mask of any integer or bool dtype, broadcast along either dim, or masking every token."""
    weight = make_weight(37, 13, torch.float32)
    ids = torch.randint(0, 37, (3, 11), generator=torch.Generator().manual_seed(1))
    mask, _ = side_inputs("mask", (3, 11))
    noise_mask = {"bool": noise_mask_for((3, 11)), "uint8": noise_mask_for((3, 11)).to(torch.uint8),
                  "int32": noise_mask_for((3, 11)).int(), "broadcast row": (torch.arange(11) % 3 != 0)[None],
                  "broadcast column": torch.tensor([[1], [0], [1]]),
                  "all zero": torch.zeros(3, 11, dtype=torch.bool)}[form]
    for distribution in ("uniform", "gaussian"):
        out = noisy_embedding(ids, weight, 5.0, seed=9, attention_mask=mask, noise_mask=noise_mask, backend="cpu",
                              distribution=distribution)
        assert_bits_equal(out, expected(ids, weight, 5.0, 9, 0, mask, None, "per_sequence", None, distribution,
                                        noise_mask.expand(3, 11)))
    if form == "all zero":
        assert_bits_equal(out, weight[ids])


def test_cpu_gaussian_stream_matches_the_reference_over_many_tokens():
    """131072 tokens x 64 dims of Gaussian noise (8.4M normals, every vectorised path and a counter carry)
    equal spec.noise bit for bit. Rows of -0.0 and scale 1 make out = -0.0 + e = e exactly (signed zeros too)."""
    from neft_kernels import _C_cpu

    n, d, seed, offset = 131072, 64, -77, 2**32 - 5000
    ids = torch.zeros(n, dtype=torch.int64)
    out, _, _ = _C_cpu.forward(ids, torch.full((1, d), -0.0), seed, offset, 1.0, False, 0.0, n, None, None, None, None,
                               True)
    assert_bits_equal(out, spec.noise(n, d, seed, offset, distribution="gaussian"))


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


def test_a_cuda_extension_without_kernels_for_the_gpu_is_passed_over(monkeypatch):
    """An extension built for newer architectures than the GPU (setup.py: sm_80 and up) imports but
    cannot launch: auto takes the next backend with a warning naming the GPU, and asking for it by
    name is a clear error. (A stand-in extension and capability: no GPU needed.)"""
    import types

    from neft_kernels import backends

    loaded = {"cuda": types.SimpleNamespace(runs_on=lambda index: index != 0),
              "triton": types.SimpleNamespace()}
    monkeypatch.setattr(backends, "_load", lambda name: loaded.get(name, ImportError(name)))
    monkeypatch.setattr(backends, "_resolved", {})
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: (7, 5))
    backends._warn_fallback.cache_clear()
    with pytest.warns(UserWarning, match=r"'cuda' is unavailable \(the extension has no kernels for this GPU \(sm_75"):
        assert resolve("auto", torch.device("cuda", 0)) == "triton"
    with pytest.raises(RuntimeError, match=r"backend='cuda' cannot run on cuda:0: .*sm_75"):
        resolve("cuda", torch.device("cuda", 0))
    assert resolve("auto", torch.device("cuda", 1)) == "cuda"  # a GPU it was built for
    backends._warn_fallback.cache_clear()


def test_missing_backend_is_a_clear_error_and_auto_warns_once(monkeypatch):
    from neft_kernels import backends

    monkeypatch.setitem(backends._MODULES, "cpu", "not_built")
    monkeypatch.setattr(backends, "_resolved", {})
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
    """The C++ per-token scales (masks of every dtype, broadcast strides, packed rows, cu_seqlens), with and
    without a noise_mask (bool, uint8, broadcast)."""
    from neft_kernels import _C_cpu

    g = torch.Generator().manual_seed(width + 1)
    noise_masks = (None, torch.randint(0, 2, (3, width), generator=g).bool(),
                   torch.randint(0, 2, (3, width), generator=g).to(torch.uint8),
                   (torch.arange(width) % 2 == 0)[None].expand(3, width))
    for (mask, pos, cu), noise_mask in zip([*scale_cases(width)] * 2, itertools.cycle(noise_masks)):
        for alpha, d in ((5.0, 4096), (3.4641022345673926, 16), (0.0, 7)):
            got = _C_cpu.token_scales(3 * width, alpha, d, width, mask, pos, cu, noise_mask)
            if mask is not None:  # unsigned masks read as well
                assert_bits_equal(
                    _C_cpu.token_scales(3 * width, alpha, d, width, mask.to(torch.uint16), pos, cu, noise_mask), got)
            want = token_scales((3, width), alpha, d, attention_mask=mask, position_ids=pos, cu_seqlens=cu,
                                noise_mask=noise_mask)
            assert_bits_equal(got, want if isinstance(want, torch.Tensor) else torch.full((3 * width,), want))


def test_cpu_scales_with_only_a_noise_mask_use_the_row_width():
    """No attention_mask / position_ids / cu_seqlens: L is the row width; noise_mask only zeroes scales."""
    from neft_kernels import _C_cpu

    noise_mask = noise_mask_for((3, 11))
    got = _C_cpu.token_scales(33, 5.0, 64, 11, None, None, None, noise_mask)
    want = torch.where(noise_mask.reshape(-1), torch.tensor(5.0 / (11 * 64) ** 0.5, dtype=torch.float32), 0.0)
    assert_bits_equal(got, want)
    assert_bits_equal(got, token_scales((3, 11), 5.0, 64, noise_mask=noise_mask))


def test_cpu_side_inputs_of_the_wrong_shape_or_dtype_are_refused():
    from neft_kernels import _C_cpu

    with pytest.raises(RuntimeError, match="noise_mask of shape"):
        _C_cpu.token_scales(33, 5.0, 64, 11, None, None, None, torch.ones(3, 10, dtype=torch.bool))
    with pytest.raises(RuntimeError, match="attention_mask of shape"):
        _C_cpu.token_scales(33, 5.0, 64, 11, torch.ones(2, 11, dtype=torch.int64), None, None, None)
    with pytest.raises(RuntimeError, match="integer or bool"):
        _C_cpu.token_scales(33, 5.0, 64, 11, None, None, None, torch.ones(3, 11))


def test_an_extension_built_from_other_sources_is_refused_at_import():
    import types

    from neft_kernels.backends._extension import check_abi

    with pytest.raises(ImportError, match="rebuild"):
        check_abi(types.SimpleNamespace(__name__="neft_kernels._C_cpu"))  # no ABI_VERSION: an older build


def test_cuda_wrapper_follows_the_extensions_argument_order():
    """The CUDA backend's Python side, on the CPU with a stand-in extension: the call follows
    _C_cuda.forward's argument order (ids, weight, seed, offset, scale_value, per_token, alpha,
    alpha_tensor, width, side inputs, seed_tensor, bad_ids, gaussian), with tensor seeds and alphas
    passed as tensors and the host values zeroed."""
    import types

    from neft_kernels.backends._extension import cuda_functions

    calls = []
    forward, _, token_scales_fn, _ = cuda_functions(types.SimpleNamespace(
        forward=lambda *args: calls.append(args), token_scales=lambda *args: calls.append(args), backward=None,
        forward_with_grad=None))
    ids, weight, mask = torch.zeros(3, 11, dtype=torch.int64), torch.zeros(4, 8), torch.ones(3, 11)
    forward(ids, weight, 3, 5, None, 5.0, 11, mask, None, None, None, True)
    assert calls[-1][2:] == (3, 5, 0.0, True, 5.0, None, 11, mask, None, None, None, None, None, True)
    seed, alpha = torch.tensor(3), torch.tensor(2.0, dtype=torch.float64)
    forward(ids, weight, seed, 5, 0.25, alpha, 11, None, None, None, mask, False, "bad ids")
    assert calls[-1][2:] == (0, 5, 0.25, False, 0.0, alpha, 11, None, None, None, mask, seed, "bad ids", False)
    token_scales_fn(11, 33, alpha, 8, mask, None, None, None)
    assert calls[-1] == (33, 0.0, alpha, 8, 11, mask, None, None, None, torch.device("cpu"))


def test_the_id_check_uses_the_copy_alone_where_host_memory_cannot_be_mapped(monkeypatch):
    """cuda_id_check: the extension's read_back and the device's bad-id word; where the word cannot
    be made (a driver that cannot map host memory), a warning and the copy alone."""
    import types

    from neft_kernels import backends

    def word(index):
        if index == 1:
            raise RuntimeError("operation not supported")
        return 4096 + index

    ext = types.SimpleNamespace(read_back="read_back", bad_id_word=word)
    monkeypatch.setattr(backends, "_why_not", lambda name, device: None)
    monkeypatch.setattr(backends, "module", lambda name: ext)
    assert backends.cuda_id_check(torch.device("cuda", 0)) == ("read_back", 4096)
    with pytest.warns(UserWarning, match="no mapped host memory on cuda:1"):
        assert backends.cuda_id_check(torch.device("cuda", 1)) == ("read_back", None)


def test_the_bindings_side_input_views_refuse_what_they_cannot_read():
    """binding_utils.h's side_strides (shared by the CPU and CUDA bindings): shapes that are not a
    (rows, width) view or a broadcast of one, and non-integer dtypes, are refused by name."""
    from neft_kernels import _C_cpu

    ok = torch.ones(3, 11, dtype=torch.int64)
    assert _C_cpu.token_scales(33, 5.0, 64, 11, ok[:1], None, None, None).shape == (33,)  # broadcast row
    for bad, message in ((torch.ones(3, 10, dtype=torch.int64), "attention_mask of shape .* rows of width 11"),
                         (torch.ones(2, 11, dtype=torch.int64), "attention_mask of shape .* does not fit 3 rows"),
                         (torch.ones(1, 3, 11, dtype=torch.int64), r"reaches the kernel as \(rows, width\)"),
                         (torch.ones(3, 11), "attention_mask must be an integer or bool tensor")):
        with pytest.raises(RuntimeError, match=message):
            _C_cpu.token_scales(33, 5.0, 64, 11, bad, None, None, None)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("padding_idx,scale_grad_by_freq", [(None, False), (None, True), (2, False), (5, True)])
def test_cpu_backward_of_a_run_longer_than_a_threads_share_has_the_references_bits(dtype, padding_idx,
                                                                                   scale_grad_by_freq):
    """An id over most of the batch (pads without a padding_idx) is summed column block by column
    block across the threads: each element still sums its rows in token order."""
    gen = torch.Generator().manual_seed(7)
    ids = torch.randint(0, 40, (4, 300), generator=gen)
    ids[:, 60:] = 2  # one run of 960 of the 1200 tokens
    grad = torch.randn(4, 300, 200, generator=gen).to(dtype)  # 200 columns: blocks of unequal width
    grads = []
    for backend in ("cpu", "torch"):
        weight = make_weight(40, 200, dtype, "cpu").requires_grad_()
        out = noisy_embedding(ids, weight, 5.0, seed=1, padding_idx=padding_idx,
                              scale_grad_by_freq=scale_grad_by_freq, backend=backend)
        grads.append(torch.autograd.grad(out, weight, grad)[0])
    assert_bits_equal(grads[0], grads[1])
    assert (grads[0][2] == 0).all() == (padding_idx == 2)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("d", [1, 63, 64, 65, 200])
@pytest.mark.parametrize("padding_idx,scale_grad_by_freq", [(-1, False), (3, False), (3, True)])
def test_cpu_float32_backward_in_token_order_has_the_references_bits(threads, d, padding_idx, scale_grad_by_freq):
    """float32 gradients without a division by counts are added into the zeroed result in token
    order, threads taking column blocks (no sort): the same sums from +0, so the same bits, -0, NaN,
    infinities and ids outside the table included."""
    from neft_kernels import _C_cpu
    from neft_kernels.backends.reference import reference_backward

    gen = torch.Generator().manual_seed(d)
    ids = torch.randint(0, 9, (300,), generator=gen)
    ids[:4] = torch.tensor([-1, 9, 40, -7])  # outside [0, 9): no row
    ids[100:260] = 5  # a long run
    grad = torch.randn(300, d, generator=gen) * 1e3
    grad[10, 0], grad[11, :] = float("nan"), -0.0
    grad[12, -1], grad[13, -1] = float("inf"), float("-inf")
    grad[ids == 7] = -0.0  # an id whose rows are all -0: +0 in its sum
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = _C_cpu.backward(grad, ids, 9, padding_idx, scale_grad_by_freq)
    finally:
        torch.set_num_threads(previous)
    assert_bits_equal(got, reference_backward(grad, ids, 9, None if padding_idx < 0 else padding_idx,
                                              scale_grad_by_freq))


@pytest.mark.parametrize("vocab", [9, 5000])  # a counting sort where V <= 4 n (n = 300), else a comparison sort
@pytest.mark.parametrize("dtype,scale_grad_by_freq", [(torch.bfloat16, False), (torch.float16, True),
                                                      (torch.float32, True)])
def test_cpu_sorted_backward_orders_tokens_stably_by_either_sort(vocab, dtype, scale_grad_by_freq):
    """The sorted runs (16-bit weights, scale_grad_by_freq) take the tokens in stable id order from a
    counting sort or a comparison sort: the reference's bits either way, ids outside the table too."""
    from neft_kernels import _C_cpu
    from neft_kernels.backends.reference import reference_backward

    gen = torch.Generator().manual_seed(vocab)
    ids = torch.randint(0, min(vocab, 9), (300,), generator=gen) * (vocab // 9)
    ids[:5] = torch.tensor([-1, vocab, vocab + 7, -3, vocab])  # no row, wherever they sort
    ids[50:200] = 4  # a run
    grad = (torch.randn(300, 40, generator=gen) * 100).to(dtype)
    got = _C_cpu.backward(grad, ids, vocab, 2 * (vocab // 9), scale_grad_by_freq)
    assert_bits_equal(got, reference_backward(grad, ids, vocab, 2 * (vocab // 9), scale_grad_by_freq))
