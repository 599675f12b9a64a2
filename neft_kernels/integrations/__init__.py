"""Integrations with the fine-tuning ecosystem. ``patch_model`` and friends need no transformers
import; ``NEFTuneCallback`` imports transformers when first accessed, ``replace_trainer_neftune``
when called."""

from .hf import is_patched, patch_model, patched, unpatch_model
from .trainer_neftune import replace_trainer_neftune, restore_trainer_neftune, trainer_neftune_options

__all__ = ["patch_model", "unpatch_model", "patched", "is_patched", "NEFTuneCallback", "replace_trainer_neftune",
           "restore_trainer_neftune", "trainer_neftune_options"]


def __getattr__(name: str):
    if name == "NEFTuneCallback":
        from .trainer import NEFTuneCallback

        return NEFTuneCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
