"""The CPU backend's eager calls: a native autograd node (the rule of ops._NoisyEmbeddingFunction) and
seeds drawn in C++, with the behaviour of the Python definitions they stand in for."""

import pytest
import torch
import torch.autograd.forward_ad as fwAD

from neft_kernels import backends, noisy_embedding

from support.asserts import assert_bits_equal

pytestmark = pytest.mark.skipif("cpu" not in backends.available_backends("cpu"),
                                reason="the CPU extension is not built")


def _call(ids, weight, backend, **kw):
    return noisy_embedding(ids, weight, 5.0, seed=7, backend=backend, **kw)


@pytest.mark.parametrize("padding_idx", [None, 3])
@pytest.mark.parametrize("scale_grad_by_freq", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_node_gives_the_python_functions_gradient(padding_idx, scale_grad_by_freq, dtype):
    """3-D int32 ids with repeats, a non-contiguous output gradient: the same bits as the reference
    backend's gradient, which goes through the Python autograd.Function."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 6, (2, 3, 11), generator=gen, dtype=torch.int32)
    grad = torch.randn(2, 3, 20, 11, generator=gen).to(dtype).transpose(-1, -2)
    grads = []
    for backend in ("cpu", "torch"):
        weight = torch.randn(9, 20, generator=torch.Generator().manual_seed(1)).to(dtype).requires_grad_()
        out = _call(ids, weight, backend, padding_idx=padding_idx, scale_grad_by_freq=scale_grad_by_freq)
        assert out.grad_fn.name() == ("NoisyEmbeddingBackward" if backend == "cpu"
                                      else "_NoisyEmbeddingFunctionBackward")
        out.backward(grad)
        grads.append(weight.grad)
    assert_bits_equal(grads[0], grads[1])


def test_native_node_only_where_autograd_records():
    ids = torch.tensor([[1, 2, 3]])
    weight = torch.randn(5, 4, requires_grad=True)
    with torch.no_grad():
        assert _call(ids, weight, "cpu").grad_fn is None
    with torch.inference_mode():
        assert _call(ids, weight, "cpu").grad_fn is None
    assert _call(ids, weight.detach(), "cpu").grad_fn is None
    scaled = weight * 2  # a non-leaf weight: the gradient flows on through its history
    _call(ids, scaled, "cpu").sum().backward()
    assert weight.grad[1:4].eq(2).all() and weight.grad[[0, 4]].eq(0).all()


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_misuses_are_refused_as_the_python_function_refuses_them(backend):
    ids = torch.tensor([[1, 2, 3]])
    weight = torch.randn(5, 4, requires_grad=True)
    out = _call(ids, weight, backend)
    out.sum().backward()
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        out.sum().backward()
    moved = ids.clone()
    out = _call(moved, weight, backend)
    moved += 1
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


@pytest.mark.parametrize("padding_idx,scale_grad_by_freq", [(None, False), (1, True)])
def test_second_derivatives_are_the_python_functions(padding_idx, scale_grad_by_freq):
    """create_graph: the native node's gradient records NoisyEmbeddingGradBackward, the Function's
    _WeightGradFunction; the same Hessian bits, and a third derivative records on."""
    ids = torch.tensor([[1, 2, 1], [3, 0, 1]])
    weight = torch.randn(5, 4)
    hessians = []
    for backend in ("cpu", "torch"):
        loss = lambda w, backend=backend: _call(ids, w, backend, padding_idx=padding_idx,  # noqa: E731
                                                scale_grad_by_freq=scale_grad_by_freq).pow(3).sum()
        hessians.append(torch.autograd.functional.hessian(loss, weight))
        leaf = weight.clone().requires_grad_()
        (g,) = torch.autograd.grad(loss(leaf), leaf, create_graph=True)
        (gg,) = torch.autograd.grad(g.pow(2).sum(), leaf, create_graph=True)
        assert gg.grad_fn is not None
    assert_bits_equal(hessians[0], hessians[1])


def test_forward_over_reverse_under_create_graph_records_on_as_f_embedding():
    """A dual weight's gradient with create_graph: its tangent (a Hessian-vector product) is itself
    differentiable, through the native node as through the Function and F.embedding; a padding row's
    cotangent, even inf, gives nothing (masked, not multiplied)."""
    ids = torch.tensor([[1, 2, 1], [3, 1, 0]])
    gen = torch.Generator().manual_seed(0)
    w0, v, u = (torch.randn(6, 3, generator=gen) for _ in range(3))
    results = []
    for backend in ("cpu", "torch", None):
        def f(w, backend=backend):
            if backend is None:
                return torch.nn.functional.embedding(ids, w, padding_idx=0) + 0.1
            return _call(ids, w, backend, padding_idx=0) - _call(ids, w.detach(), backend) \
                + torch.nn.functional.embedding(ids, w.detach()) + 0.1  # the same rows, the noise removed

        w = w0.clone().requires_grad_()
        with fwAD.dual_level():
            dual = fwAD.make_dual(w, v)
            (g,) = torch.autograd.grad((f(dual) ** 3).sum(), dual, create_graph=True)
            hv = fwAD.unpack_dual(g).tangent
            results.append(torch.autograd.grad((hv * u).sum() + (g * u).sum(), w)[0])
        (g,) = torch.autograd.grad((f(w) ** 3).sum(), w, create_graph=True)
        cotangent = u.clone()
        cotangent[0] = float("inf")
        assert torch.isfinite(torch.autograd.grad(g, w, cotangent)[0]).all()
    torch.testing.assert_close(results[0], results[2])
    torch.testing.assert_close(results[1], results[2])


@pytest.mark.parametrize("padding_idx", [None, 1])
def test_forward_mode_ad_gives_the_python_functions_tangent(padding_idx):
    """A dual weight: the native node and the Python Function's jvp both give F.embedding's tangent
    (the noise does not depend on the weight), and the primal is the op's output."""
    ids = torch.tensor([[1, 2, 3], [3, 0, 1]])
    weight = torch.randn(5, 4)
    tangent = torch.randn(5, 4)
    for backend in ("cpu", "torch"):
        with fwAD.dual_level():
            primal, out_tangent = fwAD.unpack_dual(_call(ids, fwAD.make_dual(weight, tangent), backend,
                                                         padding_idx=padding_idx))
        assert_bits_equal(primal, _call(ids, weight, backend))
        assert_bits_equal(out_tangent, torch.nn.functional.embedding(ids, tangent))


def test_retain_graph_and_saved_tensor_hooks_reach_the_native_node():
    ids = torch.tensor([[1, 2, 2]])
    weight = torch.randn(5, 4, requires_grad=True)
    packed = []

    def pack(t):
        packed.append(t)
        return t.clone()

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = _call(ids, weight, "cpu")
    assert len(packed) == 1 and torch.equal(packed[0], ids)
    out.sum().backward(retain_graph=True)
    out.sum().backward()
    assert weight.grad[2].eq(4).all() and weight.grad[1].eq(2).all()


def test_bad_ids_raise_before_any_gradient():
    weight = torch.randn(5, 4, requires_grad=True)
    with pytest.raises(IndexError, match=r"input_ids must lie in \[0, 5\), got values in \[-1, 5\]"):
        _call(torch.tensor([[-1, 5, 2]]), weight, "cpu")


@pytest.mark.parametrize("seed", [0, 1, 2**31, 12345])
def test_draw_seed_is_torch_randint_with_the_same_generator_state(seed):
    gen, twin = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
    for _ in range(5):
        expected = int(torch.randint(backends.SEED_LOW, backends.SEED_HIGH, (), dtype=torch.int64, generator=twin))
        assert backends.draw_seed(gen) == expected
    assert torch.equal(gen.get_state(), twin.get_state())
    torch.manual_seed(seed)
    drawn = backends.draw_seed()
    torch.manual_seed(seed)
    assert drawn == int(torch.randint(backends.SEED_LOW, backends.SEED_HIGH, (), dtype=torch.int64))


def test_draw_seed_without_the_extension_is_torch_randint(monkeypatch):
    load = backends._load
    monkeypatch.setattr(backends, "_load", lambda name: ImportError("not built") if name == "cpu" else load(name))
    gen, twin = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert backends.draw_seed(gen) == int(torch.randint(backends.SEED_LOW, backends.SEED_HIGH, (), dtype=torch.int64,
                                                        generator=twin))



@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_an_absent_output_gradient_counts_as_zeros(backend):
    """A node after the output that gives it no gradient: the weight gets a zero gradient."""

    class NoGradThrough(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.sum()

        @staticmethod
        def backward(ctx, grad):
            return None

    weight = torch.randn(5, 4, requires_grad=True)
    NoGradThrough.apply(_call(torch.tensor([[1, 2]]), weight, backend)).backward()
    assert weight.grad is not None and weight.grad.eq(0).all()


def test_jit_trace_records_the_python_function_not_the_native_call():
    """A native call would be recorded as the aten calls it makes, without the kernel's writes."""
    ids = torch.tensor([[1, 2, 3]])
    with pytest.warns(torch.jit.TracerWarning):
        traced = torch.jit.trace(lambda i, w: _call(i, w, "cpu"), (ids, torch.randn(5, 4)), check_trace=False)
    weight = torch.randn(5, 4)
    assert_bits_equal(traced(ids, weight), _call(ids, weight, "cpu"))


def test_compiled_autograd_over_an_eager_forward_takes_the_python_function():
    from torch._dynamo import compiled_autograd

    ids = torch.tensor([[1, 2, 2]])
    grads = []
    for enabled in (False, True):
        weight = torch.randn(5, 4, generator=torch.Generator().manual_seed(0), requires_grad=True)
        if enabled:
            with compiled_autograd._enable(torch.compile(backend="eager")):
                _call(ids, weight, "cpu").pow(2).sum().backward()
        else:
            _call(ids, weight, "cpu").pow(2).sum().backward()
        grads.append(weight.grad)
    assert_bits_equal(grads[1], grads[0])
