"""transformers' own NEFTune switch, ``TrainingArguments.neftune_noise_alpha``, served by neft_kernels.

Frameworks that configure training from a file (axolotl, LLaMA-Factory) and scripts that set
``neftune_noise_alpha`` reach NEFTune only through the Trainer, which attaches its forward hook when
``train()`` begins and takes it off at the end. :func:`replace_trainer_neftune` swaps what the
Trainer calls there: the model is patched with :func:`~neft_kernels.patch_model` for the run
(per-sequence ``L``, no noise on padding, the fused kernels) and put back as it was at the end.
"""

from __future__ import annotations

import logging
import weakref
from typing import Any, Callable

from torch import nn

from ..options import NoiseOptions
from .hf import _snapshot, patch_model

logger = logging.getLogger("neft_kernels")

_installed: dict[str, Any] = {}  # what replace_trainer_neftune swapped out, and the options
# The runs that patched a model and have not ended (a train() that raised ends none), beside the
# models rather than in them: a model pickles and copies as it would with transformers' hook.
_open: weakref.WeakKeyDictionary[nn.Module, _Run] = weakref.WeakKeyDictionary()


class _Run:
    """What the replaced activation returns in place of transformers' hook handle: ``remove()`` puts
    the model back as it was before the run (a plain model, or the user's own patch)."""

    def __init__(self, model: nn.Module, restore: Callable[[], None]):
        self._model = weakref.ref(model)
        self._restore: Callable[[], None] | None = restore

    def remove(self) -> None:
        if self._restore is not None:
            self._restore()
            self._restore = None
        model = self._model()
        if model is not None and _open.get(model) is self:
            del _open[model]


def end_open_run(model: nn.Module) -> None:
    """Put back ``model`` if a run with ``neftune_noise_alpha`` patched it and never ended."""
    run = _open.get(model)
    if run is not None:
        run.remove()


def _activate(model: nn.Module, neftune_noise_alpha: float, accelerator=None) -> _Run:
    """``transformers.integrations.neftune.activate_neftune``'s signature, patching instead of hooking."""
    unwrapped = accelerator.unwrap_model(model) if accelerator is not None else model
    end_open_run(unwrapped)  # an earlier train() raised before deactivating: start from before it
    options = NoiseOptions.make(_installed["options"], noise_alpha=neftune_noise_alpha)
    run = _Run(unwrapped, _snapshot(unwrapped))
    patch_model(unwrapped, **options.as_kwargs())
    _open[unwrapped] = run
    return run


def _deactivate(model: nn.Module, hook_handle, accelerator=None) -> None:
    if isinstance(hook_handle, _Run):
        hook_handle.remove()
    else:  # a run that began before replace_trainer_neftune: transformers' hook
        _installed["deactivate"](model, hook_handle, accelerator)


def _activate_method(self, model: nn.Module) -> nn.Module:
    """``Trainer._activate_neftune`` (transformers before NEFTune moved to ``integrations.neftune``)."""
    self.neftune_hook_handle = _activate(model, self.neftune_noise_alpha, self.accelerator)
    return model


def _deactivate_method(self, model: nn.Module) -> None:
    handle = getattr(self, "neftune_hook_handle", None)
    if isinstance(handle, _Run):
        handle.remove()
    else:
        _installed["deactivate"](self, model)


def replace_trainer_neftune(**options: Any) -> None:
    """Make ``TrainingArguments.neftune_noise_alpha`` (and TRL's ``SFTConfig``'s, and every framework
    that passes it on) use neft_kernels instead of transformers' forward hook, in this process.

    ``options`` are :class:`~neft_kernels.NoiseOptions` other than ``noise_alpha``, which is the
    argument's (``length_mode``, ``distribution``, ``noise_tokens``, ``backend``, ``generator``,
    ``tp_group``), checked here. Each ``train()`` with the argument set patches the model with
    :func:`~neft_kernels.patch_model` as it begins and puts it back as it was when it ends; a run
    that raised is put back when the next one begins (with the argument, or with
    ``NEFTuneCallback``) or by :func:`restore_trainer_neftune`. Calling again changes the options
    for later runs. Alpha schedules and the noise statistics in the logs are ``NEFTuneCallback``'s.
    Imports ``transformers.trainer``.
    """
    if "noise_alpha" in options:
        raise TypeError("replace_trainer_neftune takes no noise_alpha: it is TrainingArguments.neftune_noise_alpha")
    noise_options = NoiseOptions.make(**options)
    if not _installed:
        import transformers
        import transformers.trainer as trainer_module

        swaps: list[tuple[Any, str, Callable[..., Any]]]
        if hasattr(trainer_module, "activate_neftune"):
            swaps = [(trainer_module, "activate_neftune", _activate),
                     (trainer_module, "deactivate_neftune", _deactivate)]
        elif hasattr(trainer_module.Trainer, "_activate_neftune"):
            swaps = [(trainer_module.Trainer, "_activate_neftune", _activate_method),
                     (trainer_module.Trainer, "_deactivate_neftune", _deactivate_method)]
        else:
            raise RuntimeError(f"transformers {transformers.__version__}'s Trainer has no NEFTune activation "
                               "(activate_neftune or Trainer._activate_neftune) to replace: use NEFTuneCallback")
        _installed["swapped"] = [(owner, name, vars(owner).get(name, getattr(owner, name))) for owner, name, _ in swaps]
        _installed["deactivate"] = _installed["swapped"][1][2]
        for owner, name, ours in swaps:
            setattr(owner, name, ours)
    _installed["options"] = noise_options
    logger.info("transformers' neftune_noise_alpha now uses neft_kernels: length_mode=%s, distribution=%s, "
                "noise_tokens=%s, backend=%s", noise_options.length_mode, noise_options.distribution,
                noise_options.noise_tokens, noise_options.backend)


def restore_trainer_neftune() -> None:
    """Undo :func:`replace_trainer_neftune`: later runs use transformers' hook again, and models that
    a run which raised left patched are put back now (so that the hook never adds noise on top).
    Call it between runs: a run under way would lose its noise."""
    for run in list(_open.values()):
        run.remove()
    for owner, name, original in _installed.get("swapped", ()):
        setattr(owner, name, original)
    _installed.clear()


def trainer_neftune_options() -> NoiseOptions | None:
    """The options :func:`replace_trainer_neftune` was last called with (``noise_alpha`` aside: each
    run takes the argument's), or ``None`` where transformers' hook is in place."""
    return _installed.get("options")
