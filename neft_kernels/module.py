"""NoisyEmbedding: a drop-in ``nn.Embedding`` that adds NEFTune noise while training."""

from __future__ import annotations

import copy
from contextlib import contextmanager
from typing import Iterator, cast

import torch
from torch import nn

from . import validation
from .backends import SEED_HIGH, SEED_LOW, TRACED_SEED, draw_seed
from .compat import clear_hooks, functorch_disabled
from .distributed import is_dtensor, rank_offset
from .id_check import check_id_range
from .ops import _noisy_embedding, add_noise
from .options import NoiseOptions
from .telemetry import NoiseStats

# What configure_noise sets on a module: make_plain removes it.
NOISE_STATE = ("noise_options", "_noise_on", "_alpha_data", "_side_input_stack", "_noise_stats")
# Where make_noisy keeps an embedding's own class (make_plain puts it back).
ORIGINAL_CLASS = "_neft_original_class"
# A side-input frame's noise_mask when the noised tokens come from labels and the call had none.
MISSING_LABELS = object()
_no_noise_depth = 0
_noise_without_grad_depth = 0
_EMBEDDING_ARGS = ("num_embeddings", "embedding_dim", "padding_idx", "max_norm", "norm_type", "scale_grad_by_freq",
                   "sparse", "_weight", "_freeze", "device", "dtype")  # nn.Embedding's, named in a refusal


@contextmanager
def no_noise() -> Iterator[None]:
    """Within this block every :class:`NoisyEmbedding` is a plain embedding, in train mode too.

    For passes that must see clean embeddings but run with gradients recorded. (Passes that
    autograd does not record get no noise anyway: see :func:`noise_without_grad`.) Nests; not
    thread-local.
    """
    global _no_noise_depth
    _no_noise_depth += 1
    try:
        yield
    finally:
        _no_noise_depth -= 1


@contextmanager
def noise_without_grad() -> Iterator[None]:
    """Within this block, train-mode forwards that autograd does not record are noised too.

    By default a forward under ``torch.no_grad()`` or ``torch.inference_mode()`` gets no noise,
    even in train mode: those are not training steps (DPO/KTO reference log-probs computed from
    the model being trained, generation in train mode for RL rollouts). This restores noising
    them. Nests; not thread-local. (A reentrant ``torch.utils.checkpoint`` around the embedding
    runs its first forward without grad: keep the embedding outside it, as transformers does.)
    """
    global _noise_without_grad_depth
    _noise_without_grad_depth += 1
    try:
        yield
    finally:
        _noise_without_grad_depth -= 1


class NoisyEmbedding(nn.Embedding):
    """``nn.Embedding`` with NEFTune noise in train mode; the same ``state_dict`` and weight.

    In eval mode, with ``noise_alpha == 0`` (eagerly: a compiled, exported or captured call keeps the
    op, which adds ``e * 0``, so that a later alpha is read), under :func:`no_noise`, or in a forward
    that autograd does not record (``torch.no_grad``, ``inference_mode``; see
    :func:`noise_without_grad`), ``forward`` is exactly ``F.embedding``. In train mode each call
    draws a fresh 64-bit seed from the ``generator`` option (default: torch's default CPU generator,
    so ``torch.manual_seed`` makes runs reproducible; CPU draws need no device sync) and calls
    :func:`neft_kernels.noisy_embedding`.

    The noise options (``noise_alpha``, ``length_mode``, ``distribution``, ``backend``,
    ``generator``, ``tp_group``, ...) are those of :class:`~neft_kernels.NoiseOptions`, passed as
    keywords; ``noise_options`` holds them. ``noise_alpha`` may change at any step: the module also
    keeps it as a 0-d float64 tensor on the weight's device, updated in place, which compiled
    graphs and captured CUDA graphs read, so a new value needs no recompile and no re-capture.

    ``attention_mask``, ``position_ids``, ``cu_seqlens`` and ``noise_mask`` come as ``forward``
    arguments or, for callers that pass only ids (as Hugging Face models do), from an enclosing
    :meth:`side_inputs` block.
    """

    # Set by noisy_class for subclasses with their own forward (a scaled embedding, say): noise
    # then goes on that forward's output instead of into the fused lookup.
    _noise_after_own_forward = False

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        padding_idx: int | None = None,
        max_norm: float | None = None,
        norm_type: float = 2.0,
        scale_grad_by_freq: bool = False,
        sparse: bool = False,
        _weight: torch.Tensor | None = None,
        _freeze: bool = False,
        device=None,
        dtype=None,
        **noise_options,
    ) -> None:
        NoiseOptions.refuse_unknown(noise_options, "NoisyEmbedding", _EMBEDDING_ARGS)
        options = NoiseOptions.make(**noise_options)
        if sparse:
            raise ValueError("NoisyEmbedding does not support sparse=True: its fused backward "
                             "produces a dense gradient")
        super().__init__(num_embeddings, embedding_dim, padding_idx, max_norm, norm_type,
                         scale_grad_by_freq, sparse, _weight, _freeze, device, dtype)
        self.configure_noise(options)

    def configure_noise(self, options: NoiseOptions | None = None, /, **changes) -> None:
        """Set the noise options: ``options`` (default: the current ones) with ``changes``, all
        checked before any is set."""
        options = NoiseOptions.make(options if options is not None else vars(self).get("noise_options"), **changes)
        self.noise_options = options
        self._noise_on = options.noise_alpha != 0
        with torch.no_grad():  # in place: compiled and captured graphs read this tensor
            self._alpha_tensor(self.weight.device).fill_(options.noise_alpha)
        if "_side_input_stack" not in vars(self):
            self._side_input_stack: list[tuple[torch.Tensor | None, ...]] = []
            self._noise_stats: NoiseStats | None = None

    def _apply(self, fn, recurse=True):
        # ``.to(device)`` / ``.cuda()`` / ``to_empty``: alpha's tensor follows the weight's device
        # (and stays float64 whatever the weight's dtype becomes).
        result = super()._apply(fn, recurse)
        if "noise_options" in vars(self):
            self._alpha_tensor(self.weight.device)
        return result

    def _alpha_tensor(self, device: torch.device) -> torch.Tensor:
        """alpha's tensor on ``device``, made there when there is none yet or it is elsewhere (a
        ``.to()``, or a weight replaced by assignment, which skips ``_apply``), so that a kernel never
        reads another device's memory."""
        alpha = vars(self).get("_alpha_data")
        if alpha is None or alpha.device != device:
            alpha = self._alpha_data = torch.tensor(self.noise_options.noise_alpha, dtype=torch.float64,
                                                    device=device)
        return alpha

    @contextmanager
    def side_inputs(self, attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                    cu_seqlens: torch.Tensor | None = None, noise_mask: torch.Tensor | None = None) -> Iterator[None]:
        """Supply ``attention_mask`` / ``position_ids`` / ``cu_seqlens`` / ``noise_mask`` to calls
        inside the block that pass only ids.

        Blocks nest and the innermost decides all (an encoder's mask must not reach a decoder
        called without one). A tensor whose shape does not broadcast to the ids' (a mask over
        past tokens, a 4-D attention mask) or a non-tensor (a dict of masks, a ``BlockMask``) is
        not a per-token input and is ignored.
        """
        frame = (attention_mask, position_ids, cu_seqlens, noise_mask)
        stack = self._side_input_stack
        stack.append(frame)
        try:
            yield
        finally:  # its frame and any that calls inside the block left above it (an interrupted model call's)
            for i in range(len(stack) - 1, -1, -1):
                if stack[i] is frame:
                    del stack[i:]
                    break

    @property
    def noise_alpha(self) -> float:
        """NEFTune's alpha; settable at any step (also between compiled calls and CUDA-graph
        replays), refused if negative, NaN or infinite."""
        return self.noise_options.noise_alpha

    @noise_alpha.setter
    def noise_alpha(self, value: float) -> None:
        self.configure_noise(noise_alpha=value)

    def _pending_side_inputs(self, input_ids: torch.Tensor):
        """The innermost frame's side inputs that apply to these ids (others are not per-token inputs)."""
        mask, positions, cu_seqlens, noise_mask = self._side_input_stack[-1]
        if noise_mask is MISSING_LABELS:
            raise ValueError(f"noise_tokens={self.noise_options.noise_tokens!r} takes the noised tokens from the "
                             "labels the model is called with, and this call has none")
        if self.noise_options.noise_tokens != "all" and noise_mask is not None and noise_mask.shape != input_ids.shape:
            raise ValueError(f"noise_tokens={self.noise_options.noise_tokens!r} takes the noised tokens from the "
                             f"labels, which must index these ids: labels of shape {tuple(noise_mask.shape)}, ids "
                             f"of shape {tuple(input_ids.shape)} (a classifier's labels are not per token); use "
                             "noise_tokens='all'")
        mask, positions, noise_mask = ((t != 0 if t.is_floating_point() else t)
                                       if validation.broadcasts_to(t, input_ids.shape) else None
                                       for t in (mask, positions, noise_mask))
        # cu_seqlens indexes the flat tokens; the hooks pass it on only as a 1-D tensor.
        if cu_seqlens is not None and cu_seqlens.device != input_ids.device:
            cu_seqlens = None
        return mask, positions, cu_seqlens, noise_mask

    @classmethod
    def from_pretrained(cls, embeddings: torch.Tensor, freeze: bool = True, padding_idx: int | None = None,
                        max_norm: float | None = None, norm_type: float = 2.0, scale_grad_by_freq: bool = False,
                        sparse: bool = False, **noise_options) -> "NoisyEmbedding":
        """``nn.Embedding.from_pretrained`` (the module holds ``embeddings`` as its weight), with the
        noise options as keywords. A frozen weight still gets noise: it is on the activations."""
        if embeddings.dim() != 2:
            raise ValueError(f"embeddings must be 2-dimensional, got shape {tuple(embeddings.shape)}")
        return cls(embeddings.shape[0], embeddings.shape[1], padding_idx, max_norm, norm_type, scale_grad_by_freq,
                   sparse, _weight=embeddings, _freeze=freeze, **noise_options)

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding, noise_alpha: float = 5.0, **kwargs) -> "NoisyEmbedding":
        """A new noisy module on ``embedding``'s own weight Parameter (tied heads stay tied) and settings.

        An ``nn.Embedding`` subclass (Gemma's scaled embedding, say) keeps its class and its own
        ``forward``: the result is a copy of it, sharing the weight, made noisy as
        :func:`make_noisy` does, so it computes what the source computes (plus noise in train mode).
        """
        from .patching import make_noisy

        NoiseOptions.make(noise_alpha=noise_alpha, **kwargs)  # refused before anything is built
        base = vars(embedding).get(ORIGINAL_CLASS, type(embedding))  # a patched one: its own class
        if base.forward is not nn.Embedding.forward and not issubclass(base, NoisyEmbedding):
            if cls is not NoisyEmbedding:
                raise TypeError(f"{cls.__name__}.from_embedding cannot keep {base.__name__}'s own forward: use "
                                f"NoisyEmbedding.from_embedding, which returns a noisy {base.__name__}")
            copy_ = copy.deepcopy(embedding, memo={id(embedding.weight): embedding.weight})
            clear_hooks(copy_)  # a new module: none of the source's hooks (another NEFTune's, say)
            vars(copy_).pop("neftune_noise_alpha", None)
            return make_noisy(copy_, noise_alpha, **kwargs)
        module = cls(
            embedding.num_embeddings, embedding.embedding_dim, embedding.padding_idx,
            embedding.max_norm, embedding.norm_type, embedding.scale_grad_by_freq, embedding.sparse,
            _weight=embedding.weight.detach(), noise_alpha=noise_alpha, **kwargs,
        )
        module.weight = embedding.weight
        module.train(embedding.training)
        return module

    def _draw_seed(self, weight: torch.Tensor, graph: bool) -> int | torch.Tensor:
        """This call's seed, from the ``generator`` option (default: torch's CPU generator), with no sync.

        Eagerly a host int (an accelerator generator's: a 0-d tensor on its device, read by the
        kernel). Traced by ``torch.compile``, a 0-d int64 tensor, so that the graph takes it as an
        input. On a CUDA weight, while a CUDA graph is captured or a graph compiled
        (``graph``), it is drawn on the device (from the generator if that is a CUDA generator,
        else the device's default one), whose Philox state is graph-safe: every replay draws a new
        seed, reproducibly from ``torch.manual_seed``.
        """
        generator = self.noise_options.generator
        if not graph and (generator is None or generator.device.type == "cpu"):  # the common case first
            return draw_seed(generator)
        if not graph and torch.jit.is_tracing():
            raise RuntimeError(TRACED_SEED)
        device = weight.device
        if graph and device.type == "cuda":
            if generator is not None and generator.device.type != "cuda":
                raise RuntimeError("NoisyEmbedding(generator=...) is a CPU generator: under CUDA graph capture its "
                                   "seeds would be frozen into the graph. Pass a CUDA generator, or none")
            return torch.randint(SEED_LOW, SEED_HIGH, (), dtype=torch.int64, device=device, generator=generator)
        if generator is not None and generator.device.type != "cpu":  # an accelerator's: the seed stays there
            with functorch_disabled():  # under torch.func.vmap: one seed for the whole call
                return torch.randint(SEED_LOW, SEED_HIGH, (), dtype=torch.int64, device=generator.device,
                                     generator=generator)
        return torch.randint(SEED_LOW, SEED_HIGH, (), dtype=torch.int64, generator=generator)  # traced: an input

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None,
                noise_mask: torch.Tensor | None = None) -> torch.Tensor:
        if not self.training or _no_noise_depth or not (torch.is_grad_enabled() or _noise_without_grad_depth):
            return super().forward(input_ids)
        weight: torch.Tensor | None = self._parameters.get("weight")
        if weight is None:  # a parametrized weight is a property, not a parameter (nn.utils.parametrize)
            weight = self.weight
        # Compiled, exported or captured: alpha as the tensor the graph reads (a new value needs no
        # recompile), and the op in the graph at alpha 0 too (an export or a CUDA graph keeps no guard).
        graph = torch.compiler.is_compiling() or (weight.is_cuda and torch.cuda.is_current_stream_capturing())
        if not graph and not self._noise_on:  # graph first: no dynamo guard on _noise_on
            if torch.jit.is_tracing():
                raise RuntimeError(TRACED_SEED)
            return super().forward(input_ids)
        if attention_mask is None and position_ids is None and cu_seqlens is None and noise_mask is None \
                and self._side_input_stack:
            attention_mask, position_ids, cu_seqlens, noise_mask = self._pending_side_inputs(input_ids)
        options = self.noise_options
        alpha = self._alpha_tensor(weight.device) if graph else options.noise_alpha
        seed, offset = self._draw_seed(weight, graph), rank_offset(options.tp_group, weight)
        dtensor = is_dtensor(weight)
        if self._noise_after_own_forward or self.max_norm is not None or dtensor:
            out = self._forward_special(input_ids, alpha, dict(
                seed=seed, offset=offset, attention_mask=attention_mask, position_ids=position_ids,
                cu_seqlens=cu_seqlens, noise_mask=noise_mask, length_mode=options.length_mode,
                distribution=options.distribution, backend=options.backend))
        else:  # the common path, positional: every keyword costs host time here
            out = _noisy_embedding(input_ids, weight, alpha, seed, offset, attention_mask, position_ids, cu_seqlens,
                                   noise_mask, options.length_mode, options.distribution, self.padding_idx,
                                   self.scale_grad_by_freq, options.backend, True)
        if self._noise_stats is not None and not graph and not dtensor:
            with torch.no_grad():
                clean = super().forward(input_ids)
            self._noise_stats.add(input_ids, clean, out, dict(
                attention_mask=attention_mask, position_ids=position_ids, cu_seqlens=cu_seqlens,
                noise_mask=noise_mask, length_mode=options.length_mode))
        return out

    def record_noise_stats(self) -> None:
        """Record statistics of the following noised eager calls until :meth:`read_noise_stats`:
        device tensor work only (an extra lookup per call), for a logging step."""
        if self._noise_stats is None:
            self._noise_stats = NoiseStats()

    def read_noise_stats(self) -> dict[str, float]:
        """The statistics recorded since :meth:`record_noise_stats` (one host read; then recording
        stops): ``noised_fraction`` of the tokens, their ``mean_length`` (``L``) and ``noise_ratio``
        (mean noise norm over embedding norm). Empty when no noised call was recorded."""
        stats = self._take_noise_stats()
        return {} if stats is None else stats.read()

    def _take_noise_stats(self) -> NoiseStats | None:
        """The sums recorded since :meth:`record_noise_stats`, unread (no host read), and recording
        stopped: for adding several embeddings' (``NoiseStats.merge``) before one read."""
        stats, self._noise_stats = self._noise_stats, None
        return stats

    def _forward_special(self, input_ids: torch.Tensor, alpha, call: dict) -> torch.Tensor:
        """The forward of a tensor-parallel weight, a subclass's own forward, or ``max_norm``."""
        if is_dtensor(self.weight):
            return self._noise_after_reduction(input_ids, alpha, call)
        if self._noise_after_own_forward:
            # Noise on the subclass's output (after Gemma's scale, say), as transformers' hook adds it.
            return add_noise(super().forward(input_ids), alpha, **call)
        # max_norm: F.embedding renormalizes the looked-up rows in place too; the ids are refused
        # first (ATen's renorm does not bounds-check on a GPU; this check syncs there), or clamped
        # where the check is off.
        validation.check_ids(input_ids, self.weight)
        check_id_range(input_ids, self.num_embeddings)
        assert self.max_norm is not None  # the only case left
        with torch.no_grad():
            torch.embedding_renorm_(self.weight, input_ids.clamp(0, self.num_embeddings - 1), self.max_norm,
                                    self.norm_type)
        return _noisy_embedding(input_ids, self.weight, alpha, call["seed"], call["offset"], call["attention_mask"],
                                call["position_ids"], call["cu_seqlens"], call["noise_mask"], call["length_mode"],
                                call["distribution"], self.padding_idx, self.scale_grad_by_freq, call["backend"], True)

    def _noise_after_reduction(self, input_ids, alpha, call: dict) -> torch.Tensor:
        """Tensor parallel (a DTensor weight, e.g. ``RowwiseParallel``): look up, reduce the partial
        rows once, add the noise (the same on every rank of the group), hand back a replicated
        DTensor that the parallel style lays out as it was asked to."""
        from torch.distributed.tensor import DTensor, Replicate

        if self.max_norm is not None:
            raise ValueError("max_norm with a tensor-parallel (DTensor) weight: torch has no sharded renorm")
        # The sharded lookup gives an id outside every rank's rows a zero row: refuse it here (on an
        # accelerator with a sync, as for max_norm; set_id_check(False) turns it off).
        local_ids = input_ids.to_local() if isinstance(input_ids, DTensor) else input_ids
        check_id_range(local_ids, self.num_embeddings)
        out = cast(DTensor, super().forward(input_ids))  # a DTensor weight's lookup
        mesh = out.device_mesh
        full = out.redistribute(mesh, [Replicate()] * mesh.ndim).to_local()
        if any(isinstance(call[k], DTensor) for k in ("attention_mask", "position_ids", "noise_mask")):
            raise TypeError("tensor-parallel side inputs must be plain (replicated) tensors")
        noisy = add_noise(full, alpha, **call)
        return DTensor.from_local(noisy, mesh, [Replicate()] * mesh.ndim, run_check=False)

    def __reduce_ex__(self, protocol):
        # A class noisy_class generated cannot be found by name when unpickling: rebuild it from its
        # base (a class that wrapped it later, FSDP's say, pickles as usual).
        from .patching import rebuild_noisy

        base = type(self).__dict__.get("_neft_base")
        if base is None:
            return super().__reduce_ex__(protocol)
        return rebuild_noisy, (base,), self.__dict__

    def extra_repr(self) -> str:
        options = self.noise_options
        return (f"{super().extra_repr()}, noise_alpha={options.noise_alpha}, length_mode={options.length_mode}, "
                f"distribution={options.distribution}, backend={options.backend}")
