"""Inputs shared by the bit-exactness tests of every backend."""

from __future__ import annotations

import numpy as np
import torch

import spec_model
from conftest import assert_bits_equal, to_numpy_raw
from neft_kernels import noisy_embedding

SEEDS = [0, 1, -1, 2**40 + 7, -(2**63), 2**64 - 1]
KINDS = ["none", "mask", "packed", "both"]
LENGTH_MODES = ["per_sequence", "padded"]
OFFSETS = [0, 12345, 2**33 + 3]
DIMS = [1, 5, 13, 64]


def side_inputs(kind: str, shape: tuple[int, int], device: str = "cpu"):
    """(attention_mask, position_ids) for a (rows, width) batch: padded, packed, both or none."""
    rows, width = shape
    mask = pos = None
    if kind in ("mask", "both"):
        mask = torch.ones(shape, dtype=torch.int64)
        mask[0, width - 3:] = 0  # right padding
        if rows > 1:
            mask[1, :2] = 0  # left padding
        if rows > 2:
            mask[2] = 0  # an empty row
    if kind in ("packed", "both"):
        pos = torch.arange(width).repeat(rows, 1)
        pos[0, 4:] = torch.arange(width - 4)  # two sub-sequences
        if rows > 1:
            pos[1, 2:] = torch.arange(width - 2)
            pos[1, 5:] = torch.arange(width - 5)
    return (None if mask is None else mask.to(device)), (None if pos is None else pos.to(device))


def make_weight(num_embeddings: int, d: int, dtype: torch.dtype, device: str = "cpu") -> torch.Tensor:
    g = torch.Generator().manual_seed(d * 1000 + num_embeddings)
    return (torch.randn(num_embeddings, d, generator=g) * 0.1).to(dtype).to(device)


def expected(ids, weight, alpha, seed, offset, mask, pos, length_mode) -> torch.Tensor:
    """Spec model output as a torch tensor of weight's dtype and ids.shape + (d,)."""
    dtype = str(weight.dtype).removeprefix("torch.")
    out = spec_model.noisy_embedding(
        ids.cpu().numpy(), to_numpy_raw(weight), dtype, alpha, seed, offset,
        None if mask is None else mask.cpu().numpy(), None if pos is None else pos.cpu().numpy(),
        length_mode)
    t = torch.from_numpy(np.ascontiguousarray(out))
    if weight.dtype == torch.bfloat16:
        t = t.view(torch.int16).view(torch.bfloat16)
    return t.reshape(*ids.shape, weight.shape[1])


def check_matches_spec_model(backend: str, dtype: torch.dtype, d: int, kind: str, length_mode: str,
                             device: str = "cpu") -> None:
    """A (3, 11) batch through ``backend`` equals the spec model bit for bit, over every seed."""
    weight = make_weight(37, d, dtype, device)
    ids = torch.randint(0, 37, (3, 11), generator=torch.Generator().manual_seed(d)).to(device)
    mask, pos = side_inputs(kind, (3, 11), device)
    for seed, offset in zip(SEEDS, OFFSETS * 2):
        out = noisy_embedding(ids, weight, 5.0, seed=seed, offset=offset, attention_mask=mask,
                              position_ids=pos, length_mode=length_mode, backend=backend)
        assert_bits_equal(out, expected(ids, weight, 5.0, seed, offset, mask, pos, length_mode))
