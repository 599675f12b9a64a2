"""Compiled kernels on a CUDA GPU against the spec (skipped without one)."""

import shutil

import pytest
import torch
import torch.nn.functional as F

from cases import KINDS, LENGTH_MODES, SEEDS, check_matches_spec_model, expected, make_weight, side_inputs
from conftest import DTYPES, assert_bits_equal, requires_cuda
from neft_kernels import NoisyEmbedding, add_noise, noisy_embedding, set_id_check
from neft_kernels.backends import module

pytestmark = [pytest.mark.gpu, requires_cuda]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["none", "mask", "packed", "both"])
def test_compiled_forward_matches_reference_and_spec_model(dtype, kind):
    weight = make_weight(1000, 4096 + 3, dtype, "cuda")
    ids = torch.randint(0, 1000, (4, 257), device="cuda")
    mask, pos = side_inputs(kind, (4, 257), "cuda")
    for seed in SEEDS:
        out = noisy_embedding(ids, weight, 5.0, seed=seed, offset=77, attention_mask=mask, position_ids=pos,
                              backend="triton")
        ref = noisy_embedding(ids, weight, 5.0, seed=seed, offset=77, attention_mask=mask, position_ids=pos,
                              backend="torch")
        assert_bits_equal(out, ref)
    assert_bits_equal(out, expected(ids, weight, 5.0, seed, 77, mask, pos, "per_sequence"))


def test_64_bit_row_offsets():
    """V * d > 2**31: rows past the int32 range are read from the right place."""
    vocab, d = (1 << 20) + 64, 2048
    weight = torch.randn(vocab, d, dtype=torch.bfloat16, device="cuda")
    ids = torch.tensor([[vocab - 1, vocab - 2, 0, (1 << 20) + 7]], device="cuda")
    out = noisy_embedding(ids, weight, 5.0, seed=3, backend="triton")
    assert_bits_equal(out, noisy_embedding(ids, weight, 5.0, seed=3, backend="torch"))
    weight.requires_grad_()
    noisy_embedding(ids, weight, 5.0, seed=3, backend="triton").float().sum().backward()
    assert (weight.grad[vocab - 1] == 1).all() and (weight.grad[1] == 0).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("deterministic", [False, True])
def test_compiled_backward_matches_f_embedding(dtype, deterministic):
    weight = make_weight(512, 1024, dtype, "cuda").requires_grad_()
    ids = torch.randint(0, 64, (8, 512), device="cuda")
    grad_out = torch.randn(8, 512, 1024, device="cuda", dtype=dtype)
    torch.use_deterministic_algorithms(deterministic)
    try:
        noisy_embedding(ids, weight, 5.0, seed=1, padding_idx=3, backend="triton").backward(grad_out)
        first = weight.grad.clone()
        weight.grad = None
        noisy_embedding(ids, weight, 5.0, seed=1, padding_idx=3, backend="triton").backward(grad_out)
    finally:
        torch.use_deterministic_algorithms(False)
    ref_weight = weight.detach().float().requires_grad_()
    F.embedding(ids, ref_weight, padding_idx=3).backward(grad_out.float())
    tol = {torch.float32: 1e-5, torch.bfloat16: 2**-7, torch.float16: 2**-10}[dtype]
    torch.testing.assert_close(first.float(), ref_weight.grad.to(dtype).float(), rtol=tol, atol=1e-4)
    assert (first[3] == 0).all()
    if deterministic:
        assert_bits_equal(weight.grad, first)


def test_module_on_cuda_without_the_id_check_needs_no_host_device_sync():
    emb = NoisyEmbedding(1000, 512, device="cuda", dtype=torch.bfloat16)
    ids = torch.randint(0, 1000, (4, 128), device="cuda")
    mask = torch.ones_like(ids)
    mask[:, 100:] = 0
    torch.manual_seed(0)
    previous = set_id_check(False)
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = emb(ids, attention_mask=mask)
        out.float().sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
        set_id_check(previous)
    torch.manual_seed(0)
    seed = int(torch.randint(-(2**63), 2**63 - 1, (), dtype=torch.int64))
    assert_bits_equal(out, noisy_embedding(ids, emb.weight, 5.0, seed=seed, attention_mask=mask, backend="torch"))


def _cuda_ext_or_skip():
    """The CUDA C++ backend is built wherever nvcc was present at install: missing then is a failure."""
    try:
        from neft_kernels import _C_cuda  # noqa: F401
    except ImportError:
        if shutil.which("nvcc"):
            raise
        pytest.skip("neft_kernels._C_cuda not built: no nvcc at install time")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [64, 4096 + 3])  # both launch shapes (fewer / more than 128 lanes)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("length_mode", LENGTH_MODES)
def test_cuda_cpp_backend_matches_spec_model(dtype, d, kind, length_mode):
    _cuda_ext_or_skip()
    check_matches_spec_model("cuda", dtype, d, kind, length_mode, "cuda")


def test_cuda_cpp_backend_int32_ids_many_tokens():
    _cuda_ext_or_skip()
    weight = make_weight(1000, 1024, torch.bfloat16, "cuda")
    ids = torch.randint(0, 1000, (16, 4096), dtype=torch.int32, device="cuda")  # 65536 tokens: grid x
    assert_bits_equal(noisy_embedding(ids, weight, 5.0, seed=5, backend="cuda"),
                      noisy_embedding(ids, weight, 5.0, seed=5, backend="triton"))


@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_cpp_backward_is_deterministic_and_matches(dtype):
    _cuda_ext_or_skip()
    weight = make_weight(512, 1024, dtype, "cuda").requires_grad_()
    ids = torch.randint(0, 64, (8, 512), device="cuda")
    grad_out = torch.randn(8, 512, 1024, device="cuda", dtype=dtype)
    (first,) = torch.autograd.grad(noisy_embedding(ids, weight, 5.0, seed=1, padding_idx=3, backend="cuda"), weight, grad_out)
    (second,) = torch.autograd.grad(noisy_embedding(ids, weight, 5.0, seed=1, padding_idx=3, backend="cuda"), weight, grad_out)
    assert_bits_equal(first, second)
    ref_weight = weight.detach().float().requires_grad_()
    F.embedding(ids, ref_weight, padding_idx=3).backward(grad_out.float())
    tol = {torch.float32: 1e-5, torch.bfloat16: 2**-7, torch.float16: 2**-10}[dtype]
    torch.testing.assert_close(first.float(), ref_weight.grad.to(dtype).float(), rtol=tol, atol=1e-4)


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_bad_ids_raise_on_cuda_and_are_never_read_with_the_check_off(backend):
    if backend == "cuda":
        _cuda_ext_or_skip()
    weight = make_weight(50, 70, torch.bfloat16, "cuda")
    bad = torch.tensor([[3, 50, -1, 7, 1 << 40]], device="cuda")
    with pytest.raises(IndexError, match="input_ids must lie in"):
        noisy_embedding(bad, weight, 5.0, seed=1, backend=backend)
    out = module(backend).forward(bad.reshape(-1), weight, 0.1, 1, 0)  # the kernel alone, no check
    assert out[[1, 2, 4]].isnan().all()
    assert not out[[0, 3]].isnan().any()
    grad = module(backend).backward(torch.ones(5, 70, device="cuda", dtype=torch.bfloat16), bad.reshape(-1),
                                    50, None, False, True)
    assert grad[3].eq(1).all() and grad[7].eq(1).all() and grad.sum() == 2 * 70


def test_add_noise_positions_need_no_sync_even_with_the_id_check_on():
    """add_noise's ids are positions, in range by construction: no aminmax, no host-device sync."""
    x = torch.randn(4, 64, 128, device="cuda", dtype=torch.bfloat16)
    mask = torch.ones(4, 64, dtype=torch.long, device="cuda")
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = add_noise(x, 5.0, seed=3, offset=1 << 48, attention_mask=mask)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert_bits_equal(out, noisy_embedding(torch.arange(256, device="cuda").view(4, 64), x.view(256, 128), 5.0,
                                           seed=3, offset=1 << 48, attention_mask=mask, backend="torch"))


def test_forward_captures_in_a_cuda_graph_with_the_id_check_on():
    """The id check (a sync) is skipped while a graph is captured; replays give the eager bits."""
    weight = make_weight(100, 256, torch.bfloat16, "cuda")
    ids = torch.randint(0, 100, (4, 32), device="cuda")
    mask = torch.ones_like(ids)
    seed = torch.tensor(11)
    eager = noisy_embedding(ids, weight, 5.0, seed=seed, attention_mask=mask)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up on a side stream, as CUDA graphs require
        noisy_embedding(ids, weight, 5.0, seed=seed, attention_mask=mask)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = noisy_embedding(ids, weight, 5.0, seed=seed, attention_mask=mask)
    graph.replay()
    torch.cuda.synchronize()
    assert_bits_equal(captured, eager)
