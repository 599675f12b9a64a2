"""Property-based tests (hypothesis): random shapes, dtypes, masks, packed rows (position ids and
cu_seqlens), seeds and offsets
through every backend, bit-exact with the independent spec model; gradients equal F.embedding's.

CI runs a fixed (derandomized) set of examples; ``NEFT_FUZZ_EXAMPLES=2000`` runs more, at random.
"""

import math
import os

import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from neft_kernels import noisy_embedding

from support.asserts import DTYPES, assert_bits_equal
from support.backends import on_backends
from support.cases import expected

_EXAMPLES = int(os.environ.get("NEFT_FUZZ_EXAMPLES", "40"))
_SETTINGS = settings(max_examples=_EXAMPLES, deadline=None, derandomize="NEFT_FUZZ_EXAMPLES" not in os.environ,
                     suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@st.composite
def batches(draw):
    rows, width = draw(st.integers(1, 3)), draw(st.integers(1, 10))
    vocab, d = draw(st.integers(1, 12)), draw(st.integers(1, 19))
    ids = torch.tensor(draw(st.lists(st.integers(0, vocab - 1), min_size=rows * width, max_size=rows * width)))
    ids = ids.view(rows, width)
    mask = pos = None
    if draw(st.booleans()):
        mask = torch.tensor(draw(st.lists(st.integers(0, 1), min_size=rows * width, max_size=rows * width)))
        mask = mask.view(rows, width)
    if draw(st.booleans()):  # packed rows: a sub-sequence restarts at 0 wherever `starts` says
        starts = torch.tensor(draw(st.lists(st.booleans(), min_size=rows * width, max_size=rows * width)))
        starts = starts.view(rows, width).clone()
        starts[:, 0] = True
        index = torch.arange(width).expand(rows, width)
        last_start = torch.cummax(torch.where(starts, index, 0), dim=1).values
        pos = index - last_start
    cu = None
    if draw(st.booleans()):  # flash-attention's cu_seqlens: ascending, repeats and out-of-range entries allowed
        cu = torch.tensor(sorted(draw(st.lists(st.integers(-2, rows * width + 2), min_size=1, max_size=6))),
                          dtype=draw(st.sampled_from([torch.int32, torch.int64])))
    dtype = draw(st.sampled_from(DTYPES))
    values = draw(st.lists(st.floats(-4, 4, allow_nan=False, width=32), min_size=vocab * d, max_size=vocab * d))
    weight = torch.tensor(values, dtype=torch.float32).view(vocab, d).to(dtype)
    return dict(ids=ids, weight=weight, mask=mask, pos=pos, cu=cu,
                alpha=draw(st.sampled_from([0.0, 1.0, 5.0, 15.0, 0.1])),
                seed=draw(st.integers(-(1 << 63), (1 << 64) - 1)), offset=draw(st.integers(0, 1 << 40)),
                length_mode=draw(st.sampled_from(["per_sequence", "padded"])))


def _to(b: dict, device: str) -> dict:
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in b.items()}


@on_backends()
@_SETTINGS
@given(b=batches())
def test_forward_is_bit_exact_with_the_spec_model(backend, device, b):
    x = _to(b, device)
    out = noisy_embedding(x["ids"], x["weight"], b["alpha"], seed=b["seed"], offset=b["offset"],
                          attention_mask=x["mask"], position_ids=x["pos"], cu_seqlens=x["cu"],
                          length_mode=b["length_mode"], backend=backend)
    assert_bits_equal(out, expected(b["ids"], b["weight"], b["alpha"], b["seed"], b["offset"], b["mask"], b["pos"],
                                    b["length_mode"], b["cu"]))


@on_backends()
@_SETTINGS
@given(b=batches(), padding=st.booleans(), data=st.data())
def test_weight_gradient_equals_f_embedding(backend, device, b, padding, data):
    x = _to(b, device)
    weight = x["weight"].float().requires_grad_()
    padding_idx = data.draw(st.integers(0, weight.shape[0] - 1)) if padding else None
    grad_out = torch.randn(*b["ids"].shape, weight.shape[1], generator=torch.Generator().manual_seed(0)).to(device)
    out = noisy_embedding(x["ids"], weight, b["alpha"], seed=b["seed"], attention_mask=x["mask"],
                          position_ids=x["pos"], padding_idx=padding_idx, backend=backend)
    (ours,) = torch.autograd.grad(out, weight, grad_out)
    (theirs,) = torch.autograd.grad(F.embedding(x["ids"], weight, padding_idx=padding_idx), weight, grad_out)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)


_SIDE_DTYPES = [torch.bool, torch.uint8, torch.int8, torch.int32, torch.int64]


@st.composite
def wide_batches(draw):
    """What ``batches`` leaves out: 0- to 3-D ids (empty ones too), int32 and non-contiguous ids and
    weights, side inputs of every integer dtype broadcast from trailing dims, a noise_mask, the
    Gaussian stream, padding_idx (negative too), scale_grad_by_freq and a tensor alpha."""
    shape = tuple(draw(st.integers(0, 4)) for _ in range(draw(st.integers(0, 3))))
    n = math.prod(shape)
    vocab, d = draw(st.integers(1, 9)), draw(st.sampled_from([1, 2, 3, 4, 5, 7, 9, 13, 33]))
    ids = torch.tensor(draw(st.lists(st.integers(0, vocab - 1), min_size=n, max_size=n)),
                       dtype=draw(st.sampled_from([torch.int32, torch.int64]))).reshape(shape)
    if len(shape) >= 2 and draw(st.booleans()):
        ids = ids.transpose(-1, -2).contiguous().transpose(-1, -2)
    kw = {}
    for name, values in (("attention_mask", st.integers(0, 2)), ("position_ids", st.integers(-1, 3)),
                         ("noise_mask", st.integers(0, 1))):
        if draw(st.booleans()):
            side_shape = shape[draw(st.integers(0, len(shape))):]
            count = math.prod(side_shape)
            side = torch.tensor(draw(st.lists(values, min_size=count, max_size=count))).reshape(side_shape)
            dtype = draw(st.sampled_from(_SIDE_DTYPES))
            lowest = 0 if dtype == torch.uint8 else -1
            kw[name] = (side != 0) if dtype == torch.bool else side.clamp(min=lowest).to(dtype)
    if draw(st.booleans()):
        kw["cu_seqlens"] = torch.tensor(sorted(draw(st.lists(st.integers(-2, n + 2), max_size=6))),
                                        dtype=draw(st.sampled_from([torch.int32, torch.int64])))
    values = draw(st.lists(st.floats(-4, 4, allow_nan=False, width=32), min_size=vocab * d, max_size=vocab * d))
    weight = torch.tensor(values).view(vocab, d).to(draw(st.sampled_from(DTYPES)))
    if draw(st.booleans()):
        weight = weight.t().contiguous().t()
    alpha = draw(st.sampled_from([0.0, 0.1, 5.0, 1e6]))
    if draw(st.booleans()):
        alpha = torch.tensor(alpha, dtype=draw(st.sampled_from([torch.float32, torch.float64])))
    kw.update(seed=draw(st.integers(-(1 << 63), (1 << 64) - 1)), offset=draw(st.integers(0, 1 << 40)),
              length_mode=draw(st.sampled_from(["per_sequence", "padded"])),
              distribution=draw(st.sampled_from(["uniform", "gaussian"])), scale_grad_by_freq=draw(st.booleans()),
              padding_idx=draw(st.one_of(st.none(), st.integers(-vocab, vocab - 1))))
    return ids, weight, alpha, kw


@on_backends("cpu", "triton")
@_SETTINGS
@given(b=wide_batches())
def test_forward_and_gradient_equal_the_reference_bit_for_bit(backend, device, b):
    """Every fused backend gives the reference's bits (backend="torch", on the same device), forward
    and weight gradient, in every dtype."""
    ids, weight, alpha, kw = b
    results = []
    for name in (backend, "torch"):
        w = weight.to(device).requires_grad_()
        moved = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
        out = noisy_embedding(ids.to(device), w, alpha, backend=name, **moved)
        grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(0)).to(out.dtype).to(device)
        results.append((out, *torch.autograd.grad(out, w, grad_out)))
    (out, grad), (ref_out, ref_grad) = results
    assert_bits_equal(out, ref_out)
    assert_bits_equal(grad, ref_grad)
