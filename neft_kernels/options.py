"""NEFTune's noise options in one place, checked once, when they are set (never inside a call)."""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable

import torch

from . import backends, validation
from .lengths import LENGTH_MODES
from .spec import DISTRIBUTIONS

NOISE_TOKENS = ("all", "response", "prompt")


@dataclasses.dataclass(frozen=True)
class NoiseOptions:
    """The noise options of :class:`~neft_kernels.NoisyEmbedding`, :func:`~neft_kernels.patch_model`
    and ``NEFTuneCallback``, all checked at construction: a refused option raises before anything
    changes. Every entry point takes them as keywords and passes them here, so a new option is one
    field (plus where it is used).

    Attributes:
        noise_alpha: NEFTune's alpha (finite, >= 0); the noise is ``e * alpha / sqrt(L * d)``.
        length_mode: ``"per_sequence"`` (the paper's ``L`` per sequence or packed sub-sequence)
            or ``"padded"`` (Hugging Face's: ``L`` = padded width, every token noised).
        distribution: ``"uniform"`` (``e ~ U(-1, 1)``, spec v1) or ``"gaussian"``
            (``e ~ N(0, 1)``, spec v2, the paper's ablation), at the same scale.
        noise_tokens: which tokens :func:`~neft_kernels.patch_model`'s hooks noise: ``"all"``, or
            from the ``labels`` the model is called with, ``"response"`` (``labels != -100``) or
            ``"prompt"`` (``labels == -100``); the others still count towards ``L``.
        backend: ``"auto"``, ``"triton"``, ``"cpu"``, ``"cuda"`` or ``"torch"`` (the reference).
        generator: where the per-call seeds come from (default: torch's default CPU generator).
        tp_group: the tensor-parallel group whose ranks must add the same noise (an embedding
            replicated across it): every rank draws the stream of the group's smallest rank. A
            DTensor weight on a 1-D mesh needs none (see docs/distributed.md).
    """

    noise_alpha: float = 5.0
    length_mode: str = "per_sequence"
    distribution: str = "uniform"
    noise_tokens: str = "all"
    backend: str = "auto"
    generator: torch.Generator | None = None
    tp_group: Any = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "noise_alpha", validation.check_alpha(self.noise_alpha))
        validation.check_choice("length_mode", self.length_mode, LENGTH_MODES)
        validation.check_choice("distribution", self.distribution, DISTRIBUTIONS)
        validation.check_choice("noise_tokens", self.noise_tokens, NOISE_TOKENS)
        validation.check_choice("backend", self.backend, backends.NAMES)
        if self.generator is not None and not isinstance(self.generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(self.generator).__name__}")

    @classmethod
    def make(cls, base: NoiseOptions | None = None, **changes: Any) -> NoiseOptions:
        """``base`` (default: the defaults) with ``changes``; a misspelt option is refused by name."""
        cls.refuse_unknown(changes)
        return dataclasses.replace(base, **changes) if base is not None else cls(**changes)

    @classmethod
    def refuse_unknown(cls, keywords: Iterable[str], caller: str = "", own: tuple[str, ...] = ()) -> None:
        """Raise TypeError naming the ``keywords`` that are not options (nor ``caller``'s ``own``
        keywords, which the message lists too)."""
        unknown = sorted(set(keywords) - set(cls.names()) - set(own))
        if unknown:
            also = f"; {caller} also takes {list(own)}" if own else ""
            raise TypeError(f"unknown noise option(s) {unknown}; the options are {list(cls.names())}{also}")

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    def __deepcopy__(self, memo: dict) -> NoiseOptions:
        # Immutable: a deep-copied module (PEFT's modules_to_save copy, TRL's reference model) keeps
        # drawing from the user's generator rather than from a stale copy of it.
        return self

    def as_kwargs(self) -> dict[str, Any]:
        """The options as keyword arguments (the same objects: a generator is not copied)."""
        return {name: getattr(self, name) for name in self.names()}
