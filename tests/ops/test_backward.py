"""Weight gradients of every backend against F.embedding's, with padding_idx and repeated ids."""

import pytest
import torch
import torch.nn.functional as F

from neft_kernels import noisy_embedding
from neft_kernels.backends import module
from neft_kernels.bench.measure import peak_bytes

from support.asserts import assert_bits_equal
from support.backends import backend_params, on_backends
from support.cases import make_weight

# Gradients are summed in float32 (bf16/fp16 rounded once), so they may differ from F.embedding's by
# the rounding of another summation order: a unit in the last place of the dtype, or for float32
# sums of ~100 rows a few 1e-6.
TOLERANCES = {torch.float32: dict(rtol=1e-5, atol=1e-5),
              torch.bfloat16: dict(rtol=2**-7, atol=1e-5),
              torch.float16: dict(rtol=2**-10, atol=1e-5)}


def _grads(backend, dev, dtype, padding_idx, scale_grad_by_freq, d=19, vocab=23):
    weight = make_weight(vocab, d, dtype, dev).requires_grad_()
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 6, (4, 33), generator=gen).to(dev)  # heavy repetition of 6 ids
    ids[0, :5] = vocab - 1
    grad_out = torch.randn(4, 33, d, generator=gen).to(dtype).to(dev)
    out = noisy_embedding(ids, weight, 5.0, seed=11, padding_idx=padding_idx,
                          scale_grad_by_freq=scale_grad_by_freq, backend=backend)
    out.backward(grad_out)
    ref_weight = weight.detach().float().requires_grad_()
    F.embedding(ids, ref_weight, padding_idx=padding_idx, scale_grad_by_freq=scale_grad_by_freq
                ).backward(grad_out.float())
    return weight.grad, ref_weight.grad


@on_backends()
@pytest.mark.parametrize("dtype", list(TOLERANCES))
@pytest.mark.parametrize("padding_idx", [None, 2, -1])
@pytest.mark.parametrize("scale_grad_by_freq", [False, True])
def test_weight_grad_matches_f_embedding(backend, device, dtype, padding_idx, scale_grad_by_freq):
    grad, ref = _grads(backend, device, dtype, padding_idx, scale_grad_by_freq)
    assert grad.dtype == dtype
    torch.testing.assert_close(grad.float(), ref.to(dtype).float(), **TOLERANCES[dtype])
    if padding_idx is not None:
        assert (grad[padding_idx] == 0).all()
    untouched = torch.ones(grad.shape[0], dtype=torch.bool, device=grad.device)
    untouched[:6] = False
    untouched[-1] = False
    assert (grad[untouched] == 0).all()


@on_backends(slow_interpreter=True)  # thousands of rows of one id, summed in order: seconds under the interpreter
@pytest.mark.parametrize("dtype,n", [(torch.bfloat16, 1024), (torch.float16, 4096)])
def test_low_precision_grads_accumulate_in_float32(backend, device, dtype, n):
    """n unit gradients into one row, and n / 2 into each of two: a bf16 (fp16) running sum stalls
    at 256 (2048), below n."""
    weight = torch.zeros(4, 8, dtype=dtype, device=device, requires_grad=True)
    ones = torch.ones(n, 8, dtype=dtype, device=device)
    split = torch.full((n,), 1, device=device)
    split[::2] = 2
    (two_rows,) = torch.autograd.grad(noisy_embedding(split, weight, 0.0, seed=0, backend=backend), weight, ones)
    (one_row,) = torch.autograd.grad(noisy_embedding(torch.ones_like(split), weight, 0.0, seed=0, backend=backend),
                                     weight, ones)
    assert (two_rows[1:3] == n // 2).all() and (two_rows[[0, 3]] == 0).all()
    assert (one_row[1] == n).all() and (one_row[[0, 2, 3]] == 0).all()


# The reference on CUDA sums with index_add_'s atomics: its order, and so its bits, vary.
@pytest.mark.parametrize("backend,device", [p for p in backend_params() if tuple(p.values) != ("torch", "cuda")])
@pytest.mark.parametrize("dtype", list(TOLERANCES))
@pytest.mark.parametrize("scale_grad_by_freq", [False, True])
def test_backward_is_deterministic_by_default(backend, device, dtype, scale_grad_by_freq):
    """Same bits every run without torch.use_deterministic_algorithms."""
    first, ref = _grads(backend, device, dtype, 2, scale_grad_by_freq)
    second, _ = _grads(backend, device, dtype, 2, scale_grad_by_freq)
    assert_bits_equal(first, second)
    torch.testing.assert_close(first.float(), ref.to(dtype).float(), **TOLERANCES[dtype])
    assert (first[2] == 0).all()


@on_backends("torch", "cpu", "triton", device="cpu")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_backward_never_allocates_a_float32_table(backend, device, dtype):
    """Peak memory of the backward beyond its (V, d) result: O(N) buffers, no float32 (V, d) copy."""
    vocab, d, n = 50_000, 64, 256
    grad_out = torch.randn(n, d).to(dtype)
    ids = torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(0))
    peak = peak_bytes(lambda: module(backend).backward(grad_out, ids, vocab, None, False), torch.device("cpu"))
    result = vocab * d * dtype.itemsize
    assert peak <= result + 16 * n * d + (1 << 16), (peak, result)


@on_backends()
def test_grad_flows_only_to_weight_and_noise_is_constant(backend, device):
    """d(out)/d(weight) is the lookup's: the noise contributes nothing to the gradient."""
    weight = make_weight(10, 8, torch.float32, device).requires_grad_()
    ids = torch.tensor([[1, 2, 1]], device=device)
    out = noisy_embedding(ids, weight, 50.0, seed=5, backend=backend)
    (grad,) = torch.autograd.grad(out.sum(), weight)
    expected = torch.zeros_like(grad)
    expected[1], expected[2] = 2.0, 1.0
    assert torch.equal(grad, expected)
