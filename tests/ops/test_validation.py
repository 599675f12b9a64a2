"""Bad arguments are refused before any kernel runs, with errors that name the argument."""

import math

import pytest
import torch

from neft_kernels import NoisyEmbedding, add_noise, noisy_embedding

from support.backends import on_backends


def _call(**kw):
    args = dict(input_ids=torch.tensor([[1, 2, 3]]), weight=torch.zeros(5, 4), noise_alpha=1.0, seed=0)
    args.update(kw)
    return noisy_embedding(args.pop("input_ids"), args.pop("weight"), args.pop("noise_alpha"), **args)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(input_ids=torch.tensor([[1.0]])), TypeError, "input_ids"),
    (dict(input_ids=torch.tensor([[5]])), IndexError, "input_ids"),
    (dict(input_ids=torch.tensor([[-1]])), IndexError, "input_ids"),
    (dict(weight=torch.zeros(5, 4, dtype=torch.float64)), TypeError, "weight dtype"),
    (dict(weight=torch.zeros(5)), ValueError, "2-D"),
    (dict(noise_alpha=float("nan")), ValueError, "noise_alpha"),
    (dict(noise_alpha=-0.5), ValueError, "noise_alpha"),
    (dict(seed=2**64), ValueError, "seed"),
    (dict(seed=-(2**63) - 1), ValueError, "seed"),
    (dict(seed=1.5), TypeError, "seed"),
    (dict(offset=-1), ValueError, "offset"),
    (dict(offset=2**63 - 2), ValueError, "offset"),
    (dict(attention_mask=torch.ones(1, 2)), ValueError, "attention_mask"),
    (dict(attention_mask=torch.ones(1, 3)), TypeError, "attention_mask"),
    (dict(position_ids=torch.zeros(2, dtype=torch.long)), ValueError, "position_ids"),
    (dict(position_ids=torch.zeros(2, 3, dtype=torch.long)), ValueError, "position_ids"),
    (dict(length_mode="flattened"), ValueError, "length_mode"),
    (dict(backend="mps"), ValueError, "backend"),
    (dict(padding_idx=5), ValueError, "padding_idx"),
    (dict(padding_idx=2.0), TypeError, "padding_idx must be an int, got float"),
    (dict(padding_idx=True), TypeError, "padding_idx must be an int, got bool"),
    (dict(padding_idx=torch.tensor(True)), TypeError, "padding_idx must be an int, got torch.bool tensor"),
    (dict(padding_idx=torch.tensor(2.0)), TypeError, "padding_idx must be an int, got torch.float32 tensor"),
    (dict(input_ids=[[1, 2]]), TypeError, "input_ids must be a torch.Tensor"),
    (dict(weight=torch.zeros(5, 4).numpy()), TypeError, "weight must be a torch.Tensor"),
    (dict(noise_alpha="5"), TypeError, "noise_alpha"),
    (dict(attention_mask=[[1, 1, 1]]), TypeError, "attention_mask must be a tensor"),
    (dict(cu_seqlens=torch.tensor([0.0, 3.0])), TypeError, "cu_seqlens"),
    (dict(cu_seqlens=torch.tensor([[0, 3]])), TypeError, "cu_seqlens"),
    (dict(seed=torch.tensor([1, 2])), TypeError, "seed"),
])
def test_refused(kwargs, error, match):
    with pytest.raises(error, match=match):
        _call(**kwargs)


@on_backends()
def test_edge_shapes_are_accepted(backend, device):
    w = torch.randn(5, 4, device=device)
    empty = torch.zeros(0, 3, dtype=torch.long, device=device)
    assert _call(input_ids=empty, weight=w, attention_mask=empty, backend=backend).shape == (0, 3, 4)
    no_tokens = torch.zeros(3, 0, dtype=torch.long, device=device)  # rows of width 0
    assert _call(input_ids=no_tokens, weight=w, attention_mask=no_tokens, backend=backend).shape == (3, 0, 4)
    scalar = _call(input_ids=torch.tensor(2, device=device), weight=w, backend=backend)
    assert scalar.shape == (4,) and not torch.equal(scalar, w[2])
    ids = torch.tensor([[1, 2, 3]], device=device)
    out = _call(input_ids=ids, weight=w, seed=2**64 - 1, offset=2**40, backend=backend)
    assert out.shape == (1, 3, 4)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(x=torch.zeros(2, 3, 4, dtype=torch.float64)), TypeError, "x dtype"),
    (dict(x=[[0.0]]), TypeError, "x must be a tensor"),
    (dict(attention_mask=torch.ones(2, 4, dtype=torch.long)), ValueError,
     r"attention_mask must have \(or broadcast to\) the shape of x's tokens"),
    (dict(position_ids=torch.ones(4, dtype=torch.long)), ValueError, "x's tokens"),
    (dict(cu_seqlens=torch.ones(2, 2, dtype=torch.int32)), TypeError, "cu_seqlens"),
])
def test_add_noise_errors_name_its_own_arguments(kwargs, error, match):
    args = dict(x=torch.zeros(2, 3, 4), seed=0)
    args.update(kwargs)
    with pytest.raises(error, match=match) as info:
        add_noise(args.pop("x"), 5.0, **args)
    assert "input_ids" not in str(info.value) and "weight" not in str(info.value)


@on_backends()
def test_zero_width_embeddings_work_like_nn_embedding(backend, device):
    ids = torch.tensor([[1, 2, 3]], device=device)
    weight = torch.zeros(10, 0, device=device, requires_grad=True)
    mask = torch.ones_like(ids)
    for side in ({}, {"attention_mask": mask}):
        out = noisy_embedding(ids, weight, 5.0, seed=1, backend=backend, **side)
        assert out.shape == (1, 3, 0)
        out.sum().backward()
    emb = NoisyEmbedding(10, 0, device=device, backend=backend).train()
    assert emb(ids).shape == torch.nn.Embedding(10, 0)(ids.cpu()).shape == (1, 3, 0)


def test_seed_may_be_any_integer_type():
    """A NumPy integer seed (np.random's) was refused as "got int64", beside a message asking for
    int64. Integers are taken as the int they hold; floats and bools stay refused."""
    numpy = pytest.importorskip("numpy")
    for seed in (7, 2**64 - 1, -(2**63)):
        want = _call(seed=seed)
        for typed in (numpy.int64(seed) if seed < 2**63 else numpy.uint64(seed),):
            assert torch.equal(_call(seed=typed), want)
    assert torch.equal(_call(seed=numpy.int32(-5)), _call(seed=-5))
    for bad in (True, numpy.float64(3.0)):
        with pytest.raises(TypeError, match="seed must be an int"):
            _call(seed=bad)


def test_alpha_may_be_any_real_number_type():
    numpy = pytest.importorskip("numpy")
    want = _call(noise_alpha=5.0)
    for alpha in (5, numpy.float32(5.0), numpy.float64(5.0), torch.tensor(5.0)):
        assert torch.equal(_call(noise_alpha=alpha), want)


@on_backends("torch", "cpu", "triton", device="cpu")
def test_unsorted_cu_seqlens_on_the_cpu_is_refused(backend, device):
    """The kernels find cu_seqlens entries by binary search, the reference by membership: descending
    entries gave each CPU backend other starts, silently. CPU values cost no sync to read: refused
    (repeats, entries outside [0, N) and many entries stay accepted)."""
    ids, weight = torch.tensor([[1, 2, 3, 4, 0, 1]]), torch.randn(5, 4)
    for cu in (torch.tensor([0, 4, 2, 6], dtype=torch.int32), torch.tensor([3, 0, 6]),
               torch.cat([torch.arange(300), torch.tensor([7])])):
        with pytest.raises(ValueError, match="cu_seqlens must be ascending"):
            _call(input_ids=ids, weight=weight, cu_seqlens=cu, backend=backend)
        with pytest.raises(ValueError, match="cu_seqlens must be ascending"):
            add_noise(torch.randn(1, 6, 4), 5.0, seed=0, cu_seqlens=cu, backend=backend)
        emb = NoisyEmbedding(5, 4, backend=backend).train()
        with pytest.raises(ValueError, match="cu_seqlens must be ascending"):
            emb(ids, cu_seqlens=cu)
    for cu in (torch.tensor([0, 2, 2, 6], dtype=torch.int32), torch.tensor([-3, 0, 4, 9]), torch.arange(300),
               torch.tensor([4])):
        got = _call(input_ids=ids, weight=weight, cu_seqlens=cu, backend=backend)
        assert torch.equal(got, _call(input_ids=ids, weight=weight, cu_seqlens=cu, backend="torch"))


@on_backends("torch", "cpu", "triton", device="cpu")
def test_padding_idx_may_be_any_integer_type(backend, device):
    """A NumPy or tensor padding_idx (a config's, say) is the int it holds on every backend: before,
    the C++ backend refused a float one with pybind's argument dump, the Triton one a NumPy int
    with an interpreter error, while the reference took both."""
    numpy = pytest.importorskip("numpy")
    ids = torch.tensor([[1, 2, 2, 3]])
    grad_out = torch.randn(1, 4, 4, generator=torch.Generator().manual_seed(0))

    def grad_of(padding_idx):
        weight = torch.randn(5, 4, generator=torch.Generator().manual_seed(1)).requires_grad_()
        out = noisy_embedding(ids, weight, 5.0, seed=3, padding_idx=padding_idx, backend=backend)
        return torch.autograd.grad(out, weight, grad_out)[0]

    want = grad_of(2)
    assert (want[2] == 0).all() and (want[1] != 0).all()
    for padding_idx in (numpy.int64(2), numpy.int32(-3), torch.tensor(2)):
        assert torch.equal(grad_of(padding_idx), want)
    emb = NoisyEmbedding(5, 4, padding_idx=numpy.int64(2), backend=backend).train()
    emb(ids).sum().backward()
    assert (emb.weight.grad[2] == 0).all() and (emb.weight.grad[1] != 0).all()


@on_backends("torch", "cpu", "triton", device="cpu")
def test_alpha_negative_zero_is_alpha_zero(backend, device):
    """alpha = -0.0 passes the >= 0 check; it gave the one-scale path a +0 scale and the per-token
    path (a mask, an alpha tensor) a -0 scale, so -0.0 weight elements came out with other signs
    with a mask than without (the spec: a scale-0 token keeps its weight, -0.0 becoming +0.0 where
    e >= 0). A float or CPU alpha of -0.0 is alpha 0 now (an accelerator's alpha tensor is not read
    on the host: a -0.0 there keeps its -0 scales)."""
    ids, weight = torch.tensor([[0, 1, 2, 0]]), torch.full((3, 8), -0.0)
    mask = torch.ones(1, 4, dtype=torch.long)
    want = noisy_embedding(ids, weight, 0.0, seed=1, backend=backend)
    for alpha in (-0.0, torch.tensor(-0.0)):
        for side in ({}, {"attention_mask": mask}):
            got = noisy_embedding(ids, weight, alpha, seed=1, backend=backend, **side)
            assert torch.equal(got.signbit(), want.signbit()), (alpha, side)
    emb = NoisyEmbedding(3, 8, _weight=weight.clone(), noise_alpha=-0.0, backend=backend)
    assert math.copysign(1.0, emb.noise_alpha) == 1.0
