"""torch.library registration: opcheck, and torch.compile(fullgraph=True) with no graph break."""

import pytest
import torch
import torch._dynamo
import torch._inductor.config

from neft_kernels import NoisyEmbedding, noisy_embedding

from support.asserts import assert_bits_equal
from support.backends import on_backends, requires
from support.cases import make_weight
from support.devices import DEVICE

FWD = torch.ops.neft_kernels.noisy_embedding_fwd.default
BWD = torch.ops.neft_kernels.embedding_bwd.default
# opcheck on CPU tensors: the reference and the C++ CPU backend (the Triton interpreter would take minutes)
on_cpu_backends = on_backends("torch", "cpu", device="cpu")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@on_cpu_backends
@pytest.mark.parametrize("side", ["none", "mask", "positions", "cu_seqlens", "noise_mask"])
@pytest.mark.parametrize("gaussian", [False, True])
def test_opcheck_forward(backend, device, side, gaussian):
    weight = torch.randn(20, 12, dtype=torch.float32, requires_grad=True)
    ids = torch.randint(0, 20, (18,))
    mask = torch.randint(0, 2, (3, 6)) if side == "mask" else None
    pos = torch.tensor([0, 1, 2, 0, 1, 2]).expand(3, 6) if side == "positions" else None
    cu = torch.tensor([0, 4, 11, 18], dtype=torch.int32) if side == "cu_seqlens" else None
    noise = torch.randint(0, 2, (3, 6)).bool() if side == "noise_mask" else None
    alpha = torch.tensor(4.0, dtype=torch.float64)
    torch.library.opcheck(FWD, (ids, weight, torch.tensor(-3), alpha, 5, 0.25, 6, mask, pos, cu, noise, side != "none",
                                gaussian, 2, False, backend))


@on_cpu_backends
def test_opcheck_backward(backend, device):
    grad = torch.randn(17, 12, dtype=torch.bfloat16)
    ids = torch.randint(0, 20, (17,))
    torch.library.opcheck(BWD, (grad, ids, 20, 3, True, backend))


@on_backends("torch", "cpu", "cuda")
def test_backward_op_refuses_grad_rows_that_are_not_one_per_id(backend, device):
    """The public backward op reads grad row i for the i-th id: other shapes are refused before any
    kernel (the CUDA kernel read past the end of grad for more ids than rows)."""
    ids = torch.randint(0, 20, (5,), device=device)
    for grad in (torch.ones(3, 4, device=device), torch.ones(7, 4, device=device), torch.ones(1, 5, 4, device=device)):
        with pytest.raises(ValueError, match="one row per id"):
            BWD(grad, ids, 20, None, False, backend)


@torch._inductor.config.patch(fallback_random=True)
def test_compiled_module_reproduces_eager_with_fallback_random():
    """The seed is a graph input drawn by torch's RNG: same manual_seed, same bits; new seed, new noise."""
    emb = NoisyEmbedding(64, 24, noise_alpha=5.0)
    ids = torch.randint(0, 64, (3, 10))
    mask = torch.ones_like(ids)
    mask[0, 7:] = 0
    compiled = torch.compile(lambda i, m: emb(i, attention_mask=m) * 1, fullgraph=True)
    for seed in (7, 8):
        torch.manual_seed(seed)
        eager = emb(ids, attention_mask=mask)
        torch.manual_seed(seed)
        assert_bits_equal(compiled(ids, mask), eager)
    torch.manual_seed(7)
    assert not torch.equal(compiled(ids, mask), compiled(ids, mask))


def test_functional_op_compiles_with_backward():
    weight = torch.randn(30, 16, requires_grad=True)
    ids = torch.randint(0, 30, (2, 9))
    f = torch.compile(lambda w, s: noisy_embedding(ids, w, 5.0, seed=s, padding_idx=1).sum(), fullgraph=True)
    (grad,) = torch.autograd.grad(f(weight, torch.tensor(11)), weight)
    (ref,) = torch.autograd.grad(noisy_embedding(ids, weight, 5.0, seed=11, padding_idx=1).sum(), weight)
    assert_bits_equal(grad, ref)


@pytest.mark.slow  # inductor over a whole model, train and eval
@pytest.mark.parametrize("tied", [False, True])
def test_hugging_face_model_compiles_fullgraph_in_train_and_eval(tied):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      tie_word_embeddings=tied)
    model = transformers.LlamaForCausalLM(config).to(DEVICE)
    model.model.embed_tokens = NoisyEmbedding.from_embedding(model.model.embed_tokens, noise_alpha=5.0)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    ids = torch.randint(0, 64, (2, 16), device=DEVICE)  # rows 64.. are never looked up
    compiled = torch.compile(model, fullgraph=True)  # raises on any graph break
    model.train()
    compiled(input_ids=ids, labels=ids).loss.backward()
    grad = model.model.embed_tokens.weight.grad
    used = torch.zeros(128, dtype=torch.bool, device=DEVICE)
    used[ids.flatten()] = True
    feeds_loss = torch.zeros(128, dtype=torch.bool, device=DEVICE)
    feeds_loss[ids[:, :-1].flatten()] = True  # the last position's logits are not in the causal loss
    assert (grad[feeds_loss] != 0).any(dim=1).all()  # the lookup's gradient reached those rows
    if not tied:
        assert (grad[~used] == 0).all()  # and nothing else did
    model.eval()
    with torch.no_grad():
        eval_logits = compiled(input_ids=ids).logits
        torch.testing.assert_close(eval_logits, model(input_ids=ids).logits, rtol=1e-4, atol=1e-4)


@requires("cpu")
def test_compiled_cpu_backend_still_refuses_out_of_range_ids():
    """Python's range check is skipped inside graphs; the kernel's own check must hold, at the table's
    edges too (id V and -1: the range the compiled path's wrapper reads back from the kernel)."""
    weight = torch.randn(10, 4)
    f = torch.compile(lambda i, s: noisy_embedding(i, weight, 5.0, seed=s, backend="cpu"), fullgraph=True)
    assert f(torch.tensor([[0, 9]]), torch.tensor(0)).shape == (1, 2, 4)
    for bad, got in (([[1, 10]], r"\[1, 10\]"), ([[-1, 2]], r"\[-1, 2\]"), ([[1, 13]], r"\[1, 13\]")):
        with pytest.raises(IndexError, match=r"input_ids must lie in \[0, 10\), got values in " + got):
            f(torch.tensor(bad), torch.tensor(0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("side", ["mask", "positions", "cu_seqlens"])
def test_eager_path_matches_the_registered_ops(dtype, side):
    """Eager calls run the backend directly; compiled graphs run the custom ops: the same bits, forward and backward."""
    weight = make_weight(50, 12, dtype, DEVICE).requires_grad_()
    ids = torch.randint(0, 50, (3, 8), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    kwargs = {"mask": dict(attention_mask=torch.ones_like(ids).index_fill_(1, torch.tensor([5, 6, 7]), 0)),
              "positions": dict(position_ids=torch.tensor([0, 1, 2, 0, 1, 0, 1, 2]).to(DEVICE)),
              "cu_seqlens": dict(cu_seqlens=torch.tensor([0, 5, 13, 24], dtype=torch.int32, device=DEVICE))}[side]
    grad = torch.randn(3, 8, 12, generator=torch.Generator().manual_seed(1)).to(dtype).to(DEVICE)

    def f(w):
        return noisy_embedding(ids, w, 5.0, seed=7, padding_idx=3, **kwargs)

    eager = f(weight)
    (eager_grad,) = torch.autograd.grad(eager, weight, grad)
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)(weight)
    (compiled_grad,) = torch.autograd.grad(compiled, weight, grad)
    assert_bits_equal(compiled, eager)
    assert_bits_equal(compiled_grad, eager_grad)


def test_torch_export_gives_eager_noise_and_gradient():
    """torch.export: eval mode exports as aten.embedding; train mode exports the op with its seed
    drawn in the graph (fresh noise per call, eager's bits for the same torch.manual_seed) and alpha
    read from the module's tensor (a new value needs no re-export)."""
    torch.manual_seed(0)
    emb = NoisyEmbedding(100, 16, noise_alpha=5.0, padding_idx=0)
    ids = torch.randint(1, 100, (2, 8))
    ids[1, 5:] = 0
    mask = (ids != 0).long()
    calls = {}
    for mode in ("eval", "train"):
        emb.train(mode == "train")
        calls[mode] = torch.export.export(emb, (ids,), {"attention_mask": mask}).module()
    targets = {str(n.target) for n in calls["eval"].graph.nodes if n.op == "call_function"}
    assert "aten.embedding.default" in targets and not any("neft_kernels" in t for t in targets)
    assert_bits_equal(calls["eval"](ids, attention_mask=mask), torch.nn.functional.embedding(ids, emb.weight, 0))

    exported = calls["train"]
    outs = []
    for module in (exported, emb):
        torch.manual_seed(5)
        out = module(ids, attention_mask=mask)
        (grad,) = torch.autograd.grad(out, [p for p in module.parameters()], torch.ones_like(out))
        outs.append((out.detach(), grad))
    assert_bits_equal(outs[0][0], outs[1][0])
    assert_bits_equal(outs[0][1], outs[1][1])
    assert not torch.equal(exported(ids, attention_mask=mask), outs[0][0])  # a new seed each call
    emb.noise_alpha = 0.0
    assert_bits_equal(exported(ids, attention_mask=mask), torch.nn.functional.embedding(ids, emb.weight, 0))

    # Exported at alpha 0 (a schedule's warm-up): the op is in the graph, and a later alpha is read.
    at_zero = torch.export.export(emb, (ids,), {"attention_mask": mask}).module()
    assert torch.equal(at_zero(ids, attention_mask=mask), torch.nn.functional.embedding(ids, emb.weight, 0))
    emb.noise_alpha = 5.0
    torch.manual_seed(5)
    assert_bits_equal(at_zero(ids, attention_mask=mask), outs[1][0])


def test_torch_export_of_a_patched_hugging_face_model_in_train_mode():
    """patch_model's side-input hooks survive export: the exported train-mode model holds the op and
    gives eager's logits (per-sequence L from the attention_mask) for the same torch.manual_seed."""
    pytest.importorskip("transformers")
    from neft_kernels import patch_model

    from support.hf_models import build

    model = build("llama")
    model.config.use_cache = False  # transformers' cache object is not an export output
    ids = torch.randint(2, 90, (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    patch_model(model, noise_alpha=5.0)
    model.train()
    kwargs = dict(input_ids=ids, attention_mask=mask, use_cache=False)
    exported = torch.export.export(model, (), kwargs)
    assert any(n.target == FWD for n in exported.graph.nodes)
    logits = []
    for module in (exported.module(), model):
        torch.manual_seed(3)
        logits.append(module(**kwargs).logits)
    assert_bits_equal(logits[0], logits[1])


@pytest.mark.parametrize("alpha", [float("nan"), -1.0, float("inf")])
def test_a_compiled_call_refuses_a_cpu_alpha_tensor_that_eager_refuses(alpha):
    """A CPU alpha tensor is a graph input, not seen by the call-time check: the op checks it."""
    ids, weight = torch.randint(0, 20, (2, 6)), torch.randn(20, 8)

    def f(a):
        return noisy_embedding(ids, weight, a, seed=3)

    for call in (f, torch.compile(f, backend="aot_eager", fullgraph=True)):
        with pytest.raises(ValueError, match="noise_alpha must be finite and >= 0"):
            call(torch.tensor(alpha))


@pytest.mark.parametrize("alpha", [5.0, 0.0])
def test_torch_jit_trace_of_a_noisy_module_in_train_mode_is_refused(alpha):
    """A trace would keep the seed the module drew: every call the same noise. Eval mode traces."""
    emb = NoisyEmbedding(20, 8, noise_alpha=alpha)
    ids = torch.randint(0, 20, (2, 6))
    with pytest.raises(RuntimeError, match="torch.jit.trace.*eval mode"):
        torch.jit.trace(emb.train(), (ids,))
    traced = torch.jit.trace(emb.eval(), (ids,))
    emb.train()
    assert_bits_equal(traced(ids), torch.nn.functional.embedding(ids, emb.weight))
