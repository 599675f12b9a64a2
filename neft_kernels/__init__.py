"""Fused NEFTune noisy embeddings: one pass, per-sequence lengths, bit-exact Philox noise."""

from .module import NoisyEmbedding
from .ops import noisy_embedding
from .spec import SPEC_VERSION

__all__ = ["NoisyEmbedding", "noisy_embedding", "SPEC_VERSION"]
__version__ = "0.1.0"
