"""Alpha schedules: NEFTune's alpha as a function of the optimizer step."""

from __future__ import annotations

import math
from typing import Callable, Union

from torch import nn

from . import validation

SCHEDULES = ("constant", "linear", "cosine")
Schedule = Union[str, Callable[[int], float]]


def check_schedule(noise_alpha: float, schedule: Schedule, *, final_alpha: float = 0.0,
                   warmup_steps: int = 0) -> tuple[float, float]:
    """What :func:`alpha_schedule` checks before it knows the run's length; returns (alpha,
    final_alpha), checked for a named schedule (a callable gives alpha itself, so the keywords it
    would ignore are refused beside it and ``noise_alpha`` is its caller's)."""
    if callable(schedule):
        if final_alpha != 0.0 or warmup_steps != 0:
            raise ValueError(f"a callable schedule gives alpha itself: final_alpha ({final_alpha!r}) and warmup_steps "
                             f"({warmup_steps!r}) would be ignored; build the warm-up and the decay into the callable")
        return noise_alpha, final_alpha
    alpha, final = validation.check_alpha(noise_alpha), validation.check_alpha(final_alpha, "final_alpha")
    validation.check_choice("schedule", schedule, SCHEDULES)
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
        raise ValueError(f"warmup_steps must be an int >= 0, got {warmup_steps!r}")
    return alpha, final


def alpha_schedule(noise_alpha: float, schedule: Schedule = "constant", *, final_alpha: float = 0.0,
                   warmup_steps: int = 0, total_steps: int | None = None) -> Callable[[int], float]:
    """Alpha at each optimizer step (0-based).

    ``schedule``: ``"constant"``; ``"linear"`` or ``"cosine"`` decay from ``noise_alpha`` after the
    warm-up to ``final_alpha`` at ``total_steps`` (held there after); or any callable of the step
    (returned as it is; its values are checked when set; it gives alpha itself, so ``final_alpha`` and
    ``warmup_steps``, which it would ignore, are refused with it). ``warmup_steps``: alpha rises linearly
    from 0 to ``noise_alpha`` over the first steps (step ``warmup_steps`` is the first at full alpha).
    """
    alpha, final = check_schedule(noise_alpha, schedule, final_alpha=final_alpha, warmup_steps=warmup_steps)
    if callable(schedule):
        return schedule
    if schedule != "constant" and (not isinstance(total_steps, int) or total_steps <= warmup_steps):
        raise ValueError(f"a {schedule} schedule needs total_steps > warmup_steps ({warmup_steps}), "
                         f"got {total_steps!r}")

    def at(step: int) -> float:
        if step < warmup_steps:
            return alpha * step / warmup_steps
        if schedule == "constant":
            return alpha
        assert total_steps is not None  # checked above for every other schedule
        progress = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
        shape = 1.0 - progress if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
        return final + (alpha - final) * shape

    return at


class AlphaScheduler:
    """Sets ``noise_alpha`` on every :class:`~neft_kernels.NoisyEmbedding` in ``module`` from a
    schedule, like torch's LR schedulers: call :meth:`step` after each optimizer step.

    Setting alpha writes the modules' alpha tensors in place: compiled models and captured CUDA
    graphs use the new value with no recompile. ``schedule`` and the keywords are those of
    :func:`alpha_schedule`.
    """

    def __init__(self, module: nn.Module, noise_alpha: float, schedule: Schedule = "constant", **kwargs) -> None:
        self.module = module
        self.schedule = alpha_schedule(noise_alpha, schedule, **kwargs)
        self.last_step = 0
        self.alpha = 0.0
        if not self._apply():  # else each step() would set nothing, silently
            raise ValueError(f"AlphaScheduler: no NoisyEmbedding in {type(module).__name__}: patch the model "
                             "(patch_model, make_noisy) before building its scheduler")

    def _apply(self) -> int:
        """Sets the current step's alpha; returns how many embeddings took it."""
        from .module import NoisyEmbedding  # the schedule knows the module only here

        self.alpha = validation.check_alpha(self.schedule(self.last_step))
        embeddings = [m for m in self.module.modules() if isinstance(m, NoisyEmbedding)]
        for m in embeddings:
            m.noise_alpha = self.alpha
        return len(embeddings)

    def step(self) -> float:
        """Advance one step; returns the alpha now set."""
        self.last_step += 1
        self._apply()
        return self.alpha

    def state_dict(self) -> dict:
        return {"last_step": self.last_step}

    def load_state_dict(self, state: dict) -> None:
        self.last_step = state["last_step"]
        self._apply()
