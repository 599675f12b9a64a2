"""Inputs shared by the bit-exactness tests of every backend, and the spec-model check they share."""

from __future__ import annotations

import itertools
from typing import NamedTuple

import numpy as np
import torch

from neft_kernels import noisy_embedding

from . import spec_model
from .asserts import DTYPES, assert_bits_equal, to_numpy_raw
from .backends import interpreted

SEEDS = [0, 1, -1, 2**40 + 7, -(2**63), 2**64 - 1]
KINDS = ["none", "mask", "packed", "both", "cu_seqlens", "cu_seqlens+mask"]
LENGTH_MODES = ["per_sequence", "padded"]
OFFSETS = [0, 12345, 2**33 + 3]
DIMS = [1, 5, 13, 64]
DISTRIBUTIONS = ["uniform", "gaussian"]
WIDE = 4096 + 3  # more lanes than the widest launch block: several programs per row, a partial last one
# Real models' widths whose lane counts (d / 4) are not powers of two: each takes another launch block
# (32, 64, 128, 256 lanes, several per row) in the compiled kernels.
REAL_WIDTHS = [576, 1152, 2304, 5120]
# The Triton interpreter at real widths takes two (seed, offset) pairs, not all six (2 s a pair at
# d = 5120): there the launch blocks are under test; the seeds' edges are at every width of DIMS.
FEW_SEEDS = [(1, 12345), (2**64 - 1, 2**33 + 3)]


def side_inputs(kind: str, shape: tuple[int, int], device: str = "cpu"):
    """(attention_mask, position_ids) for a (rows, width) batch: padded, packed, both or none."""
    rows, width = shape
    mask = pos = None
    if kind in ("mask", "both", "cu_seqlens+mask"):
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


def cu_seqlens_for(kind: str, shape: tuple[int, int], device: str = "cpu"):
    """flash-attention's cu_seqlens over the flat tokens for the cu kinds: starts inside rows and at
    row starts, a repeated entry, and the end."""
    if not kind.startswith("cu_seqlens"):
        return None
    n = shape[0] * shape[1]
    return torch.tensor([0, 5, 5, shape[1] + 3, n - 4, n], dtype=torch.int32, device=device)


def make_weight(num_embeddings: int, d: int, dtype: torch.dtype, device: str = "cpu") -> torch.Tensor:
    g = torch.Generator().manual_seed(d * 1000 + num_embeddings)
    return (torch.randn(num_embeddings, d, generator=g) * 0.1).to(dtype).to(device)


def expected(ids, weight, alpha, seed, offset, mask, pos, length_mode, cu=None, distribution="uniform",
             noise_mask=None) -> torch.Tensor:
    """Spec model output as a torch tensor of weight's dtype and ids.shape + (d,)."""
    dtype = str(weight.dtype).removeprefix("torch.")
    out = spec_model.noisy_embedding(
        ids.cpu().numpy(), to_numpy_raw(weight), dtype, alpha, seed, offset,
        None if mask is None else mask.cpu().numpy(), None if pos is None else pos.cpu().numpy(),
        length_mode, None if cu is None else cu.cpu().numpy(), distribution,
        None if noise_mask is None else noise_mask.cpu().numpy())
    t = torch.from_numpy(np.ascontiguousarray(out))
    if weight.dtype == torch.bfloat16:
        t = t.view(torch.int16).view(torch.bfloat16)
    return t.reshape(*ids.shape, weight.shape[1])


def noise_mask_for(shape: tuple[int, int], device: str = "cpu") -> torch.Tensor:
    """A response-only noise mask: the first few tokens of each row (the prompt) get no noise."""
    return (torch.arange(shape[1]) >= torch.tensor([3, 1, 6])[: shape[0], None]).to(device)


def check_matches_spec_model(backend: str, dtype: torch.dtype, d: int, kind: str, length_mode: str,
                             device: str = "cpu", distribution: str = "uniform", with_noise_mask: bool = False,
                             few_seeds: bool = False) -> None:
    """A (3, 11) batch through ``backend`` equals the spec model bit for bit, over every seed
    (``FEW_SEEDS`` with ``few_seeds``)."""
    weight = make_weight(37, d, dtype, device)
    ids = torch.randint(0, 37, (3, 11), generator=torch.Generator().manual_seed(d)).to(device)
    mask, pos = side_inputs(kind, (3, 11), device)
    cu = cu_seqlens_for(kind, (3, 11), device)
    noise_mask = noise_mask_for((3, 11), device) if with_noise_mask else None
    for seed, offset in FEW_SEEDS if few_seeds else zip(SEEDS, OFFSETS * 2, strict=True):
        out = noisy_embedding(ids, weight, 5.0, seed=seed, offset=offset, attention_mask=mask, position_ids=pos,
                              cu_seqlens=cu, length_mode=length_mode, backend=backend, distribution=distribution,
                              noise_mask=noise_mask)
        assert_bits_equal(out, expected(ids, weight, 5.0, seed, offset, mask, pos, length_mode, cu, distribution,
                                        noise_mask))


class SpecCase(NamedTuple):
    """One ``check_matches_spec_model`` call's inputs (the backend and device aside)."""

    dtype: torch.dtype
    d: int
    kind: str
    length_mode: str
    distribution: str = "uniform"
    noise_mask: bool = False
    few_seeds: bool = False

    @property
    def id(self) -> str:
        dtype = str(self.dtype).removeprefix("torch.")
        return f"{dtype}-d{self.d}-{self.kind}-{self.length_mode}-{self.distribution}" + (
            "-noise_mask" if self.noise_mask else "")


def spec_cases(backend: str, device: str) -> list[SpecCase]:
    """What ``backend`` on ``device`` is checked on against the spec model.

    Every backend: each dtype, d, kind of side input, length mode and distribution without a
    noise_mask; with one, each dtype, kind, length mode and distribution at d = 13. The compiled
    kernels also at d = 4099 (uniform; Gaussian without and with a noise_mask). The Triton
    interpreter, about 50 times slower, takes the uniform stream over the first grid and the
    Gaussian stream with a noise_mask at d = 13 and cu_seqlens with a mask. Every compiled backend and
    the interpreter also at real models' widths (``REAL_WIDTHS``), padded and packed (the
    interpreter over ``FEW_SEEDS``)."""
    cases = []
    if interpreted(backend, device):
        for dtype, d, kind, length_mode in itertools.product(DTYPES, DIMS, KINDS, LENGTH_MODES):
            cases.append(SpecCase(dtype, d, kind, length_mode))
        for dtype, length_mode in itertools.product(DTYPES, LENGTH_MODES):
            cases.append(SpecCase(dtype, 13, "cu_seqlens+mask", length_mode, "gaussian", True))
        for dtype, d, kind in itertools.product((torch.float32, torch.bfloat16), REAL_WIDTHS, ("mask", "packed")):
            cases.append(SpecCase(dtype, d, kind, "per_sequence", few_seeds=True))
        return cases
    for dtype, d, kind, length_mode, distribution in itertools.product(DTYPES, DIMS, KINDS, LENGTH_MODES,
                                                                       DISTRIBUTIONS):
        cases.append(SpecCase(dtype, d, kind, length_mode, distribution))
    for dtype, kind, length_mode, distribution in itertools.product(DTYPES, KINDS, LENGTH_MODES, DISTRIBUTIONS):
        cases.append(SpecCase(dtype, 13, kind, length_mode, distribution, True))
    if backend != "torch":
        for dtype, kind, length_mode, (distribution, noise_mask) in itertools.product(
                DTYPES, KINDS, LENGTH_MODES, [("uniform", False), ("gaussian", False), ("gaussian", True)]):
            cases.append(SpecCase(dtype, WIDE, kind, length_mode, distribution, noise_mask))
        for dtype, d, kind, distribution in itertools.product(DTYPES, REAL_WIDTHS, ("mask", "packed"),
                                                              DISTRIBUTIONS):
            cases.append(SpecCase(dtype, d, kind, "per_sequence", distribution))
    return cases


def scale_cases(width: int):
    """(attention_mask, position_ids, cu_seqlens) cases for a (3, width) batch, each as the op passes them."""
    g = torch.Generator().manual_seed(width)
    rand = torch.randint(0, 2, (3, width), generator=g)
    rand[1] = 0  # a row with no real tokens
    left = (torch.arange(width) >= width // 3).long()[None].expand(3, width)  # broadcast: stride 0
    pos = torch.arange(width).repeat(3, 1)
    for row in range(3):  # random sub-sequence starts, some long, some of one token
        for start in sorted(torch.randint(0, width, (4,), generator=g).tolist()):
            pos[row, start:] = torch.arange(width - start)
    cu = torch.unique(torch.cat([torch.tensor([0, 3 * width]), torch.randint(0, 3 * width, (5,), generator=g)]))
    strided = torch.randint(0, 2, (3, 2 * width), generator=g, dtype=torch.int8)[:, ::2]  # column stride 2
    for mask in (rand, rand.bool(), rand.int(), left, strided):
        yield mask, None, None
    yield None, pos.short().t().contiguous().t(), None  # int16, column-major: column stride 3
    yield None, pos, None
    yield None, None, cu.int()
    yield rand, pos, None
    yield rand.bool(), pos[:1].expand(3, width), cu  # positions broadcast, cu_seqlens int64
    yield None, None, torch.tensor([0, 1, 1, 2, 3 * width + 5], dtype=torch.int32)  # repeats, an entry past the end
