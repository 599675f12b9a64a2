"""Compiled kernels on a CUDA GPU (skipped without one), beyond the spec-model grid
(tests/kernels/test_spec_equivalence.py): large shapes, 64-bit offsets, backward, no host-device
sync, bad ids, CUDA graphs and reduce-overhead compile."""


import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from neft_kernels import NoisyEmbedding, add_noise, noisy_embedding
from neft_kernels.backends import module

from support.asserts import DTYPES, assert_bits_equal, assert_uniform_noise_of_alpha
from support.backends import kernel_alone, on_backends, requires
from support.cases import SEEDS, expected, make_weight, scale_cases, side_inputs
from support.devices import requires_cuda

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


@on_backends("triton", "cuda", device="cuda")
def test_64_bit_row_offsets(backend, device):
    """V * d > 2**31: rows past the int32 range are read from the right place, and their gradient
    written there (the CUDA C++ kernels too: 16-byte lanes at d = 2048)."""
    vocab, d = (1 << 20) + 64, 2048
    weight = torch.randn(vocab, d, dtype=torch.bfloat16, device="cuda")
    ids = torch.tensor([[vocab - 1, vocab - 2, 0, (1 << 20) + 7]], device="cuda")
    out = noisy_embedding(ids, weight, 5.0, seed=3, backend=backend)
    assert_bits_equal(out, noisy_embedding(ids, weight, 5.0, seed=3, backend="torch"))
    weight.requires_grad_()
    noisy_embedding(ids, weight, 5.0, seed=3, backend=backend).float().sum().backward()
    assert (weight.grad[vocab - 1] == 1).all() and (weight.grad[(1 << 20) + 7] == 1).all()
    assert (weight.grad[1] == 0).all() and weight.grad.sum() == 4 * d


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [1024, 1152])
def test_compiled_backward_matches_f_embedding(dtype, d):
    """Same bits run to run; 64 ids over 4096 tokens: runs of ~64 rows summed in order."""
    weight = make_weight(512, d, dtype, "cuda").requires_grad_()
    ids = torch.randint(0, 64, (8, 512), device="cuda")
    grad_out = torch.randn(8, 512, d, device="cuda", dtype=dtype)
    noisy_embedding(ids, weight, 5.0, seed=1, padding_idx=3, backend="triton").backward(grad_out)
    first = weight.grad.clone()
    weight.grad = None
    noisy_embedding(ids, weight, 5.0, seed=1, padding_idx=3, backend="triton").backward(grad_out)
    ref_weight = weight.detach().float().requires_grad_()
    F.embedding(ids, ref_weight, padding_idx=3).backward(grad_out.float())
    tol = {torch.float32: 1e-5, torch.bfloat16: 2**-7, torch.float16: 2**-10}[dtype]
    torch.testing.assert_close(first.float(), ref_weight.grad.to(dtype).float(), rtol=tol, atol=1e-4)
    assert (first[3] == 0).all()
    assert_bits_equal(weight.grad, first)


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_backward_needs_no_float32_table(backend):
    """bf16 at a Gemma-sized vocabulary: the backward's peak beyond its result stays far below a float32
    (V, d) buffer (the result itself is V*d*2 bytes)."""
    vocab, d, n = 262144, 1152, 8192
    ids = torch.randint(0, vocab, (n,), device="cuda")
    grad = torch.randn(n, d, device="cuda", dtype=torch.bfloat16)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    result = module(backend).backward(grad, ids, vocab, None, False)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base - result.numel() * result.element_size()
    assert extra < 64 * n + (8 << 20), extra  # index buffers only; a float32 table would be 1.2 GB


@on_backends("triton", "cuda", device="cuda")
@pytest.mark.parametrize("side", ["mask", "positions", "cu_seqlens", "mask+positions"])
def test_default_training_path_never_syncs(backend, device, side):
    """Forward and backward with the id check on: no host-device sync, and the spec v1 bits."""
    emb = NoisyEmbedding(1000, 512, device="cuda", dtype=torch.bfloat16, backend=backend)
    ids = torch.randint(0, 1000, (4, 128), device="cuda")
    mask = torch.ones_like(ids)
    mask[:, 100:] = 0
    pos = torch.arange(128, device="cuda").repeat(4, 1)
    pos[:, 60:] -= 60
    kwargs = {"mask": dict(attention_mask=mask), "positions": dict(position_ids=pos),
              "cu_seqlens": dict(cu_seqlens=torch.tensor([0, 70, 300, 512], dtype=torch.int32, device="cuda")),
              "mask+positions": dict(attention_mask=mask, position_ids=pos)}[side]
    emb(ids, **kwargs).float().sum().backward()  # first call: allocations, Triton compiles
    torch.manual_seed(0)
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = emb(ids, **kwargs)
        out.float().sum().backward()
        emb(ids, **kwargs)  # the next call reads the previous id record, still without waiting
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.manual_seed(0)
    seed = int(torch.randint(-(2**63), 2**63 - 1, (), dtype=torch.int64))
    assert_bits_equal(out, noisy_embedding(ids, emb.weight, 5.0, seed=seed, backend="torch", **kwargs))


def test_a_cuda_generator_draws_eager_seeds_on_the_device_without_a_sync():
    """Eagerly, a CUDA generator's seed stays a device tensor that the kernel reads, reproducibly."""
    gen = torch.Generator(device="cuda")
    emb = NoisyEmbedding(1000, 256, device="cuda", generator=gen)
    ids = torch.randint(0, 1000, (2, 64), device="cuda")
    emb(ids)  # first call: allocations, compiles
    gen.manual_seed(3)
    torch.cuda.set_sync_debug_mode("error")
    try:
        first, second = emb(ids), emb(ids)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    gen.manual_seed(3)
    assert_bits_equal(emb(ids), first)
    assert not torch.equal(first, second)
    gen.manual_seed(3)
    seed = torch.randint(-(2**63), 2**63 - 1, (), dtype=torch.int64, device="cuda", generator=gen)
    assert_bits_equal(first, noisy_embedding(ids, emb.weight, 5.0, seed=int(seed), backend="torch"))


@requires("cuda")
def test_cuda_cpp_backend_int32_ids_many_tokens():
    weight = make_weight(1000, 1024, torch.bfloat16, "cuda")
    ids = torch.randint(0, 1000, (16, 4096), dtype=torch.int32, device="cuda")  # 65536 tokens: grid x
    assert_bits_equal(noisy_embedding(ids, weight, 5.0, seed=5, backend="cuda"),
                      noisy_embedding(ids, weight, 5.0, seed=5, backend="triton"))


@requires("cuda")
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_cpp_backward_is_deterministic_and_matches(dtype):
    weight = make_weight(512, 1024, dtype, "cuda").requires_grad_()
    ids = torch.randint(0, 64, (8, 512), device="cuda")
    grad_out = torch.randn(8, 512, 1024, device="cuda", dtype=dtype)
    first, second = (torch.autograd.grad(noisy_embedding(ids, weight, 5.0, seed=1, padding_idx=3, backend="cuda"),
                                         weight, grad_out)[0] for _ in range(2))
    assert_bits_equal(first, second)
    ref_weight = weight.detach().float().requires_grad_()
    F.embedding(ids, ref_weight, padding_idx=3).backward(grad_out.float())
    tol = {torch.float32: 1e-5, torch.bfloat16: 2**-7, torch.float16: 2**-10}[dtype]
    torch.testing.assert_close(first.float(), ref_weight.grad.to(dtype).float(), rtol=tol, atol=1e-4)


@requires("cuda", "cuda")
def test_cuda_binding_refuses_arguments_its_kernels_would_misread():
    """The extension's own checks (the public ops call it directly): one grad row per id (the backward
    kernel reads row order[s] for each id: fewer rows were read past the end), a seed tensor of one
    value (an empty one was taken for no seed tensor: seed 0)."""
    from neft_kernels import _C_cuda

    ids = torch.randint(0, 20, (5,), device="cuda")
    for grad in (torch.ones(3, 4, device="cuda"), torch.ones(1, 5, 4, device="cuda")):
        with pytest.raises(RuntimeError, match="one grad row per id|grad must be"):
            _C_cuda.backward(grad, ids, 20, -1, False)
    weight = torch.randn(20, 8, device="cuda")
    with pytest.raises(RuntimeError, match="seed tensor"):
        _C_cuda.forward(ids, weight, 0, 0, 0.5, False, 0.0, None, 5, None, None, None, None,
                        torch.empty(0, dtype=torch.int64, device="cuda"), None, False)


@requires("cuda", "cuda")
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_cuda_binding_refuses_tensors_on_another_gpu():
    """Pointers from another GPU would be dereferenced on the weight's (a fault, or reads across the bus)."""
    from neft_kernels import _C_cuda

    weight = torch.randn(20, 8, device="cuda:0")
    ids = torch.randint(0, 20, (5,), device="cuda:1")
    with pytest.raises(RuntimeError, match="input_ids on cuda:1 but weight on cuda:0"):
        _C_cuda.forward(ids, weight, 0, 0, 0.5, False, 0.0, None, 5, None, None, None, None, None, None, False)
    with pytest.raises(RuntimeError, match="seed tensor"):
        _C_cuda.forward(ids.to("cuda:0"), weight, 0, 0, 0.5, False, 0.0, None, 5, None, None, None, None,
                        torch.tensor(3, device="cuda:1"), None, False)
    with pytest.raises(RuntimeError, match="ids on cuda:1 but grad on cuda:0"):
        _C_cuda.backward(torch.ones(5, 8, device="cuda:0"), ids, 20, -1, False)


@on_backends("triton", "cuda", device="cuda")
def test_bad_ids_raise_on_cuda_without_a_sync_and_are_never_read(backend, device):
    """The kernel records bad ids; a later call (or the backward) raises once the record has landed."""
    weight = make_weight(50, 70, torch.bfloat16, "cuda").requires_grad_()
    good = torch.tensor([[3, 7]], device="cuda")
    bad = torch.tensor([[3, 50, -1, 7, 1 << 40]], device="cuda")
    out = noisy_embedding(bad, weight, 5.0, seed=1, backend=backend)  # no sync: returns at once
    assert out[0, [1, 2, 4]].isnan().all()
    torch.cuda.synchronize()
    with pytest.raises(IndexError, match=r"input_ids must lie in \[0, 50\), got values in \[-1, 1099511627776\]"):
        noisy_embedding(good, weight, 5.0, seed=1, backend=backend)
    noisy_embedding(good, weight, 5.0, seed=1, backend=backend)  # raised once, then cleared
    torch.cuda.synchronize()  # (triton) that call's read-back lands first, so the next call's copy is issued
    out = noisy_embedding(bad, weight, 5.0, seed=1, backend=backend)
    torch.cuda.synchronize()
    with pytest.raises(IndexError, match="input_ids must lie in"):
        out.float().sum().backward()  # the backward raises too
    out = kernel_alone(backend, bad.reshape(-1), weight.detach())
    assert out[[1, 2, 4]].isnan().all() and not out[[0, 3]].isnan().any()
    grad = module(backend).backward(torch.ones(5, 70, device="cuda", dtype=torch.bfloat16), bad.reshape(-1),
                                    50, None, False)
    assert grad[3].eq(1).all() and grad[7].eq(1).all() and grad.sum() == 2 * 70


@requires("cuda", "cuda")
def test_bad_ids_raise_an_index_error_under_sync_debug_mode_error():
    """The raising call's one wait is deliberate: under set_sync_debug_mode("error") the user still
    gets the IndexError naming the bad ids (the mode is suspended for that wait and restored)."""
    weight = make_weight(50, 64, torch.bfloat16, "cuda")
    noisy_embedding(torch.tensor([[1]], device="cuda"), weight, 5.0, seed=1, backend="cuda")  # the flag exists
    noisy_embedding(torch.tensor([[1, 60]], device="cuda"), weight, 5.0, seed=1, backend="cuda")
    good = torch.tensor([[1]], device="cuda")  # made before: a copy from pageable memory syncs
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with pytest.raises(IndexError, match=r"got values in \[60, 60\]"):
            noisy_embedding(good, weight, 5.0, seed=1, backend="cuda")
        assert torch.cuda.get_sync_debug_mode() == 2
    finally:
        torch.cuda.set_sync_debug_mode("default")


@requires("cuda", "cuda")
def test_bad_ids_in_a_replayed_graph_raise_at_the_next_eager_call():
    """The CUDA kernel sets the id check's host word on replays too: the first eager call after a
    replay that met bad ids raises, naming them."""
    weight = make_weight(50, 64, torch.bfloat16, "cuda")
    ids = torch.tensor([[1, 2, 3]], device="cuda")
    noisy_embedding(ids, weight, 5.0, seed=1, backend="cuda")  # the flag exists before capture
    graph, _ = _capture(lambda: noisy_embedding(ids, weight, 5.0, seed=1, backend="cuda"))
    graph.replay()
    torch.cuda.synchronize()
    noisy_embedding(ids, weight, 5.0, seed=1, backend="cuda")  # good ids replayed: nothing to raise
    ids.copy_(torch.tensor([[1, 77, 3]]))
    graph.replay()
    torch.cuda.synchronize()
    with pytest.raises(IndexError, match=r"got values in \[77, 77\]"):
        noisy_embedding(torch.tensor([[1]], device="cuda"), weight, 5.0, seed=1, backend="cuda")


def test_add_noise_positions_need_no_sync_even_with_the_id_check_on():
    """add_noise's ids are positions, in range by construction: no check, no host-device sync."""
    x = torch.randn(4, 64, 128, device="cuda", dtype=torch.bfloat16)
    mask = torch.ones(4, 64, dtype=torch.long, device="cuda")
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = add_noise(x, 5.0, seed=3, offset=1 << 48, attention_mask=mask)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert_bits_equal(out, noisy_embedding(torch.arange(256, device="cuda").view(4, 64), x.view(256, 128), 5.0,
                                           seed=3, offset=1 << 48, attention_mask=mask, backend="torch"))


def _capture(fn):
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up on a side stream, as CUDA graphs require
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        result = fn()
    return graph, result


@on_backends("triton", "cuda", device="cuda")
def test_cuda_graph_replays_draw_fresh_spec_v1_noise(backend, device):
    """A device seed drawn inside the graph: every replay has its own seed and that seed's spec v1 bits."""
    weight = make_weight(100, 256, torch.bfloat16, "cuda")
    ids = torch.randint(0, 100, (4, 32), device="cuda")
    mask = torch.ones_like(ids)
    mask[0, 20:] = 0

    def step():
        seed = torch.randint(-(2**63), 2**63 - 1, (), dtype=torch.int64, device="cuda")
        return seed, noisy_embedding(ids, weight, 5.0, seed=seed, attention_mask=mask, backend=backend)

    graph, (seed, out) = _capture(step)
    seen = set()
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        s = int(seed)
        seen.add(s)
        assert_bits_equal(out, noisy_embedding(ids, weight, 5.0, seed=s, attention_mask=mask, backend="torch"))
    assert len(seen) == 3


def test_captured_training_step_of_a_patched_model_gets_new_noise_per_replay():
    """A patched HF model's whole step (forward + backward) in one CUDA graph: the embedding's seed is
    drawn on the device, so replays differ, and torch.manual_seed reproduces them."""
    transformers = pytest.importorskip("transformers")
    from neft_kernels import patch_model

    config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = patch_model(transformers.LlamaForCausalLM(config).cuda().train(), 5.0)
    emb = model.get_input_embeddings()
    captured = {}
    emb.register_forward_hook(lambda m, a, out: captured.__setitem__("out", out))
    ids = torch.randint(0, 128, (2, 16), device="cuda")

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss

    graph, _ = _capture(step)
    outs = []
    for seed in (1, 2, 1):
        torch.manual_seed(seed)
        graph.replay()
        torch.cuda.synchronize()
        outs.append(captured["out"].clone())
    assert not torch.equal(outs[0], outs[1])
    assert_bits_equal(outs[0], outs[2])


def test_reduce_overhead_compile_of_a_patched_model_runs_and_draws_new_noise():
    transformers = pytest.importorskip("transformers")
    from neft_kernels import patch_model

    config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = patch_model(transformers.LlamaForCausalLM(config).cuda().train(), 5.0)
    ids = torch.randint(0, 128, (2, 16), device="cuda")
    mask = torch.ones_like(ids)
    step = torch.compile(lambda i, m: model(input_ids=i, attention_mask=m, labels=i).loss, mode="reduce-overhead")
    losses = []
    for _ in range(4):
        # As a training loop does: without it, gradients accumulated into a graph's output fail in torch
        # itself (the unpatched model fails the same way at its second step).
        model.zero_grad(set_to_none=True)
        torch.compiler.cudagraph_mark_step_begin()
        loss = step(ids, mask)
        loss.backward()
        losses.append(float(loss))
    assert len(set(losses)) == 4  # fresh noise each call (no optimizer step: only the noise differs)


@pytest.mark.parametrize("width", [1, 7, 1500, 2 * 4096 + 37, 300 * 4096 + 5])
def test_cuda_token_scales_match_the_reference(width):
    """The CUDA scales kernels against lengths.token_scales: rows of one tile, of three, and of 301
    (their neighbours' summaries read in two windows of 256 tiles)."""
    from neft_kernels.lengths import token_scales

    backend = pytest.importorskip("neft_kernels.backends.cuda")
    for mask, pos, cu in scale_cases(width):
        mask, pos, cu = (None if t is None else t.cuda() for t in (mask, pos, cu))
        noise_mask = None if mask is None else (torch.arange(width, device="cuda") % 3 == 0)[None].expand(3, width)
        for alpha in (5.0, torch.tensor(3.25, dtype=torch.float64, device="cuda")):
            got = backend.token_scales(width, 3 * width, alpha, 64, mask, pos, cu, noise_mask, torch.device("cuda"))
            want = token_scales((3, width), alpha, 64, attention_mask=mask, position_ids=pos, cu_seqlens=cu,
                                noise_mask=noise_mask, device=torch.device("cuda"))
            assert_bits_equal(got, want if isinstance(want, torch.Tensor) else torch.full_like(got, want))


@requires("cuda", "cuda")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,d", [((8, 2048), 576), ((1, 3 * 4096 + 37), 4096), ((2, 2 * 4096 + 5), 9)])
def test_cuda_forward_overlapping_its_scales_launches_has_the_references_bits(dtype, shape, d):
    """On Hopper the rows kernel may start while the scales kernel runs, and the scales kernel while
    the tile summaries' runs (programmatic dependent launch; other GPUs launch in order): padded rows
    of one tile, packed rows of several, eager and replayed in a CUDA graph."""
    from neft_kernels import _C_cuda

    hopper = torch.cuda.get_device_capability()[0] == 9
    assert _C_cuda.overlaps_launches(torch.cuda.current_device()) == hopper
    weight = make_weight(5000, d, dtype, "cuda")
    ids = torch.randint(0, 5000, shape, device="cuda")
    mask, pos = side_inputs("both", shape, "cuda")

    def call(backend: str) -> torch.Tensor:
        return noisy_embedding(ids, weight, 5.0, seed=11, attention_mask=mask, position_ids=pos, backend=backend)

    want = call("torch")
    assert_bits_equal(call("cuda"), want)
    graph, out = _capture(lambda: call("cuda"))
    for _ in range(2):
        out.zero_()
        graph.replay()
        assert_bits_equal(out, want)


@requires("cuda", "cuda")
def test_neft_kernels_cuda_pdl_0_launches_in_order():
    code = "import torch; from neft_kernels import _C_cuda; print(_C_cuda.overlaps_launches(0))"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "NEFT_KERNELS_CUDA_PDL": "0"})
    assert res.returncode == 0 and res.stdout.split() == ["False"], res.stderr


@requires("cuda", "cuda")
@pytest.mark.parametrize("padding_idx,scale_grad_by_freq", [(None, False), (3, True)])
def test_cuda_native_node_gives_the_python_functions_gradient(padding_idx, scale_grad_by_freq):
    """The CUDA extension's eager calls attach NoisyEmbeddingBackward (csrc/autograd_node.h): the same
    rows and gradient bits as the same backend through the Python Function (taken for a seed tensor
    on the GPU, which int() would sync), and F.embedding's second derivative (NoisyEmbeddingGradBackward)."""
    ids = torch.randint(0, 6, (2, 3, 11), device="cuda", dtype=torch.int32)
    grad = torch.randn(2, 3, 20, 11, device="cuda").to(torch.bfloat16).transpose(-1, -2)
    outs, grads = [], []
    device_seed = torch.tensor(7, device="cuda")
    for seed, node in ((7, "NoisyEmbeddingBackward"), (device_seed, "_NoisyEmbeddingFunctionBackward")):
        weight = make_weight(9, 20, torch.bfloat16, "cuda").requires_grad_()
        out = noisy_embedding(ids, weight, 5.0, seed=seed, padding_idx=padding_idx,
                              scale_grad_by_freq=scale_grad_by_freq, backend="cuda")
        assert out.grad_fn.name() == node
        out.backward(grad)
        outs.append(out)
        grads.append(weight.grad)
    assert_bits_equal(outs[0], outs[1])
    assert_bits_equal(grads[0], grads[1])
    weight = make_weight(9, 20, torch.float32, "cuda")
    noise = noisy_embedding(ids, weight, 5.0, seed=7, backend="cuda") - F.embedding(ids, weight)
    hessian = torch.autograd.functional.hessian(
        lambda w: noisy_embedding(ids, w, 5.0, seed=7, padding_idx=padding_idx, backend="cuda").pow(2).sum(), weight)
    expected = torch.autograd.functional.hessian(
        lambda w: (F.embedding(ids, w, padding_idx=padding_idx) + noise).pow(2).sum(), weight)
    assert_bits_equal(hessian, expected)


def test_reduce_overhead_compile_as_the_first_use_of_the_op_on_a_device_runs():
    """The id check's device buffer is made while the graph is traced: made at the first run, it would
    come from the CUDA-graph pool, which refuses tensors that outlive the run. A fresh process, so that
    no earlier test has made it."""
    code = """
import torch
from neft_kernels import noisy_embedding
weight = torch.randn(64, 32, device="cuda", requires_grad=True)
ids = torch.randint(0, 64, (2, 16), device="cuda")
step = torch.compile(lambda i, s: noisy_embedding(i, weight, 5.0, seed=s).square().sum(), mode="reduce-overhead")
for s in range(3):
    weight.grad = None
    torch.compiler.cudagraph_mark_step_begin()
    step(ids, torch.tensor(s, device="cuda")).backward()
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]


@on_backends("triton", "cuda", device="cuda")
def test_a_device_alpha_gives_the_float_alphas_bits_without_a_sync(backend, device):
    weight = make_weight(300, 256, torch.bfloat16, "cuda")
    ids = torch.randint(0, 300, (4, 64), device="cuda")
    mask, _ = side_inputs("mask", (4, 64), "cuda")
    alpha = torch.tensor(3.5, dtype=torch.float64, device="cuda")
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = [noisy_embedding(ids, weight, alpha, seed=9, attention_mask=m, backend=backend) for m in (None, mask)]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for out, m in zip(got, (None, mask), strict=True):
        assert_bits_equal(out, noisy_embedding(ids, weight, 3.5, seed=9, attention_mask=m, backend="torch"))


@pytest.mark.parametrize("captured_alpha", [5.0, 0.0])
def test_a_captured_graph_replays_with_the_alpha_set_before_each_replay(captured_alpha):
    """alpha as data: the module's alpha tensor is read by the kernels at each replay, also in a
    graph captured at alpha 0 (the first steps of a schedule with warm-up)."""
    emb = NoisyEmbedding(300, 512, noise_alpha=captured_alpha, device="cuda").train()
    ids = torch.randint(0, 300, (4, 64), device="cuda")
    clean = emb.weight[ids].detach()
    graph, out = _capture(lambda: emb(ids))
    for alpha in (5.0, 0.5, 20.0):
        emb.noise_alpha = alpha
        graph.replay()
        assert_uniform_noise_of_alpha(out, clean, alpha, 64)
    emb.noise_alpha = 0.0
    graph.replay()
    assert torch.equal(out, clean)


def test_reduce_overhead_compile_uses_the_new_alpha_without_recompiling():
    import torch._dynamo.testing

    torch._dynamo.reset()
    emb = NoisyEmbedding(300, 512, noise_alpha=5.0, device="cuda").train()
    ids = torch.randint(0, 300, (4, 64), device="cuda")
    clean = emb.weight[ids].detach()
    counter = torch._dynamo.testing.CompileCounterWithBackend("inductor")
    step = torch.compile(emb, backend=counter, fullgraph=True)
    frames = []
    for alpha in (5.0, 0.5, 20.0, 2.0):
        emb.noise_alpha = alpha
        out = step(ids).detach()
        assert_uniform_noise_of_alpha(out, clean, alpha, 64)
        frames.append(counter.frame_count)
    assert frames == frames[:1] * 4
    reduce_overhead = torch.compile(emb, mode="reduce-overhead", fullgraph=True)
    for alpha in (5.0, 0.5, 20.0):
        emb.noise_alpha = alpha
        for _ in range(3):  # warm-up runs, then CUDA-graph replays
            out = reduce_overhead(ids).detach().clone()
        assert_uniform_noise_of_alpha(out, clean, alpha, 64)
