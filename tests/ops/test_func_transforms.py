"""torch.func transforms over the op and the module: ``grad``/``vjp`` through the autograd rule,
``jvp``/``jacfwd`` and forward-mode AD through its tangent (the weight's rows), and ``vmap`` one
call per example, with the noise the batched call gives (``randomness="different"``) or every
example the first's (``"same"``); vmap's default randomness, ``"error"``, is refused."""

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch.func import functional_call, grad, jacfwd, jacrev, jvp, vmap

from neft_kernels import NoisyEmbedding, add_noise, noisy_embedding
from neft_kernels.spec import num_lanes

from support.asserts import assert_bits_equal
from support.backends import on_backends

V, D, B, L = 40, 12, 3, 5
SEED = 7


def _inputs(device: str):
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(V, D, generator=gen).to(device)
    ids = torch.randint(0, V, (B, L), generator=gen).to(device)
    mask = torch.ones(B, L, dtype=torch.long, device=device)
    mask[1, 3:] = 0
    return weight, ids, mask


def _op(backend, **kw):
    return lambda w, i, m: noisy_embedding(i, w, 5.0, seed=SEED, attention_mask=m, backend=backend, **kw)


@on_backends()
@pytest.mark.parametrize("grad_kw", [{}, {"padding_idx": 1, "scale_grad_by_freq": True}], ids=["plain", "pad-freq"])
def test_grad_is_the_autograd_gradient(backend, device, grad_kw):
    weight, ids, mask = _inputs(device)
    f = _op(backend, **grad_kw)
    leaf = weight.clone().requires_grad_()
    (f(leaf, ids, mask) ** 2).sum().backward()
    assert_bits_equal(grad(lambda w: (f(w, ids, mask) ** 2).sum())(weight), leaf.grad)


@on_backends()
def test_vmap_different_gives_each_example_the_batched_calls_noise(backend, device):
    weight, ids, mask = _inputs(device)
    f = _op(backend)
    assert_bits_equal(vmap(lambda i, m: f(weight, i, m), randomness="different")(ids, mask), f(weight, ids, mask))
    # the batch along another dim of one input, the mask shared by every example
    out = vmap(lambda i: f(weight, i, mask[0]), in_dims=1, randomness="different")(ids.T.contiguous())
    assert_bits_equal(out, f(weight, ids, mask[0].expand(B, L)))


@on_backends()
def test_vmap_same_gives_every_example_the_first_examples_counters(backend, device):
    weight, ids, mask = _inputs(device)
    f = _op(backend)
    out = vmap(lambda i, m: f(weight, i, m), randomness="same")(ids, mask)
    for b in range(B):
        assert_bits_equal(out[b], f(weight, ids[b], mask[b]))


def test_vmap_with_its_default_randomness_is_refused():
    weight, ids, mask = _inputs("cpu")
    with pytest.raises(RuntimeError, match="randomness='different'"):
        vmap(lambda i, m: _op("auto")(weight, i, m))(ids, mask)


@on_backends()
def test_per_sample_gradients_by_vmap_of_grad(backend, device):
    """vmap(grad(loss)) over examples: each example's gradient, with its noise in the batch."""
    weight, ids, mask = _inputs(device)

    def loss(w, i, m, offset=0):
        return (noisy_embedding(i[None], w, 5.0, seed=SEED, offset=offset, attention_mask=m[None],
                                backend=backend) ** 2).sum()

    per_sample = vmap(grad(loss), in_dims=(None, 0, 0), randomness="different")(weight, ids, mask)
    for b in range(B):
        assert_bits_equal(per_sample[b], grad(loss)(weight, ids[b], mask[b], b * L * num_lanes(D)))


@on_backends()
def test_vmap_over_stacked_weights(backend, device):
    """An ensemble: one weight per example, the same ids."""
    weight, ids, mask = _inputs(device)
    weights = torch.stack([weight, weight.flip(0)])
    f = _op(backend)
    out = vmap(lambda w: f(w, ids, mask), randomness="different")(weights)
    for b in range(2):
        assert_bits_equal(out[b], noisy_embedding(ids, weights[b], 5.0, seed=SEED, offset=b * B * L * num_lanes(D),
                                                  attention_mask=mask, backend=backend))


@on_backends()
def test_jvp_is_the_lookup_of_the_tangent_and_jacfwd_is_jacrev(backend, device):
    weight, ids, mask = _inputs(device)
    f = _op(backend, padding_idx=1)
    tangent = torch.randn(V, D, generator=torch.Generator().manual_seed(1)).to(device)
    out, out_tangent = jvp(lambda w: f(w, ids, mask), (weight,), (tangent,))
    assert_bits_equal(out, f(weight, ids, mask))
    assert_bits_equal(out_tangent, F.embedding(ids, tangent))
    small = lambda w: f(w, ids[:1, :2], mask[:1, :2])  # noqa: E731
    assert_bits_equal(jacfwd(small, randomness="same")(weight), jacrev(small)(weight))


@on_backends()
def test_a_dual_weight_gets_the_lookup_of_its_tangent(backend, device):
    """Forward-mode AD outside torch.func: the native nodes (cpu, cuda) as the Function's jvp."""
    weight, ids, mask = _inputs(device)
    tangent = torch.randn(V, D, generator=torch.Generator().manual_seed(1)).to(device)
    with fwAD.dual_level():
        out, out_tangent = fwAD.unpack_dual(_op(backend)(fwAD.make_dual(weight, tangent), ids, mask))
    assert_bits_equal(out, _op(backend)(weight, ids, mask))
    assert_bits_equal(out_tangent, F.embedding(ids, tangent))


@on_backends()
def test_add_noise_under_vmap_is_the_batched_call(backend, device):
    weight, ids, mask = _inputs(device)
    x = F.embedding(ids, weight)
    f = lambda x_, m: add_noise(x_, 5.0, seed=SEED, attention_mask=m, backend=backend)  # noqa: E731
    assert_bits_equal(vmap(f, randomness="different")(x, mask), f(x, mask))


def test_module_per_sample_gradients_sum_to_the_batch_gradient():
    """NoisyEmbedding through functional_call: one seed per call, so vmap's examples get the batch's noise."""
    weight, ids, mask = _inputs("cpu")
    emb = NoisyEmbedding(V, D, noise_alpha=5.0, _weight=weight.clone()).train()

    def loss(params, i, m):
        return (functional_call(emb, params, (i,), {"attention_mask": m}) ** 2).sum()

    torch.manual_seed(3)
    per_sample = vmap(grad(loss), in_dims=(None, 0, 0), randomness="different")({"weight": weight}, ids, mask)
    torch.manual_seed(3)
    batch = grad(loss)({"weight": weight}, ids, mask)
    torch.testing.assert_close(per_sample["weight"].sum(0), batch["weight"])


@on_backends()
@pytest.mark.parametrize("grad_kw", [{}, {"padding_idx": 1, "scale_grad_by_freq": True}], ids=["plain", "pad-freq"])
def test_second_derivatives_are_f_embeddings(backend, device, grad_kw):
    """The gradient is linear in the output gradient; its own backward is F.embedding's double
    backward: Hessians (autograd's and torch.func's) are those of F.embedding plus a constant noise."""
    weight, ids, mask = _inputs(device)
    weight, ids = weight[:8, :4].contiguous(), ids % 8  # a Hessian of 32 x 32: seconds under the interpreter
    ids[:, 0] = 1
    f = _op(backend, **grad_kw)
    noise = f(weight, ids, mask) - F.embedding(ids, weight)
    loss = lambda w: (f(w, ids, mask) ** 3).sum()  # noqa: E731
    plain = lambda w: ((F.embedding(ids, w, **grad_kw) + noise) ** 3).sum()  # noqa: E731
    expected = torch.autograd.functional.hessian(plain, weight)
    torch.testing.assert_close(torch.autograd.functional.hessian(loss, weight), expected)
    torch.testing.assert_close(jacfwd(jacrev(loss), randomness="same")(weight), expected)
    v = torch.randn(8, 4, generator=torch.Generator().manual_seed(4)).to(device)
    torch.testing.assert_close(grad(lambda w: (grad(loss)(w) * v).sum())(weight),  # v^T H: not symmetric
                               torch.autograd.functional.vhp(plain, weight, v)[1])  # with scale_grad_by_freq


@on_backends()
def test_nested_vmaps_continue_the_counters_in_the_stacked_order(backend, device):
    weight, _, _ = _inputs(device)
    ids = torch.randint(0, V, (3, 4, L), generator=torch.Generator().manual_seed(2)).to(device)
    f = lambda i: noisy_embedding(i, weight, 5.0, seed=SEED, backend=backend)  # noqa: E731
    nested = vmap(vmap(f, randomness="different"), randomness="different")
    assert_bits_equal(nested(ids), f(ids))
    # a weight per example at both levels: a call per example, each told the counters it spans
    weights = torch.stack([torch.stack([weight * (1 + i + 4 * j) for i in range(4)]) for j in range(3)])
    g = lambda w: noisy_embedding(ids[0, :2], w, 5.0, seed=SEED, backend=backend)  # noqa: E731
    out = vmap(vmap(g, randomness="different"), randomness="different")(weights)
    q = 2 * L * num_lanes(D)
    for j in range(3):
        for i in range(4):
            expected = noisy_embedding(ids[0, :2], weights[j, i], 5.0, seed=SEED, offset=(j * 4 + i) * q,
                                       backend=backend)
            assert_bits_equal(out[j, i], expected)


@on_backends()
def test_vmap_over_single_tokens_gives_each_its_own_sequence(backend, device):
    """1-D ids under vmap: each example is one token (L = 1), as the call on it alone."""
    weight, ids, _ = _inputs(device)
    f = lambda i: noisy_embedding(i, weight, 5.0, seed=SEED, backend=backend)  # noqa: E731
    assert_bits_equal(vmap(f, randomness="different")(ids[0]), f(ids[0][:, None])[:, 0])


@on_backends()
def test_the_gradient_through_vmap_is_the_batched_calls(backend, device):
    """scale_grad_by_freq counts an id over the whole stacked call, as F.embedding under vmap does."""
    weight, ids, mask = _inputs(device)
    ids[:, 0] = 3
    h = _op(backend, scale_grad_by_freq=True, padding_idx=2)
    through_vmap = grad(lambda w: (vmap(lambda i, m: h(w, i, m), randomness="different")(ids, mask) ** 2).sum())
    assert_bits_equal(through_vmap(weight), grad(lambda w: (h(w, ids, mask) ** 2).sum())(weight))


@on_backends()
def test_forward_over_reverse_gives_the_gradients_tangent(backend, device):
    """A dual weight through autograd.grad: the gradient's tangent (a Hessian-vector product)."""
    weight, ids, mask = _inputs(device)
    tangent = torch.randn(V, D, generator=torch.Generator().manual_seed(1)).to(device)
    with fwAD.dual_level():
        dual = fwAD.make_dual(weight.clone().requires_grad_(), tangent)
        (g,) = torch.autograd.grad((_op(backend, padding_idx=1)(dual, ids, mask) ** 2).sum(), dual)
        hvp = fwAD.unpack_dual(g).tangent
    rows = 2 * F.embedding(ids, tangent)  # d(2 * out)/dt, summed into the rows of the ids but padding's
    expected = torch.zeros(V, D, device=device).index_add_(0, ids.reshape(-1), rows.reshape(-1, D))
    expected[1] = 0
    torch.testing.assert_close(hvp, expected)


def test_a_vmap_batching_none_of_the_inputs_decides_by_its_randomness():
    """vmap over something else (another layer's input): the op's own rule never runs there."""
    weight, ids, mask = _inputs("cpu")
    f = lambda x: _op("auto")(weight, ids, mask) * x  # noqa: E731
    with pytest.raises(RuntimeError, match="none of the inputs noisy_embedding reads"):
        vmap(f, randomness="different")(torch.ones(2))
    with pytest.raises(RuntimeError, match="randomness='different'"):
        vmap(f)(torch.ones(2))
    out = vmap(f, randomness="same")(torch.ones(2))
    assert_bits_equal(out[1], _op("auto")(weight, ids, mask))


def test_transforms_inside_torch_compile_are_refused():
    weight, ids, mask = _inputs("cpu")
    compiled = torch.compile(vmap(lambda i, m: _op("auto")(weight, i, m), randomness="different"),
                             backend="aot_eager", fullgraph=True)
    with pytest.raises(Exception, match="inside torch.compile are not supported"):
        compiled(ids, mask)


def test_module_seed_without_the_cpu_extension_is_one_for_the_whole_vmap(monkeypatch):
    from neft_kernels import backends

    load = backends._load
    monkeypatch.setattr(backends, "_load", lambda name: ImportError(name) if name == "cpu" else load(name))
    weight, ids, mask = _inputs("cpu")
    emb = NoisyEmbedding(V, D, noise_alpha=5.0, backend="torch", _weight=weight.clone()).train()
    torch.manual_seed(3)
    out = vmap(lambda i, m: emb(i, attention_mask=m), randomness="different")(ids, mask)
    torch.manual_seed(3)
    assert_bits_equal(out, emb(ids, attention_mask=mask))


@pytest.mark.parametrize("randomness", ["different", "same"])
def test_vmap_over_no_examples_gives_an_empty_output(randomness):
    weight, ids, mask = _inputs("cpu")
    f = _op("auto")
    assert vmap(lambda i, m: f(weight, i, m), randomness=randomness)(ids[:0], mask[:0]).shape == (0, L, D)
    assert vmap(lambda w: f(w, ids, mask), randomness=randomness)(weight[None][:0]).shape == (0, B, L, D)


@on_backends()
def test_vmap_side_inputs_batched_along_any_dim_and_cu_seqlens_past_the_ends(backend, device):
    weight, ids, _ = _inputs(device)
    ids3 = ids.view(B, 1, L).expand(B, 2, L).contiguous()
    mask = torch.ones(B, 2, L, dtype=torch.long, device=device)
    mask[1, :, 3:] = 0
    mask[2, 0, 1:] = 0
    f = lambda i, m, offset=0: noisy_embedding(i, weight, 5.0, seed=SEED, offset=offset, attention_mask=m,  # noqa: E731
                                               backend=backend)
    out = vmap(f, in_dims=(0, 2), randomness="different")(ids3, mask.permute(1, 2, 0))
    span = 2 * L * num_lanes(D)
    for b in range(B):
        assert_bits_equal(out[b], f(ids3[b], mask[b], b * span))
    cu = torch.tensor([-1, 2, 9], dtype=torch.int32, device=device)  # entries outside [0, N) mark no start
    g = lambda i, offset=0: noisy_embedding(i, weight, 5.0, seed=SEED, offset=offset, cu_seqlens=cu,  # noqa: E731
                                            backend=backend)
    out = vmap(g, randomness="different")(ids)
    for b in range(B):
        assert_bits_equal(out[b], g(ids[b], b * L * num_lanes(D)))
