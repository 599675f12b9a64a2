"""``NEFTuneCallback``: NEFTune for a transformers ``Trainer`` (and TRL's trainers) as a callback."""

from __future__ import annotations

import functools
import weakref

from torch import nn
from transformers import Trainer, TrainerCallback

from ..compat import caller_self
from ..module import NoisyEmbedding
from ..options import NoiseOptions
from ..schedules import Schedule, alpha_schedule, check_schedule
from ..telemetry import NoiseStats
from .hf import _snapshot, patch_model, refuse_other_neftune, remove_other_neftune
from .trainer_neftune import end_open_run


def _running_trainer() -> Trainer | None:
    """The Trainer whose method is calling us: callbacks are called synchronously by it."""
    return caller_self(Trainer)


class NEFTuneCallback(TrainerCallback):
    """Patch the model at train begin; at train end put it back as it was (unpatched, or with the
    patch the user applied before training), so checkpoints stay plain.

    ``Trainer(..., callbacks=[NEFTuneCallback(noise_alpha=5.0)])``. ``options`` are
    :class:`~neft_kernels.NoiseOptions` (``length_mode``, ``distribution``, ``noise_tokens``,
    ``backend``, ``generator``, ``tp_group``) for :func:`~neft_kernels.patch_model`, checked here,
    at construction.

    ``schedule`` (``"constant"``, ``"linear"``, ``"cosine"`` or a callable of the step; see
    :func:`~neft_kernels.alpha_schedule`) sets alpha at each optimizer step, decaying to
    ``final_alpha`` over the run's ``max_steps`` after ``warmup_steps``. On the Trainer's logging
    steps the training logs gain ``neftune_alpha``, ``neftune_noised_fraction``,
    ``neftune_mean_length`` and ``neftune_noise_ratio`` (``log_stats=False``: alpha only); the
    statistics are recorded on those steps only, and read when the Trainer logs.

    When the callback is passed at construction, the Trainer's ``train`` is also wrapped so that
    the model is restored if training raises. Refuses to run next to ``neftune_noise_alpha``
    (transformers' own hook) or any other NEFTune hook on the model, which would add noise twice:
    when the Trainer is built, and again at train begin.
    """

    def __init__(self, noise_alpha: float = 5.0, *, schedule: Schedule = "constant", final_alpha: float = 0.0,
                 warmup_steps: int = 0, log_stats: bool = True, **options) -> None:
        own = ("schedule", "final_alpha", "warmup_steps", "log_stats")
        NoiseOptions.refuse_unknown(options, "NEFTuneCallback", own)
        self.noise_options = NoiseOptions.make(noise_alpha=noise_alpha, **options)
        self.schedule = (schedule, final_alpha, warmup_steps)
        # all but the run's length, which a decay needs (checked at train begin)
        check_schedule(noise_alpha, schedule, final_alpha=final_alpha, warmup_steps=warmup_steps)
        self.log_stats = log_stats
        self._alpha_at = None
        self._model: nn.Module | None = None
        self._restore = None
        self._wrapped: weakref.WeakSet = weakref.WeakSet()  # by object: a freed trainer's id can come back

    @property
    def noise_alpha(self) -> float:
        return self.noise_options.noise_alpha

    def __repr__(self) -> str:
        defaults = NoiseOptions()
        options = "".join(f", {k}={v!r}" for k, v in self.noise_options.as_kwargs().items()
                          if k != "noise_alpha" and v != getattr(defaults, k))
        schedule, final_alpha, warmup_steps = self.schedule
        extra = "" if schedule == "constant" and not warmup_steps else (
            f", schedule={schedule!r}, final_alpha={final_alpha}, warmup_steps={warmup_steps}")
        return f"NEFTuneCallback(noise_alpha={self.noise_alpha}{options}{extra})"

    def _refuse_double_noise(self, args) -> None:
        if getattr(args, "neftune_noise_alpha", None) is not None:
            raise ValueError(
                f"NEFTuneCallback(noise_alpha={self.noise_alpha}) and TrainingArguments.neftune_noise_alpha="
                f"{args.neftune_noise_alpha} would both add NEFTune noise: keep one (unset neftune_noise_alpha "
                "to use neft_kernels' fused, per-sequence noise)")

    def _unpatch(self) -> None:
        if self._restore is not None:
            for emb in self._embeddings():
                emb._take_noise_stats()  # stop recording: nothing read
            self._restore()
            self._restore = None
        self._model = None

    def _wrap_train(self, trainer: Trainer | None) -> None:
        if trainer is None or trainer in self._wrapped:
            return
        self._wrapped.add(trainer)
        train, log = trainer.train, trainer.log

        @functools.wraps(train)
        def train_then_unpatch(*args, **kwargs):
            try:
                return train(*args, **kwargs)
            finally:
                self._unpatch()

        @functools.wraps(log)
        def log_with_noise(logs, *args, **kwargs):
            if "loss" in logs and self._model is not None:  # a training log: before the reporters see it
                logs.update(self._telemetry())
            return log(logs, *args, **kwargs)

        # A deliberate monkeypatch of this trainer object (its class is left alone).
        trainer.train = train_then_unpatch  # type: ignore[method-assign]
        trainer.log = log_with_noise  # type: ignore[method-assign]

    def _embeddings(self) -> list[NoisyEmbedding]:
        assert self._model is not None  # called only while a model is patched
        return [m for m in self._model.modules() if isinstance(m, NoisyEmbedding)]

    def _telemetry(self) -> dict[str, float]:
        embeddings = self._embeddings()
        logs = {"neftune_alpha": embeddings[0].noise_alpha} if embeddings else {}
        if self.log_stats:
            # Every embedding that recorded (an encoder's and a decoder's; a tied copy that is not
            # called records nothing), each stopped here: one left armed would record every step.
            recorded = NoiseStats()
            for emb in embeddings:
                recorded.merge(emb._take_noise_stats())
            logs.update({f"neftune_{k}": v for k, v in recorded.read().items()})
        return logs

    def on_step_begin(self, args, state, control, **kwargs):
        if self._model is None:
            return
        alpha = self._alpha_at(state.global_step)
        for emb in self._embeddings():
            if emb.noise_alpha != alpha:
                emb.noise_alpha = alpha
        logs_this_step = (state.global_step + 1) % max(state.logging_steps, 1) == 0 or (
            args.logging_first_step and state.global_step == 0)
        if self.log_stats and logs_this_step and args.logging_strategy == "steps":
            for emb in self._embeddings():
                emb.record_noise_stats()

    def on_init_end(self, args, state, control, model=None, **kwargs):
        self._refuse_double_noise(args)
        if model is not None:
            refuse_other_neftune(model)
        self._wrap_train(_running_trainer())

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is None:
            raise ValueError("NEFTuneCallback needs the model, which the Trainer passes to on_train_begin")
        # replace_trainer_neftune's patch, from this run (refused below) or from a run that raised:
        # taken off, so that neither the refusal nor the restore at train end leaves it on.
        end_open_run(model)
        if getattr(args, "neftune_noise_alpha", None) is not None:
            # transformers attached its hook as train() began: take it off again, then refuse.
            remove_other_neftune(model)
            self._refuse_double_noise(args)
        self._unpatch()  # a run that ended without on_train_end (it raised, unwrapped): restore it first
        schedule, final_alpha, warmup_steps = self.schedule
        self._alpha_at = alpha_schedule(self.noise_alpha, schedule, final_alpha=final_alpha, warmup_steps=warmup_steps,
                                        total_steps=state.max_steps)
        self._wrap_train(_running_trainer())  # added after construction: its logs still get the telemetry
        restore = _snapshot(model)
        patch_model(model, **self.noise_options.as_kwargs())  # refuses any other NEFTune hook left on it
        self._restore = restore
        self._model = model

    def on_train_end(self, args, state, control, **kwargs):
        self._unpatch()
