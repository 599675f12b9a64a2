"""The compiled CPU backend (``csrc/cpu``): fused forward, deterministic float32-accumulating backward."""

from __future__ import annotations

import torch

from .. import _C_cpu


def forward(ids: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | float,
            seed: int, offset: int) -> torch.Tensor:
    if isinstance(scale, torch.Tensor):
        return _C_cpu.forward(ids, weight, scale, 0.0, seed, offset)
    return _C_cpu.forward(ids, weight, None, scale, seed, offset)


def backward(grad: torch.Tensor, ids: torch.Tensor, num_weights: int, padding_idx: int | None,
             scale_grad_by_freq: bool, deterministic: bool) -> torch.Tensor:
    del deterministic  # always deterministic: one thread sums each id's rows in token order
    return _C_cpu.backward(grad, ids, num_weights, -1 if padding_idx is None else padding_idx,
                           scale_grad_by_freq)
