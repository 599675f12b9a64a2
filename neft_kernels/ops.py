"""The functional op: O(1) host work per call, one autograd rule, and the ``torch.library`` ops.

Per call, Python reads shapes, dtypes and devices only; everything per token (scales from the side
inputs, the id range) happens in the backend, on the tensors' device. The autograd rule is
:class:`_NoisyEmbeddingFunction`'s: eagerly it calls the backend directly (dispatch through
``torch.library`` costs more host time than the kernel takes on a GPU); under ``torch.compile`` the
call is the custom op ``neft_kernels::noisy_embedding_fwd``, whose registered autograd is the same
rule (its backward the op ``neft_kernels::embedding_bwd``); both have fake kernels, so graphs trace
with no break. A backend with a ``forward_with_grad`` (the compiled CPU and CUDA ones) serves eager
calls with the same rule as a native autograd node instead: a Python ``autograd.Function`` alone
costs about what ``F.embedding``'s whole call does. Recorders that cannot see into a native call
(``torch.jit.trace``, compiled autograd) and ``torch.func`` transforms get the Function.
"""

from __future__ import annotations

from functools import cache
from typing import Callable, Optional

import torch

from . import validation
from .backends import module, resolve
from .compat import (
    forward_ad_active,
    function_c_apply,
    functorch_transforms_active,
    native_autograd_unseen,
    vmaps_not_batching,
)
from .id_check import check_id_range, device_id_flag, prepare_flag, raise_pending
from .lengths import LENGTH_MODES, scale_for_length
from .spec import DISTRIBUTIONS, SUPPORTED_DTYPES, num_lanes

_NONE = (None, None, None, None)


def _forward_impl(ids: torch.Tensor, weight: torch.Tensor, seed: int | torch.Tensor, alpha: float | torch.Tensor,
                  offset: int, scale: float, width: int, attention_mask: Optional[torch.Tensor],
                  position_ids: Optional[torch.Tensor], cu_seqlens: Optional[torch.Tensor],
                  noise_mask: Optional[torch.Tensor], per_token: bool, gaussian: bool, backend: str,
                  check_ids: bool) -> torch.Tensor:
    if isinstance(seed, torch.Tensor) and seed.is_cpu:
        seed = int(seed)
    if isinstance(alpha, torch.Tensor) and alpha.is_cpu:
        # No sync; only an accelerator's kernels read alpha from memory. Checked here for compiled
        # graphs, whose alpha is a graph input that no call-time check saw.
        alpha = validation.check_alpha(alpha.item())
    flag = device_id_flag(ids) if check_ids and not ids.is_cpu else None
    out = module(backend).forward(ids, weight, seed, offset, None if per_token else scale, alpha, width,
                                  attention_mask, position_ids, cu_seqlens, noise_mask, gaussian,
                                  None if flag is None else flag.buffer)
    if flag is not None:
        flag.after_launch(backend)
    return out


def _backward_impl(grad: torch.Tensor, ids: torch.Tensor, num_weights: int, padding_idx: Optional[int],
                   scale_grad_by_freq: bool, backend: str) -> torch.Tensor:
    if grad.is_cuda:
        raise_pending(grad.device)  # bad ids of this step's forward, if its record has landed
    return module(backend).backward(grad.contiguous(), ids, num_weights, padding_idx, scale_grad_by_freq)


@torch.library.custom_op("neft_kernels::noisy_embedding_fwd", mutates_args=())
def _forward_op(ids: torch.Tensor, weight: torch.Tensor, seed: torch.Tensor, alpha: torch.Tensor, offset: int,
                scale: float, width: int, attention_mask: Optional[torch.Tensor], position_ids: Optional[torch.Tensor],
                cu_seqlens: Optional[torch.Tensor], noise_mask: Optional[torch.Tensor], per_token: bool,
                gaussian: bool, padding_idx: Optional[int], scale_grad_by_freq: bool, backend: str,
                check_ids: bool = True) -> torch.Tensor:
    """Ids of any shape -> ``ids.shape + (d,)`` noisy rows, spec v2.

    ``scale`` for every token, or with ``per_token`` the scales the backend derives from ``alpha``
    (a 0-d float64 tensor, on the CPU or read by the kernel on the weight's device) and the side
    inputs (``(rows, width)`` views; ``cu_seqlens`` 1-D). ``seed``: a 0-d int64 tensor on the CPU
    or on the weight's device (read by the kernel: graph-safe). ``padding_idx`` and
    ``scale_grad_by_freq`` only shape the gradient.
    """
    return _forward_impl(ids, weight, seed, alpha, offset, scale, width, attention_mask, position_ids, cu_seqlens,
                         noise_mask, per_token, gaussian, backend, check_ids)


@_forward_op.register_fake
def _(ids, weight, seed, alpha, offset, scale, width, attention_mask, position_ids, cu_seqlens, noise_mask, per_token,
      gaussian, padding_idx, scale_grad_by_freq, backend, check_ids=True):
    return weight.new_empty(*ids.shape, weight.shape[1])


@torch.library.custom_op("neft_kernels::embedding_bwd", mutates_args=())
def _backward_op(grad: torch.Tensor, ids: torch.Tensor, num_weights: int, padding_idx: Optional[int],
                 scale_grad_by_freq: bool, backend: str) -> torch.Tensor:
    """(N, d) grad rows -> (V, d) weight gradient, summed in float32, in ``grad``'s dtype."""
    # The op is public: ids from elsewhere than our forward are checked (on CPU; no sync), and so is
    # one grad row per id on the ids' device (the kernels read grad row i for the i-th id: another
    # count of rows read past the end on a GPU).
    if grad.dim() != 2 or grad.shape[0] != ids.numel() or grad.device != ids.device:
        raise ValueError(f"embedding_bwd: grad must be (N, d) with one row per id on the ids' device, got grad of "
                         f"shape {tuple(grad.shape)} on {grad.device} for {ids.numel()} ids on {ids.device}")
    check_id_range(ids, num_weights, allow_sync=False)
    return _backward_impl(grad, ids, num_weights, padding_idx, scale_grad_by_freq, backend)


@_backward_op.register_fake
def _(grad, ids, num_weights, padding_idx, scale_grad_by_freq, backend):
    return grad.new_empty(num_weights, grad.shape[1])


class _NoisyEmbeddingFunction(torch.autograd.Function):
    """The autograd rule, for eager calls that run the backend through it (a backend's
    ``forward_with_grad`` implements the same rule natively for its eager calls).

    ``save`` and ``weight_grad`` are also the forward op's registered autograd, which compiled
    graphs take (they call the op), so the op is differentiable on its own with the same rule. The
    forward takes no ``ctx`` (``setup_context`` saves), so that ``torch.func`` transforms take the
    Function too: ``grad``/``vjp`` through ``backward``, ``jvp``/forward-mode AD through
    :meth:`jvp`, ``vmap`` through :meth:`vmap`.
    """

    @staticmethod
    def save(ctx, ids, weight, padding_idx, scale_grad_by_freq, backend) -> None:
        ctx.save_for_backward(ids)
        ctx.grad_args = (weight.shape[0], padding_idx, scale_grad_by_freq, backend)

    @staticmethod
    def weight_grad(ctx, grad_output, kernel: Callable[..., torch.Tensor]):
        """The weight gradient of the output gradient's rows by ``kernel``: the backward op (traced
        graphs), the backend directly, or :func:`_differentiable_weight_grad`."""
        (ids,) = ctx.saved_tensors
        grad_rows = grad_output.reshape(ids.numel(), grad_output.shape[-1])
        return kernel(grad_rows, ids.reshape(-1), *ctx.grad_args)

    @staticmethod
    def forward(ids, weight, seed, alpha, attention_mask, position_ids, cu_seqlens, noise_mask, args):
        offset, scale, width, per_token, gaussian, _, _, backend, check_ids, _ = args
        return _forward_impl(ids, weight, seed, alpha, offset, scale, width, attention_mask, position_ids, cu_seqlens,
                             noise_mask, per_token, gaussian, backend, check_ids)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ids, weight, *_, args = inputs
        _, _, _, _, _, padding_idx, scale_grad_by_freq, backend, _, _ = args
        _NoisyEmbeddingFunction.save(ctx, ids, weight, padding_idx, scale_grad_by_freq, backend)
        ctx.save_for_forward(ids)

    @staticmethod
    def backward(ctx, grad_output):
        if torch.compiler.is_compiling():  # compiled autograd
            kernel = _backward_op
        elif torch.is_grad_enabled() or forward_ad_active() or functorch_transforms_active():
            # create_graph, a dual output gradient, or torch.func (whose tensors the kernels cannot
            # read): the gradient as a Function, differentiable, with a tangent and a vmap rule.
            kernel = _differentiable_weight_grad
        else:
            kernel = _backward_impl
        grad_weight = _NoisyEmbeddingFunction.weight_grad(ctx, grad_output, kernel)
        return None, grad_weight, None, None, None, None, None, None, None

    @staticmethod
    def jvp(ctx, ids_t, weight_t, *_):
        """The noise does not depend on the weight: the output's tangent is the lookup of the
        weight's (as ``F.embedding``'s, ``padding_idx`` included). Ids are clamped into the table:
        bad ones are reported as for the output. Alpha gets no tangent, as it gets no gradient."""
        if weight_t is None:
            return None
        (ids,) = ctx.saved_tensors
        return torch.nn.functional.embedding(ids.clamp(0, weight_t.shape[0] - 1), weight_t)

    @staticmethod
    def vmap(info, in_dims, ids, weight, seed, alpha, attention_mask, position_ids, cu_seqlens, noise_mask, args):
        """Each example as a call of its own (its rows, their ``L``), with vmap's ``randomness``:
        ``"different"`` gives the examples the Philox counters of one call over them stacked, example
        after example (``offset + b * N * Q``; nested vmaps in the same order), ``"same"`` every
        example the first's, and ``"error"`` (vmap's default) refuses, as torch's random ops do."""
        if info.randomness == "error":
            raise RuntimeError(_VMAP_RANDOMNESS)
        batch, tensors = info.batch_size, (ids, weight, seed, alpha, attention_mask, position_ids, cu_seqlens,
                                           noise_mask)
        span, d = args[9], weight.shape[-1]
        if info.randomness == "different" and span is None and in_dims[1] is None and in_dims[2] is None \
                and in_dims[3] is None:  # one call over the stacked examples: their noise, their gradient
            return _stacked_call(batch, in_dims, tensors, args), 0
        if batch == 0:
            shape = ids.shape if in_dims[0] is None else ids.shape[:in_dims[0]] + ids.shape[in_dims[0] + 1:]
            return weight.new_empty(0, *shape, d), 0
        # A weight, seed or alpha per example (or "same"): a call per example, each told how many
        # counters it spans so that an enclosing vmap continues after all of them.
        examples = _examples(tensors, in_dims, batch)
        span = span or max(examples[0][0].numel(), 1) * num_lanes(d)
        step = span if info.randomness == "different" else 0
        validation.check_offset(args[0], (batch * step or span) // num_lanes(d), d)
        outs = [_NoisyEmbeddingFunction.apply(*example, (args[0] + b * step, *args[1:9], batch * step or span))
                for b, example in enumerate(examples)]
        return torch.stack(outs), 0


def _examples(tensors, in_dims, batch: int) -> list[list]:
    """A vmap rule's inputs, example by example (an input vmap does not batch is every example's)."""
    return [[t if dim is None else t.select(dim, b) for t, dim in zip(tensors, in_dims, strict=False)]
            for b in range(batch)]


_VMAP_RANDOMNESS = ("vmap: noisy_embedding draws random noise, and vmap's randomness is 'error' (its default): pass "
                    "randomness='different' (each example its own noise, as in one call over the stacked examples) "
                    "or 'same' (every example the same noise) to torch.func.vmap. torch.func.jacfwd vmaps with "
                    "randomness='error' unless given one: pass randomness='same'; torch.func.hessian takes none: "
                    "write hessian(f) as jacfwd(jacrev(f), randomness='same')")


def _stacked_call(batch: int, in_dims, tensors, args) -> torch.Tensor:
    """vmap's examples as one call: ids stacked (0-d examples as one-token rows), the side inputs'
    rows stacked, each example's ``cu_seqlens`` moved past the examples before it."""
    ids, weight, seed, alpha, attention_mask, position_ids, cu_seqlens, noise_mask = tensors

    def stacked(t, dim):
        return t.movedim(dim, 0) if dim is not None else t.expand(batch, *t.shape)

    ids = stacked(ids, in_dims[0])
    shape = ids.shape
    if ids.dim() == 1:
        ids = ids.unsqueeze(-1)
    n = ids[0].numel() if batch else 0
    validation.check_offset(args[0], batch * n, weight.shape[-1])
    side = [None if t is None else stacked(t, dim).reshape(-1, ids.shape[-1])
            for t, dim in ((attention_mask, in_dims[4]), (position_ids, in_dims[5]), (noise_mask, in_dims[7]))]
    if cu_seqlens is not None:
        # Entries outside an example mark no start there; clamped to its ends (a row start anyway) they
        # mark none in the next example either, and stay ascending.
        cu = stacked(cu_seqlens, in_dims[6]).clamp(0, n)
        cu_seqlens = (cu.long() + torch.arange(batch, device=cu.device)[:, None] * n).reshape(-1)
    out = _NoisyEmbeddingFunction.apply(ids, weight, seed, alpha, side[0], side[1], cu_seqlens, side[2], args)
    return out.reshape(*shape, out.shape[-1])


class _WeightGradFunction(torch.autograd.Function):
    """The weight gradient (the backward kernel) as a Function of the output gradient's rows, for a
    backward that is itself differentiated (``create_graph``, forward over reverse, ``torch.func``).
    It is linear in those rows: its tangent is the kernel applied to theirs; its own backward
    gathers a cotangent's rows at the ids, none for ``padding_idx``, as ``F.embedding``'s double
    backward does (not divided by ``scale_grad_by_freq``'s counts: that gradient is a rescaling, and
    so ``vhp`` is the derivative of the gradient returned). :meth:`vmap` runs it once per example
    (per-sample gradients)."""

    @staticmethod
    def forward(grad_rows, ids, grad_args):
        return _backward_impl(grad_rows, ids, *grad_args)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        _, ids, grad_args = inputs
        ctx.save_for_backward(ids)
        ctx.save_for_forward(ids)
        ctx.grad_args = grad_args

    @staticmethod
    def backward(ctx, cotangent):
        (ids,) = ctx.saved_tensors
        padding_idx = ctx.grad_args[1]
        rows = cotangent.index_select(0, ids)
        if padding_idx is not None:
            rows = rows.masked_fill((ids == padding_idx).unsqueeze(-1), 0)
        return rows, None, None

    @staticmethod
    def jvp(ctx, grad_rows_t, *_):
        (ids,) = ctx.saved_tensors
        return _WeightGradFunction.apply(grad_rows_t, ids, ctx.grad_args)

    @staticmethod
    def vmap(info, in_dims, grad_rows, ids, grad_args):
        if info.batch_size == 0:
            return grad_rows.new_zeros(0, grad_args[0], grad_rows.shape[-1]), 0
        examples = _examples((grad_rows, ids), in_dims, info.batch_size)
        return torch.stack([_WeightGradFunction.apply(*example, grad_args) for example in examples]), 0


def _differentiable_weight_grad(grad_rows, ids, *grad_args) -> torch.Tensor:
    return _WeightGradFunction.apply(grad_rows, ids, grad_args)


# Outside functorch transforms and tracing, Function.apply's C entry point is called directly.
_apply_eager = function_c_apply(_NoisyEmbeddingFunction)


def _op_setup_context(ctx, inputs, output):
    ids, weight, *_, padding_idx, scale_grad_by_freq, backend, _check_ids = inputs
    _NoisyEmbeddingFunction.save(ctx, ids, weight, padding_idx, scale_grad_by_freq, backend)


def _op_backward(ctx, grad_output):
    return (None, _NoisyEmbeddingFunction.weight_grad(ctx, grad_output, _backward_op), *(None,) * 15)


_forward_op.register_autograd(_op_backward, setup_context=_op_setup_context)


def _rows(t: torch.Tensor, shape: torch.Size, rows: int, width: int) -> torch.Tensor:
    """A side input as a (rows, width) view; broadcast dims keep stride 0 (no copy for 2-D ids)."""
    if t.shape != shape:
        t = t.expand(shape)
    return t if t.dim() == 2 else t.reshape(rows, width)


def noisy_embedding(
    input_ids: torch.Tensor,
    weight: torch.Tensor,
    noise_alpha: float | torch.Tensor,
    *,
    seed: int | torch.Tensor,
    offset: int = 0,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    noise_mask: torch.Tensor | None = None,
    length_mode: str = "per_sequence",
    distribution: str = "uniform",
    padding_idx: int | None = None,
    scale_grad_by_freq: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """Embedding lookup plus NEFTune noise in one pass, bit-exact to noise spec v2.

    Args:
        input_ids: integer token ids of any shape; the last dim is the sequence.
        weight: ``(num_embeddings, embedding_dim)`` float32, bfloat16 or float16 table.
        noise_alpha: NEFTune's alpha; the noise is ``e * alpha / sqrt(L * d)``. A float, or a
            0-d floating tensor on the CPU or on the weight's device: there the kernels read it
            (a compiled graph takes it as an input, a captured CUDA graph reads its current
            value at each replay); its value is not checked on the host (that would sync).
        seed: 64-bit Philox key: an int (or NumPy integer) in ``[-2**63, 2**64)``, or a 0-d int64 tensor on the CPU
            or on the weight's device (read by the kernel there, so a captured CUDA graph uses
            the seed each replay draws).
        offset: first Philox counter; lets one seed serve disjoint calls.
        attention_mask: masked tokens (0) get no noise and do not count towards ``L``.
        position_ids: packed rows; each sub-sequence starts where the value is 0. Both may be
            any shape that broadcasts to ``input_ids``'s.
        cu_seqlens: packed sequences in flash-attention's convention: 1-D int32 (or int64)
            cumulative starts ``[0, l0, l0 + l1, ...]`` over the flattened tokens, ascending as
            flash-attention requires; a sub-sequence starts at each entry (the same ``L`` as the
            equivalent ``position_ids``). Repeated entries and entries outside ``[0, N)`` mark no
            extra start. A CPU tensor whose entries descend is refused (by the backend, which reads it
            anyway); an accelerator's values are not read on the host (that would sync).
        noise_mask: tokens where it is 0 get no noise but still count towards ``L`` (response-
            or prompt-only noise, a multimodal model's placeholder tokens); broadcasts like
            ``attention_mask``.
        length_mode: ``"per_sequence"`` (the paper's per-sequence ``L``) or ``"padded"``
            (Hugging Face's: ``L`` = padded width, every token noised).
        distribution: ``"uniform"`` (``e ~ U(-1, 1)``, spec v1) or ``"gaussian"`` (``e ~ N(0, 1)``,
            spec v2's Box-Muller stream), at the same scale.
        padding_idx: row that receives no gradient, as in ``nn.Embedding``.
        scale_grad_by_freq: divide each row's gradient by its id's count in the batch.
        backend: ``"triton"``, ``"cpu"``, ``"cuda"`` (compiled ``csrc/``), ``"torch"`` (the
            reference) or ``"auto"`` (CUDA: cuda, else triton; CPU: cpu, else torch).

    Returns:
        ``input_ids.shape + (embedding_dim,)`` tensor in ``weight``'s dtype, differentiable
        with respect to ``weight``.
    """
    return _noisy_embedding(input_ids, weight, validation.check_alpha_arg(noise_alpha, weight), seed, offset,
                            attention_mask, position_ids, cu_seqlens, noise_mask, length_mode, distribution,
                            padding_idx, scale_grad_by_freq, backend, True)


def _noisy_embedding(input_ids, weight, alpha: float | torch.Tensor, seed, offset, attention_mask, position_ids,
                     cu_seqlens, noise_mask, length_mode, distribution, padding_idx, scale_grad_by_freq, backend,
                     check_ids: bool) -> torch.Tensor:
    """:func:`noisy_embedding` after its alpha check: O(1) host work, then the backend's native
    autograd node or the autograd Function.
    (Positional: this is every call's path.)"""
    validation.check_call(input_ids, weight, offset, attention_mask, position_ids, cu_seqlens, noise_mask)
    if length_mode not in LENGTH_MODES or distribution not in DISTRIBUTIONS:
        validation.check_choice("length_mode", length_mode, LENGTH_MODES)
        validation.check_choice("distribution", distribution, DISTRIBUTIONS)
    if type(seed) is not int or not -(1 << 63) <= seed < 1 << 63:  # not an int64 value already
        seed = validation.normalize_seed(seed, weight.device)
    if padding_idx is not None:
        padding_idx = validation.normalize_padding_idx(padding_idx, weight.shape[0])
    shape = input_ids.shape
    width = shape[-1] if shape else 1
    n = input_ids.numel()
    rows = n // width if width else 0
    tensor_alpha = isinstance(alpha, torch.Tensor)
    if length_mode == "padded":  # L = the row width, whatever the mask or packing says
        attention_mask = position_ids = cu_seqlens = None
    # Per-token scales, derived by the backend on the device: from the side inputs, a noise mask, or
    # an alpha the host does not read.
    per_token = n > 0 and weight.shape[1] > 0 and (
        tensor_alpha or attention_mask is not None or position_ids is not None or cu_seqlens is not None
        or noise_mask is not None)
    if per_token:
        side = (None if attention_mask is None else _rows(attention_mask, shape, rows, width),
                None if position_ids is None else _rows(position_ids, shape, rows, width), cu_seqlens,
                None if noise_mask is None else _rows(noise_mask, shape, rows, width))
        scale = 0.0
    else:
        side = _NONE
        # No token to scale; alpha is a float unless tensor_alpha.
        scale = 0.0 if tensor_alpha else scale_for_length(alpha, max(width, 1), weight.shape[1])  # type: ignore[arg-type]
    name, gaussian = resolve(backend, weight.device), distribution == "gaussian"
    compiling = torch.compiler.is_compiling()
    traced = compiling or functorch_transforms_active()
    # A seed tensor on an accelerator stays there (int() would sync): the Function reads it on the device.
    device_seed = type(seed) is not int and isinstance(seed, torch.Tensor) and not seed.is_cpu
    with_grad = None if traced or tensor_alpha or device_seed or native_autograd_unseen() else _with_grad(name)
    if with_grad is not None:  # the backend's own autograd node, native code
        flag = device_id_flag(input_ids) if check_ids and name != "cpu" else None  # CPU ids: checked in C++
        out = with_grad(input_ids, weight, int(seed), offset, None if per_token else scale, alpha, width, *side,
                        gaussian, padding_idx, bool(scale_grad_by_freq), None if flag is None else flag.buffer)
        if flag is not None:
            flag.after_launch(name)
        return out
    if traced and check_ids and weight.is_cuda:
        prepare_flag(weight.device)
    if compiling:  # the custom op, whose registered autograd is the Function's rule
        if functorch_transforms_active():
            raise RuntimeError("noisy_embedding: torch.func transforms (vmap, grad, jvp) inside torch.compile are not "
                               "supported (the registered op has no rule for them); apply them outside the compiled "
                               "function, or run it eagerly")
        if not isinstance(seed, torch.Tensor):
            seed = torch.tensor(seed, dtype=torch.int64)
        if not tensor_alpha:
            alpha = torch.tensor(alpha, dtype=torch.float64)
        return _forward_op(input_ids, weight, seed, alpha, offset, scale, width, *side, per_token, gaussian,
                           padding_idx, bool(scale_grad_by_freq), name, check_ids)
    # The last: the counters the call spans, where a vmap rule tells it (None: its own tokens')
    args = (offset, scale, width, per_token, gaussian, padding_idx, bool(scale_grad_by_freq), name, check_ids, None)
    if traced:
        for randomness in vmaps_not_batching((input_ids, weight, seed, alpha, *side)):
            if randomness != "same":  # the Function's vmap rule never sees such a vmap: decide here
                raise RuntimeError(_VMAP_RANDOMNESS if randomness == "error" else
                                   "vmap(randomness='different'): none of the inputs noisy_embedding reads (ids, "
                                   "weight, seed, alpha, and the side inputs its length_mode uses) is batched by this "
                                   "vmap, so every example would get the same noise; batch the ids (in_dims), or pass "
                                   "randomness='same'")
        return _NoisyEmbeddingFunction.apply(input_ids, weight, seed, alpha, *side, args)
    return _apply_eager(input_ids, weight, seed, alpha, *side, args)


@cache
def _with_grad(backend: str) -> Callable | None:
    """The backend's ``forward_with_grad``, where it has one."""
    return getattr(module(backend), "forward_with_grad", None)


def add_noise(x: torch.Tensor, noise_alpha: float | torch.Tensor, *, seed: int | torch.Tensor, offset: int = 0,
              attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
              cu_seqlens: torch.Tensor | None = None, noise_mask: torch.Tensor | None = None,
              length_mode: str = "per_sequence", distribution: str = "uniform",
              backend: str = "auto") -> torch.Tensor:
    """``x`` (``(..., L, d)`` embeddings already looked up) plus spec v2 noise, differentiable.

    The noise depends on token positions, not on ids, so this is the fused op with ids
    ``0..N-1`` into ``x``'s rows: the same noise :func:`noisy_embedding` adds for the same seed,
    offset and side inputs. For embeddings computed some other way: scaled subclasses, or a
    tensor-parallel lookup after its reduction.
    """
    # Checked here, so that errors name add_noise's own arguments (x, not weight or input_ids).
    if not isinstance(x, torch.Tensor) or x.dim() == 0:
        raise TypeError(f"x must be a tensor of embeddings (..., d), got "
                        f"{type(x).__name__ if not isinstance(x, torch.Tensor) else 'a 0-d tensor'}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"x dtype must be one of {SUPPORTED_DTYPES}, got {x.dtype}")
    tokens = "x's tokens (x.shape[:-1])"
    for name, t in (("attention_mask", attention_mask), ("position_ids", position_ids), ("noise_mask", noise_mask)):
        validation.check_side_input(name, t, x.shape[:-1], x.device, of=tokens)
    validation.check_cu_seqlens(cu_seqlens, x.device, of="x")
    rows = x.reshape(-1, x.shape[-1])
    positions = torch.arange(rows.shape[0], device=x.device).view(x.shape[:-1])
    # The positions are in range by construction: no id check.
    return _noisy_embedding(positions, rows, validation.check_alpha_arg(noise_alpha, x), seed, offset, attention_mask,
                            position_ids, cu_seqlens, noise_mask, length_mode, distribution, None, False, backend,
                            False)
