"""Fused NEFTune noisy embeddings: one pass, per-sequence lengths, bit-exact Philox noise."""

from .id_check import set_id_check
from .integrations import is_patched, patch_model, patched, unpatch_model
from .module import NoisyEmbedding, no_noise, noise_without_grad
from .ops import add_noise, noisy_embedding
from .options import NoiseOptions
from .patching import make_noisy, make_plain
from .schedules import AlphaScheduler, alpha_schedule
from .spec import SPEC_VERSION

__all__ = [
    "NoisyEmbedding",
    "NoiseOptions",
    "alpha_schedule",
    "AlphaScheduler",
    "noisy_embedding",
    "add_noise",
    "no_noise",
    "noise_without_grad",
    "make_noisy",
    "make_plain",
    "patch_model",
    "unpatch_model",
    "patched",
    "is_patched",
    "set_id_check",
    "SPEC_VERSION",
]
__version__ = "0.1.0"
