"""The pure-PyTorch backend, ``backend="torch"``: the reference every other backend must equal bit for
bit. Runs on any device; neither lean nor graph-safe (it reads a device seed on the host)."""

from __future__ import annotations

import torch

from .. import lengths, validation
from ..id_check import check_id_range
from ..spec import noise

# Elements (tokens x d) per reference chunk: bounds the int64 temporaries to a few hundred MB.
_CHUNK_ELEMENTS = 1 << 22


def record_bad_ids(ids: torch.Tensor, num_embeddings: int, bad_ids: torch.Tensor) -> None:
    """Fold ids outside ``[0, num_embeddings)`` into the (min, max, V) record, as the kernels do,
    without a sync."""
    ids = ids.long()  # int32 ids would turn the record's int64 sentinels into -1 and 0 (a false alarm)
    bad = (ids < 0) | (ids >= num_embeddings)
    bad_ids[0] = torch.minimum(bad_ids[0], torch.where(bad, ids, bad_ids[0]).min())
    bad_ids[1] = torch.maximum(bad_ids[1], torch.where(bad, ids, bad_ids[1]).max())
    bad_ids[2] = torch.where(bad.any(), torch.clamp(bad_ids[2], min=num_embeddings), bad_ids[2])


def forward(ids: torch.Tensor, weight: torch.Tensor, seed: int | torch.Tensor, offset: int, scale: float | None,
            alpha: float | torch.Tensor, width: int, attention_mask: torch.Tensor | None,
            position_ids: torch.Tensor | None, cu_seqlens: torch.Tensor | None, noise_mask: torch.Tensor | None,
            gaussian: bool, bad_ids: torch.Tensor | None = None) -> torch.Tensor:
    if ids.device.type == "cpu":
        check_id_range(ids, weight.shape[0])
    elif bad_ids is not None and ids.numel():
        record_bad_ids(ids, weight.shape[0], bad_ids)
    scales = scale if scale is not None else token_scales(
        width, ids.numel(), alpha, weight.shape[1], attention_mask, position_ids, cu_seqlens, noise_mask, ids.device)
    if isinstance(seed, torch.Tensor):
        seed = int(seed)  # the reference reads a device seed on the host
    # Written into the output's own shape: a view returned from the op could not be changed in place.
    out = torch.empty(*ids.shape, weight.shape[1], dtype=weight.dtype, device=weight.device)
    reference_forward(ids.reshape(-1), weight, scales, seed, offset, "gaussian" if gaussian else "uniform",
                      out=out.view(ids.numel(), weight.shape[1]))
    return out


def token_scales(width: int, n_tokens: int, alpha: float | torch.Tensor, embedding_dim: int,
                 attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None,
                 cu_seqlens: torch.Tensor | None, noise_mask: torch.Tensor | None = None,
                 device: torch.device | None = None) -> torch.Tensor | float:
    """The backend contract's per-token scales, by :func:`neft_kernels.lengths.token_scales`."""
    if cu_seqlens is not None:
        validation.check_cu_seqlens_ascending(cu_seqlens)
    return lengths.token_scales((n_tokens // width, width) if width else (0, 0), alpha, embedding_dim,
                                attention_mask=attention_mask, position_ids=position_ids, cu_seqlens=cu_seqlens,
                                noise_mask=noise_mask, device=device)


def backward(grad: torch.Tensor, ids: torch.Tensor, num_weights: int, padding_idx: int | None,
             scale_grad_by_freq: bool) -> torch.Tensor:
    return reference_backward(grad, ids, num_weights, padding_idx, scale_grad_by_freq)


def reference_forward(ids: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | float,
                      seed: int, offset: int = 0, distribution: str = "uniform",
                      out: torch.Tensor | None = None) -> torch.Tensor:
    """Spec v2 in plain PyTorch: ``(N,)`` ids and a ``(V, d)`` weight to ``(N, d)`` noisy rows
    (written into ``out`` where given, and returned).

    ``scale`` is the per-token float32 ``scale_n`` as an ``(N,)`` tensor, or one float for all.
    """
    n_tokens, d = ids.numel(), weight.shape[1]
    if out is None:
        out = torch.empty(n_tokens, d, dtype=weight.dtype, device=weight.device)
    if isinstance(scale, torch.Tensor):
        scale = scale.to(torch.float32)
    else:
        scale = torch.tensor(scale, dtype=torch.float32, device=weight.device)
    chunk = max(1, _CHUNK_ELEMENTS // max(d, 1))
    for start in range(0, n_tokens, chunk):
        stop = min(start + chunk, n_tokens)
        e = noise(stop - start, d, seed, offset, weight.device, first_token=start, distribution=distribution)
        s = scale[start:stop, None] if scale.dim() else scale
        chunk_ids = ids[start:stop]
        # An id outside [0, V) is never read (an accelerator's ids arrive unchecked): its row is NaN.
        in_range = (chunk_ids >= 0) & (chunk_ids < weight.shape[0])
        rows = weight[torch.where(in_range, chunk_ids, 0)].to(torch.float32) if weight.shape[0] else e
        out[start:stop] = torch.where(in_range[:, None], rows + e * s, float("nan")).to(weight.dtype)
    return out


def reference_backward(grad: torch.Tensor, ids: torch.Tensor, num_weights: int,
                       padding_idx: int | None, scale_grad_by_freq: bool) -> torch.Tensor:
    """Embedding backward: scatter-add of ``(N, d)`` grad rows into ``(V, d)``, summed in float32.

    The noise is a constant, so this is ``F.embedding``'s gradient, accumulated in float32
    whatever the dtype and rounded once into it; ``scale_grad_by_freq`` divides each id's float32
    sum by its count (every backend sums first, then divides).
    """
    # Sums per distinct id, never a float32 (V, d) buffer: at most (N, d) in float32.
    unique, inverse, counts = torch.unique(ids, return_inverse=True, return_counts=True)
    sums = torch.zeros(unique.numel(), grad.shape[1], dtype=torch.float32, device=grad.device)
    sums.index_add_(0, inverse, grad.to(torch.float32))
    if scale_grad_by_freq:
        sums /= counts.to(torch.float32)[:, None]
    # Ids outside [0, V) get no row (as in the kernels: an accelerator's bad ids may reach the
    # backward before their record does), nor does padding_idx.
    keep = (unique >= 0) & (unique < num_weights)
    if padding_idx is not None:
        keep &= unique != padding_idx
    grad_weight = torch.zeros(num_weights, grad.shape[1], dtype=grad.dtype, device=grad.device)
    grad_weight[unique[keep]] = sums[keep].to(grad.dtype)
    return grad_weight
