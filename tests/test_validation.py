"""Bad arguments are refused before any kernel runs, with errors that name the argument."""

import pytest
import torch

from conftest import DEVICE
from neft_kernels import noisy_embedding


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
])
def test_refused(kwargs, error, match):
    with pytest.raises(error, match=match):
        _call(**kwargs)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_edge_shapes_are_accepted(backend):
    w = torch.randn(5, 4, device=DEVICE)
    empty = torch.zeros(0, 3, dtype=torch.long, device=DEVICE)
    assert _call(input_ids=empty, weight=w, attention_mask=empty, backend=backend).shape == (0, 3, 4)
    scalar = _call(input_ids=torch.tensor(2, device=DEVICE), weight=w, backend=backend)
    assert scalar.shape == (4,) and not torch.equal(scalar, w[2])
    ids = torch.tensor([[1, 2, 3]], device=DEVICE)
    out = _call(input_ids=ids, weight=w, seed=2**64 - 1, offset=2**40, backend=backend)
    assert out.shape == (1, 3, 4)
