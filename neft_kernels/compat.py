"""Every use of a private or version-sensitive torch / Python internal, in one place, with why.

Each helper names the internal it relies on; when a torch release changes one, this file is the
only one to fix (the tests that exercise each are named).
"""

from __future__ import annotations

import sys
from types import FrameType
from typing import Callable, Iterable, TypeVar

import torch
import torch._dynamo
import torch._dynamo.compiled_autograd as _compiled_autograd
import torch.autograd.forward_ad as _forward_ad
from torch import nn
from torch._C._functorch import (
    CVmapInterpreterPtr,
    RandomnessType,
    TransformType,
    get_interpreter_stack,
    get_unwrapped,
    is_batchedtensor,
    is_functorch_wrapped_tensor,
    maybe_get_level,
)

# torch._dynamo.assume_constant_result: backend availability never changes within a process, so a
# compiled graph may take the resolved backend name as a constant instead of tracing importlib.
assume_constant_result = torch._dynamo.assume_constant_result


def functorch_transforms_active() -> bool:
    """``torch._C._are_functorch_transforms_active``: under ``torch.func`` transforms the op must go
    through ``Function.apply``'s Python wrapper, and its backward through a Function the kernels can
    serve (tests/ops/test_func_transforms.py)."""
    return torch._C._are_functorch_transforms_active()


def functorch_disabled():
    """``torch._C._DisableFuncTorch``: ops inside run below every ``torch.func`` transform (a seed
    drawn once for a whole vmapped call, not one per example)."""
    return torch._C._DisableFuncTorch()


_RANDOMNESS = {RandomnessType.Error: "error", RandomnessType.Same: "same", RandomnessType.Different: "different"}


def vmaps_not_batching(tensors) -> list[str]:
    """The ``randomness`` of each active ``torch.func.vmap`` that none of ``tensors`` is batched by
    (``torch._C._functorch``'s interpreter stack and wrapper levels): there, an op's rule for vmap
    is never called, so a random op must decide by itself (tests/ops/test_func_transforms.py)."""
    vmaps = {i.level(): i for i in get_interpreter_stack() or () if i.key() == TransformType.Vmap}
    for t in tensors:
        while vmaps and isinstance(t, torch.Tensor) and is_functorch_wrapped_tensor(t):
            if is_batchedtensor(t):
                vmaps.pop(maybe_get_level(t), None)
            t = get_unwrapped(t)
    return [_RANDOMNESS[CVmapInterpreterPtr(i).randomness()] for i in vmaps.values()]


def forward_ad_active() -> bool:
    """``torch.autograd.forward_ad._current_level``: whether a dual level is entered (a module global,
    cheaper than unpacking a tensor's dual)."""
    return _forward_ad._current_level >= 0


def native_autograd_unseen() -> bool:
    """Whether a recorder that cannot look into a native autograd node is active: ``torch.jit.trace``
    (``torch._C._get_tracing_state``) or compiled autograd (``torch._dynamo.compiled_autograd``'s
    ``compiled_autograd_enabled``). The op then takes its Python Function
    (tests/ops/test_eager_autograd.py)."""
    return torch._C._get_tracing_state() is not None or _compiled_autograd.compiled_autograd_enabled


def function_c_apply(function: type[torch.autograd.Function]) -> Callable:
    """The C entry point that ``Function.apply``'s Python wrapper ends in (``_C._FunctionBase.apply``):
    calling it directly skips the wrapper's signature binding and functorch checks, a third of a
    small eager call's host time. Used only outside tracing and functorch transforms."""
    return super(torch.autograd.Function, function).apply  # type: ignore[misc]  # not in torch's stubs


# nn.Module keeps its hooks in these private OrderedDicts; a hook registered with with_kwargs or
# always_call also has its id in the companion dicts. torch has no public way to list or remove
# hooks whose handles are gone (a deepcopy or an unpickled model carries the hooks, not the handles).
_HOOK_DICTS = {
    "forward": ("_forward_hooks", ("_forward_hooks_with_kwargs", "_forward_hooks_always_called")),
    "forward_pre": ("_forward_pre_hooks", ("_forward_pre_hooks_with_kwargs",)),
}


def hooks(module: nn.Module, kind: str) -> dict:
    """``module``'s forward (``kind="forward"``) or forward pre-hooks (``"forward_pre"``), by id."""
    return getattr(module, _HOOK_DICTS[kind][0])


def remove_hooks(module: nn.Module, kind: str, keys: Iterable[int]) -> int:
    """Remove the hooks with these ids, as ``RemovableHandle.remove`` would; returns how many."""
    main, extras = _HOOK_DICTS[kind]
    removed = 0
    for key in list(keys):
        if getattr(module, main).pop(key, None) is not None:
            removed += 1
        for extra in extras:
            getattr(module, extra).pop(key, None)
    return removed


def clear_hooks(module: nn.Module) -> None:
    """Drop every forward and forward pre-hook of ``module`` (a fresh copy must not run its source's)."""
    for main, extras in _HOOK_DICTS.values():
        for name in (main, *extras):
            getattr(module, name).clear()


_T = TypeVar("_T")


def caller_self(cls: type[_T]) -> _T | None:
    """The nearest ``self`` of type ``cls`` up the call stack (``sys._getframe``): transformers calls
    callbacks synchronously from the Trainer's own methods and does not pass the Trainer itself."""
    frame: FrameType | None = sys._getframe(1)
    while frame is not None:
        owner = frame.f_locals.get("self")
        if isinstance(owner, cls):
            return owner
        frame = frame.f_back
    return None
