"""The backend interface over a compiled extension (``csrc/``): both compiled backends share it."""

from __future__ import annotations

from types import ModuleType
from typing import Callable

import torch


def backend_functions(ext: ModuleType) -> tuple[Callable, Callable]:
    """``forward`` and ``backward`` with the backend signatures, calling ``ext``."""

    def forward(ids: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | float,
                seed: int, offset: int) -> torch.Tensor:
        if isinstance(scale, torch.Tensor):
            return ext.forward(ids, weight, scale, 0.0, seed, offset)
        return ext.forward(ids, weight, None, scale, seed, offset)

    def backward(grad: torch.Tensor, ids: torch.Tensor, num_weights: int, padding_idx: int | None,
                 scale_grad_by_freq: bool, deterministic: bool) -> torch.Tensor:
        del deterministic  # always deterministic: each id's rows are summed in token order
        return ext.backward(grad, ids, num_weights, -1 if padding_idx is None else padding_idx, scale_grad_by_freq)

    return forward, backward
