"""The pure-PyTorch backend: spec v2's reference, runs on any device (not graph-safe, not lean)."""

from __future__ import annotations

import torch

from ..id_check import check_id_range
from ..lengths import token_scales
from ..spec import reference_backward, reference_forward


def forward(ids: torch.Tensor, weight: torch.Tensor, seed: int | torch.Tensor, offset: int, scale: float | None,
            alpha: float | torch.Tensor, width: int, attention_mask: torch.Tensor | None,
            position_ids: torch.Tensor | None, cu_seqlens: torch.Tensor | None, noise_mask: torch.Tensor | None,
            gaussian: bool, bad_ids: torch.Tensor | None = None) -> torch.Tensor:
    if ids.device.type == "cpu":
        check_id_range(ids, weight.shape[0])
    elif bad_ids is not None and ids.numel():  # record (min, max, V), as the kernels do, without a sync
        bad = (ids < 0) | (ids >= weight.shape[0])
        bad_ids[0] = torch.minimum(bad_ids[0], torch.where(bad, ids, bad_ids[0]).min())
        bad_ids[1] = torch.maximum(bad_ids[1], torch.where(bad, ids, bad_ids[1]).max())
        bad_ids[2] = torch.where(bad.any(), torch.clamp(bad_ids[2], min=weight.shape[0]), bad_ids[2])
    if scale is None:
        scale = token_scales((ids.numel() // width, width) if width else (0, 0), alpha, weight.shape[1],
                             attention_mask=attention_mask, position_ids=position_ids, cu_seqlens=cu_seqlens,
                             noise_mask=noise_mask, device=ids.device)
    if isinstance(seed, torch.Tensor):
        seed = int(seed)  # the reference reads a device seed on the host
    return reference_forward(ids.reshape(-1), weight, scale, seed, offset,
                             "gaussian" if gaussian else "uniform").view(*ids.shape, weight.shape[1])


def backward(grad: torch.Tensor, ids: torch.Tensor, num_weights: int, padding_idx: int | None,
             scale_grad_by_freq: bool, deterministic: bool) -> torch.Tensor:
    # index_add_ honours torch's deterministic mode by itself.
    del deterministic
    return reference_backward(grad, ids, num_weights, padding_idx, scale_grad_by_freq)
