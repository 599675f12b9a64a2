"""NoisyEmbedding: a drop-in ``nn.Embedding`` that adds NEFTune noise while training."""

from __future__ import annotations

import torch
from torch import nn

from . import validation
from .lengths import LENGTH_MODES
from .ops import noisy_embedding

_SEED_LOW, _SEED_HIGH = -(1 << 63), (1 << 63) - 1


class NoisyEmbedding(nn.Embedding):
    """``nn.Embedding`` with NEFTune noise in train mode; the same ``state_dict`` and weight.

    In eval mode, or with ``noise_alpha == 0``, ``forward`` is exactly ``F.embedding``. In train
    mode each call draws a fresh 64-bit seed from ``generator`` (default: torch's default CPU
    generator, so ``torch.manual_seed`` makes runs reproducible; CPU draws need no device sync)
    and calls :func:`neft_kernels.noisy_embedding`. ``noise_alpha`` may be changed at any step.
    """

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
        *,
        noise_alpha: float = 5.0,
        length_mode: str = "per_sequence",
        backend: str = "auto",
        generator: torch.Generator | None = None,
    ) -> None:
        if sparse:
            raise ValueError("NoisyEmbedding does not support sparse=True: its fused backward "
                             "produces a dense gradient")
        super().__init__(num_embeddings, embedding_dim, padding_idx, max_norm, norm_type,
                         scale_grad_by_freq, sparse, _weight, _freeze, device, dtype)
        validation.check_choice("length_mode", length_mode, LENGTH_MODES)
        validation.check_choice("backend", backend, validation.BACKENDS)
        self.noise_alpha = validation.check_alpha(noise_alpha)
        self.length_mode = length_mode
        self.backend = backend
        self.generator = generator

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding, noise_alpha: float = 5.0, **kwargs) -> "NoisyEmbedding":
        """Wrap ``embedding``'s own weight Parameter (tied heads stay tied) and settings."""
        module = cls(
            embedding.num_embeddings, embedding.embedding_dim, embedding.padding_idx,
            embedding.max_norm, embedding.norm_type, embedding.scale_grad_by_freq, embedding.sparse,
            _weight=embedding.weight.detach(), noise_alpha=noise_alpha, **kwargs,
        )
        module.weight = embedding.weight
        module.train(embedding.training)
        return module

    def _draw_seed(self) -> torch.Tensor:
        # A CPU tensor, never a Python int: compiled graphs take it as an input, eager needs no sync.
        return torch.randint(_SEED_LOW, _SEED_HIGH, (), dtype=torch.int64, generator=self.generator)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        if not self.training or self.noise_alpha == 0:
            return super().forward(input_ids)
        if self.max_norm is not None:
            with torch.no_grad():  # F.embedding renormalizes the looked-up rows in place too
                torch.embedding_renorm_(self.weight, input_ids, self.max_norm, self.norm_type)
        return noisy_embedding(
            input_ids, self.weight, self.noise_alpha, seed=self._draw_seed(),
            attention_mask=attention_mask, position_ids=position_ids,
            length_mode=self.length_mode, padding_idx=self.padding_idx,
            scale_grad_by_freq=self.scale_grad_by_freq, backend=self.backend,
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, noise_alpha={self.noise_alpha}, length_mode={self.length_mode}"
