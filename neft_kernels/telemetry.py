"""Noise statistics an embedding records on request (a logging step), on the device, read once."""

from __future__ import annotations

import torch

from .lengths import token_lengths


class NoiseStats:
    """Running sums over the noised calls since the last :meth:`read`: tokens, noised tokens,
    their ``L`` and their noise-to-embedding norm ratio. Adding is tensor work on the device (no
    sync); :meth:`read` brings the sums to the host once."""

    def __init__(self) -> None:
        # float64: tokens, noised, sum of L, sum of ratios, tokens with a ratio
        self._sums: torch.Tensor | None = None

    def add(self, input_ids: torch.Tensor, clean: torch.Tensor, noisy: torch.Tensor, side: dict) -> None:
        with torch.no_grad():
            length, noised = token_lengths(input_ids.shape, device=input_ids.device, **side)
            n = length.numel()
            noised = torch.ones(n, dtype=torch.bool, device=length.device) if noised is None else noised
            d = clean.shape[-1]  # not -1: an empty batch has no rows to infer it from
            clean, noisy = clean.reshape(n, d).float(), noisy.reshape(n, d).float()
            norm = clean.norm(dim=-1).double()
            # A zero embedding (an nn.Embedding's padding_idx row, noised in "padded" mode or without a
            # mask) has no ratio: a clamped denominator made it ~1e29 and the mean meaningless.
            rated = noised & (norm > 0)
            ratio = torch.where(rated, (noisy - clean).norm(dim=-1).double() / norm.clamp(min=1e-300), 0.0)
            w = noised.double()
            sums = torch.stack([w.new_tensor(float(n)), w.sum(), (length * w).sum(), ratio.sum(),
                                rated.double().sum()])
            self._sums = sums if self._sums is None else self._sums + sums

    def merge(self, other: NoiseStats | None) -> None:
        """Add ``other``'s sums (another embedding's: an encoder's and a decoder's count together)."""
        if other is not None and other._sums is not None:
            self._sums = other._sums if self._sums is None else self._sums + other._sums.to(self._sums.device)

    def read(self) -> dict[str, float]:
        """``noised_fraction``, ``mean_length`` and ``noise_ratio`` (mean noise norm over embedding
        norm; over the noised tokens whose embedding is not zero) of the noised tokens since the last
        read; empty when no noised call was recorded."""
        if self._sums is None:
            return {}
        tokens, noised, length, ratio, rated = self._sums.tolist()
        self._sums = None
        noised_or_one = max(noised, 1.0)
        return {"noised_fraction": noised / max(tokens, 1.0), "mean_length": length / noised_or_one,
                "noise_ratio": ratio / max(rated, 1.0)}
