"""``NEFTuneCallback``: NEFTune for a transformers ``Trainer`` (and TRL's trainers) as a callback."""

from __future__ import annotations

import functools
import sys
import weakref

from transformers import Trainer, TrainerCallback

from .. import validation
from .hf import _snapshot, patch_model, refuse_other_neftune, remove_other_neftune


def _running_trainer() -> Trainer | None:
    """The Trainer whose method is calling us: callbacks are called synchronously by it."""
    frame = sys._getframe(1)
    while frame is not None:
        owner = frame.f_locals.get("self")
        if isinstance(owner, Trainer):
            return owner
        frame = frame.f_back
    return None


class NEFTuneCallback(TrainerCallback):
    """Patch the model at train begin; at train end put it back as it was (unpatched, or with the
    patch the user applied before training), so checkpoints stay plain.

    ``Trainer(..., callbacks=[NEFTuneCallback(noise_alpha=5.0)])``. ``options`` go to
    :func:`~neft_kernels.patch_model` (``length_mode``, ``backend``, ``generator``, ``tp_group``)
    and are checked here, at construction. When the callback is passed at construction, the
    Trainer's ``train`` is also wrapped so that the model is restored if training raises. Refuses
    to run next to ``neftune_noise_alpha`` (transformers' own hook) or any other NEFTune hook on
    the model, which would add noise twice: when the Trainer is built, and again at train begin.
    """

    def __init__(self, noise_alpha: float = 5.0, **options) -> None:
        self.noise_alpha = validation.check_noise_options(noise_alpha, options)  # a misspelling fails here
        self.options = options
        self._restore = None
        self._wrapped: weakref.WeakSet = weakref.WeakSet()  # by object: a freed trainer's id can come back

    def __repr__(self) -> str:
        options = "".join(f", {k}={v!r}" for k, v in self.options.items())
        return f"NEFTuneCallback(noise_alpha={self.noise_alpha}{options})"

    def _refuse_double_noise(self, args) -> None:
        if getattr(args, "neftune_noise_alpha", None) is not None:
            raise ValueError(
                f"NEFTuneCallback(noise_alpha={self.noise_alpha}) and TrainingArguments.neftune_noise_alpha="
                f"{args.neftune_noise_alpha} would both add NEFTune noise: keep one (unset neftune_noise_alpha "
                "to use neft_kernels' fused, per-sequence noise)")

    def _unpatch(self) -> None:
        if self._restore is not None:
            self._restore()
            self._restore = None

    def _wrap_train(self, trainer: Trainer | None) -> None:
        if trainer is None or trainer in self._wrapped:
            return
        self._wrapped.add(trainer)
        train = trainer.train

        @functools.wraps(train)
        def train_then_unpatch(*args, **kwargs):
            try:
                return train(*args, **kwargs)
            finally:
                self._unpatch()

        trainer.train = train_then_unpatch

    def on_init_end(self, args, state, control, model=None, **kwargs):
        self._refuse_double_noise(args)
        if model is not None:
            refuse_other_neftune(model)
        self._wrap_train(_running_trainer())

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is None:
            raise ValueError("NEFTuneCallback needs the model, which the Trainer passes to on_train_begin")
        if getattr(args, "neftune_noise_alpha", None) is not None:
            # transformers attached its hook as train() began: take it off again, then refuse.
            remove_other_neftune(model)
            self._refuse_double_noise(args)
        self._unpatch()  # a run that ended without on_train_end (it raised, unwrapped): restore it first
        restore = _snapshot(model)
        patch_model(model, self.noise_alpha, **self.options)  # refuses any other NEFTune hook left on it
        self._restore = restore

    def on_train_end(self, args, state, control, **kwargs):
        self._unpatch()
