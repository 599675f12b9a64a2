"""The pure-PyTorch backend: spec v1's reference, runs on any device."""

from __future__ import annotations

import torch

from ..spec import reference_backward, reference_forward


def forward(ids: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | float,
            seed: int, offset: int) -> torch.Tensor:
    return reference_forward(ids, weight, scale, seed, offset)


def backward(grad: torch.Tensor, ids: torch.Tensor, num_weights: int, padding_idx: int | None,
             scale_grad_by_freq: bool, deterministic: bool) -> torch.Tensor:
    # index_add_ honours torch's deterministic mode by itself.
    del deterministic
    return reference_backward(grad, ids, num_weights, padding_idx, scale_grad_by_freq)
