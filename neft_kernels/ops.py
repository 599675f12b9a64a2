"""The functional op and its ``torch.library`` registration.

``neft_kernels::noisy_embedding_fwd`` and ``neft_kernels::embedding_bwd`` are custom ops with fake
kernels and registered autograd, so ``torch.compile(fullgraph=True)`` traces through them. The seed
is a tensor input of the op, never a constant baked into a graph.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import validation
from .backends import _load, module, resolve
from .lengths import token_scales


def _forward_impl(ids: torch.Tensor, weight: torch.Tensor, scale: Optional[torch.Tensor], scale_value: float,
                  seed: torch.Tensor, offset: int, backend: str, check_ids: bool) -> torch.Tensor:
    # Here rather than before the op: compiled graphs run this body eagerly with real ids.
    if check_ids:
        validation.check_id_range(ids, weight.shape[0])
    return module(backend).forward(ids, weight, scale_value if scale is None else scale, int(seed), offset)


def _backward_impl(grad: torch.Tensor, ids: torch.Tensor, num_weights: int, padding_idx: Optional[int],
                   scale_grad_by_freq: bool, backend: str) -> torch.Tensor:
    return module(backend).backward(grad.contiguous(), ids, num_weights, padding_idx, scale_grad_by_freq,
                                    torch.are_deterministic_algorithms_enabled())


@torch.library.custom_op("neft_kernels::noisy_embedding_fwd", mutates_args=())
def _forward_op(ids: torch.Tensor, weight: torch.Tensor, scale: Optional[torch.Tensor], scale_value: float,
                seed: torch.Tensor, offset: int, padding_idx: Optional[int], scale_grad_by_freq: bool,
                backend: str, check_ids: bool = True) -> torch.Tensor:
    """(N,) ids -> (N, d) noisy rows, spec v1: ``scale`` per token, or ``scale_value`` for all.

    ``padding_idx`` and ``scale_grad_by_freq`` only shape the gradient; they are inputs here so
    that the registered autograd can see them. ``check_ids=False`` is for ids that are in range
    by construction (``add_noise``'s positions): no range check, so no sync on a GPU.
    """
    return _forward_impl(ids, weight, scale, scale_value, seed, offset, backend, check_ids)


@_forward_op.register_fake
def _(ids, weight, scale, scale_value, seed, offset, padding_idx, scale_grad_by_freq, backend, check_ids=True):
    return weight.new_empty(ids.shape[0], weight.shape[1])


@torch.library.custom_op("neft_kernels::embedding_bwd", mutates_args=())
def _backward_op(grad: torch.Tensor, ids: torch.Tensor, num_weights: int, padding_idx: Optional[int],
                 scale_grad_by_freq: bool, backend: str) -> torch.Tensor:
    """(N, d) grad rows -> (V, d) weight gradient, summed in float32, in ``grad``'s dtype."""
    # The op is public: ids from elsewhere than our forward are checked (on CPU; no sync).
    validation.check_id_range(ids, num_weights, allow_sync=False)
    return _backward_impl(grad, ids, num_weights, padding_idx, scale_grad_by_freq, backend)


@_backward_op.register_fake
def _(grad, ids, num_weights, padding_idx, scale_grad_by_freq, backend):
    return grad.new_empty(num_weights, grad.shape[1])


def _setup_context(ctx, inputs, output):
    ids, weight, _, _, _, _, padding_idx, scale_grad_by_freq, backend = inputs[:9]
    ctx.save_for_backward(ids)
    ctx.num_weights = weight.shape[0]
    ctx.options = (padding_idx, scale_grad_by_freq, backend)


def _backward(ctx, grad_output):
    (ids,) = ctx.saved_tensors
    grad_weight = _backward_op(grad_output.contiguous(), ids, ctx.num_weights, *ctx.options)
    return None, grad_weight, None, None, None, None, None, None, None, None


_forward_op.register_autograd(_backward, setup_context=_setup_context)


class _EagerFunction(torch.autograd.Function):
    """The same forward and backward as the registered ops, without their dispatch.

    Eager calls come here: ``torch.library`` dispatch costs tens of microseconds of host time per
    call, which on a GPU is longer than the kernel itself at typical batch sizes.
    """

    @staticmethod
    def forward(ctx, ids, weight, scale, scale_value, seed, offset, padding_idx, scale_grad_by_freq, backend,
                check_ids):
        ctx.save_for_backward(ids)
        ctx.num_weights = weight.shape[0]
        ctx.options = (padding_idx, scale_grad_by_freq, backend)
        return _forward_impl(ids, weight, scale, scale_value, seed, offset, backend, check_ids)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        (ids,) = ctx.saved_tensors
        grad_weight = _backward_impl(grad_output, ids, ctx.num_weights, *ctx.options)
        return None, grad_weight, None, None, None, None, None, None, None, None


def _token_scales(input_ids, alpha, d, attention_mask, position_ids, length_mode):
    """:func:`token_scales`, through one Triton launch for an eager padded batch on a GPU."""
    if (attention_mask is not None and attention_mask.is_cuda and position_ids is None and input_ids.dim()
            and length_mode == "per_sequence" and not torch.compiler.is_compiling()
            and not isinstance(_load("triton"), ImportError)):
        return _load("triton").mask_scales(attention_mask, alpha, d)
    return token_scales(input_ids.shape, alpha, d, attention_mask=attention_mask,
                        position_ids=position_ids, length_mode=length_mode)


def noisy_embedding(
    input_ids: torch.Tensor,
    weight: torch.Tensor,
    noise_alpha: float,
    *,
    seed: int | torch.Tensor,
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
        seed: 64-bit Philox key: an int in ``[-2**63, 2**64)``, or a 0-d int64 CPU tensor
            (what :class:`NoisyEmbedding` passes, so that compiled graphs take it as an input).
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
    return _noisy_embedding(input_ids, weight, noise_alpha, seed, offset, attention_mask, position_ids,
                            length_mode, padding_idx, scale_grad_by_freq, backend, check_ids=True)


def _noisy_embedding(input_ids, weight, noise_alpha, seed, offset, attention_mask, position_ids, length_mode,
                     padding_idx, scale_grad_by_freq, backend, check_ids: bool) -> torch.Tensor:
    alpha, seed = validation.check_all(input_ids, weight, noise_alpha, seed, offset,
                                       attention_mask, position_ids, length_mode, backend)
    padding_idx = validation.normalize_padding_idx(padding_idx, weight.shape[0])
    d = weight.shape[1]
    # Hugging Face models often build position_ids as (1, L) for a (B, L) batch.
    if attention_mask is not None:
        attention_mask = attention_mask.expand(input_ids.shape)
    if position_ids is not None:
        position_ids = position_ids.expand(input_ids.shape)
    scale = _token_scales(input_ids, alpha, d, attention_mask, position_ids, length_mode)
    per_token = isinstance(scale, torch.Tensor)
    op = _forward_op if torch.compiler.is_compiling() else _EagerFunction.apply
    out = op(input_ids.reshape(-1), weight, scale if per_token else None, 0.0 if per_token else scale,
             seed, offset, padding_idx, bool(scale_grad_by_freq), resolve(backend, weight.device), check_ids)
    return out.view(*input_ids.shape, d)


def add_noise(x: torch.Tensor, noise_alpha: float, *, seed: int | torch.Tensor, offset: int = 0,
              attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
              length_mode: str = "per_sequence", backend: str = "auto") -> torch.Tensor:
    """``x`` (``(..., L, d)`` embeddings already looked up) plus spec v1 noise, differentiable.

    Spec v1 noise depends on token positions, not on ids, so this is the fused op with ids
    ``0..N-1`` into ``x``'s rows: the same noise :func:`noisy_embedding` adds for the same seed,
    offset and side inputs. For embeddings computed some other way: scaled subclasses, or a
    tensor-parallel lookup after its reduction.
    """
    rows = x.reshape(-1, x.shape[-1])
    positions = torch.arange(rows.shape[0], device=x.device).view(x.shape[:-1])
    # The positions are in range by construction: no id check, so no host-device sync on a GPU.
    return _noisy_embedding(positions, rows, noise_alpha, seed, offset, attention_mask, position_ids, length_mode,
                            None, False, backend, check_ids=False).view(x.shape)
