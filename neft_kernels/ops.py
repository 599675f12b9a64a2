"""The functional op: validation, backend choice and autograd around the per-backend kernels."""

from __future__ import annotations

import torch

from . import validation
from .backends import resolve
from .lengths import token_scales


class _NoisyEmbeddingFunction(torch.autograd.Function):
    """Noisy lookup forward; the noise is a constant, so backward is the embedding backward."""

    @staticmethod
    def forward(ctx, ids, weight, scale, seed, offset, padding_idx, scale_grad_by_freq, backend):
        ctx.save_for_backward(ids)
        ctx.num_weights = weight.shape[0]
        ctx.padding_idx = padding_idx
        ctx.scale_grad_by_freq = scale_grad_by_freq
        ctx.backend = backend
        return backend.forward(ids, weight, scale, seed, offset)

    @staticmethod
    def backward(ctx, grad_output):
        (ids,) = ctx.saved_tensors
        grad_weight = ctx.backend.backward(
            grad_output, ids, ctx.num_weights, ctx.padding_idx, ctx.scale_grad_by_freq,
            torch.are_deterministic_algorithms_enabled(),
        )
        return None, grad_weight, None, None, None, None, None, None


def noisy_embedding(
    input_ids: torch.Tensor,
    weight: torch.Tensor,
    noise_alpha: float,
    *,
    seed: int,
    offset: int = 0,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    length_mode: str = "per_sequence",
    padding_idx: int | None = None,
    scale_grad_by_freq: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """Embedding lookup plus NEFTune noise in one pass, bit-exact to noise spec v1.

    Args:
        input_ids: integer token ids of any shape; the last dim is the sequence.
        weight: ``(num_embeddings, embedding_dim)`` float32, bfloat16 or float16 table.
        noise_alpha: NEFTune's alpha; the noise is ``Uniform(-1, 1) * alpha / sqrt(L * d)``.
        seed: 64-bit Philox key, any int in ``[-2**63, 2**64)``.
        offset: first Philox counter; lets one seed serve disjoint calls.
        attention_mask: masked tokens (0) get no noise and do not count towards ``L``.
        position_ids: packed rows; each sub-sequence starts where the value is 0. Both may be
            any shape that broadcasts to ``input_ids``'s.
        length_mode: ``"per_sequence"`` (the paper's per-sequence ``L``) or ``"padded"``
            (Hugging Face's: ``L`` = padded width, every token noised).
        padding_idx: row that receives no gradient, as in ``nn.Embedding``.
        scale_grad_by_freq: divide each row's gradient by its id's count in the batch.
        backend: ``"triton"``, ``"cpu"``, ``"cuda"`` (compiled ``csrc/``), ``"torch"`` (the
            reference) or ``"auto"`` (CUDA: triton, else cuda; CPU: cpu, else torch).

    Returns:
        ``input_ids.shape + (embedding_dim,)`` tensor in ``weight``'s dtype, differentiable
        with respect to ``weight``.
    """
    alpha, seed = validation.check_all(input_ids, weight, noise_alpha, seed, offset,
                                       attention_mask, position_ids, length_mode, backend)
    padding_idx = validation.normalize_padding_idx(padding_idx, weight.shape[0])
    d = weight.shape[1]
    # Hugging Face models often build position_ids as (1, L) for a (B, L) batch.
    if attention_mask is not None:
        attention_mask = attention_mask.expand(input_ids.shape)
    if position_ids is not None:
        position_ids = position_ids.expand(input_ids.shape)
    scale = token_scales(input_ids.shape, alpha, d, attention_mask=attention_mask,
                         position_ids=position_ids, length_mode=length_mode)
    out = _NoisyEmbeddingFunction.apply(
        input_ids.reshape(-1), weight, scale, seed, offset, padding_idx, scale_grad_by_freq,
        resolve(backend, weight.device),
    )
    return out.view(*input_ids.shape, d)
