"""``patch_model``: NEFTune for a Hugging Face (or PEFT) model in one line.

The input embedding becomes a :class:`~neft_kernels.NoisyEmbedding` in place (same module, same
weight Parameter, same ``state_dict``), and forward hooks on the modules above it whose
``forward`` takes ``attention_mask`` or ``position_ids`` hand those arguments to the embedding,
so that ``L`` is per sequence, or per packed sub-sequence. Duck-typed: any module with
``get_input_embeddings()`` works, transformers is never imported here.
"""

from __future__ import annotations

import inspect
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

from torch import nn

from ..module import NoisyEmbedding, make_noisy, make_plain

_SIDE_INPUTS = ("attention_mask", "position_ids")


@dataclass
class _Patch:
    embeddings: list[NoisyEmbedding]
    handles: list = field(default_factory=list)


_PATCHES: "weakref.WeakKeyDictionary[nn.Module, _Patch]" = weakref.WeakKeyDictionary()


def _input_embeddings(model: nn.Module) -> tuple[list[str], list[nn.Embedding]]:
    """Every qualified name of, and every distinct ``nn.Embedding`` in, ``model.get_input_embeddings()``.

    Usually that is the embedding itself; PEFT's ``modules_to_save`` wraps it with a trainable
    copy (both are patched, the wrapper picks one), LoRA on the embedding wraps it as its base
    layer. A shared embedding (T5's) has several names: the modules above each get hooks.
    """
    if not hasattr(model, "get_input_embeddings"):
        raise TypeError(f"{type(model).__name__} has no get_input_embeddings(); pass a transformers or PEFT model")
    root = model.get_input_embeddings()
    wanted = {id(m) for m in root.modules() if isinstance(m, nn.Embedding)}
    names, embeddings = [], {}
    for name, m in model.named_modules(remove_duplicate=False):
        if id(m) in wanted:
            names.append(name)
            embeddings.setdefault(id(m), m)
    if not embeddings:
        raise TypeError(f"the input embeddings of {type(model).__name__} hold no nn.Embedding "
                        f"(got {type(root).__name__})")
    return names, list(embeddings.values())


def _ancestors(model: nn.Module, names: list[str]) -> list[nn.Module]:
    """Modules above the embeddings (the model included) whose forward takes a side input."""
    prefixes = {".".join(name.split(".")[:i]) for name in names for i in range(name.count(".") + 1)}
    modules = dict(model.named_modules(remove_duplicate=False))
    out, seen = [], set()
    for prefix in sorted(prefixes, key=len):
        module = modules.get(prefix)
        if module is None or id(module) in seen or isinstance(module, nn.Embedding):
            continue
        seen.add(id(module))
        try:
            params = inspect.signature(module.forward).parameters
        except (TypeError, ValueError):
            continue
        if any(p in params for p in _SIDE_INPUTS):
            out.append(module)
    return out


def _hooks(module: nn.Module, embeddings: list[NoisyEmbedding]):
    signature = inspect.signature(module.forward)

    def push(_, args, kwargs):
        try:
            bound = signature.bind_partial(*args, **kwargs).arguments
        except TypeError:
            bound = kwargs
        frame = tuple(bound.get(name) for name in _SIDE_INPUTS)
        for emb in embeddings:
            emb._side_input_stack.append(frame)

    def pop(*_):
        for emb in embeddings:
            if emb._side_input_stack:
                emb._side_input_stack.pop()

    return push, pop


def patch_model(model: nn.Module, noise_alpha: float = 5.0, length_mode: str = "per_sequence", *,
                backend: str = "auto", generator=None) -> nn.Module:
    """Add NEFTune noise to ``model``'s input embeddings in train mode; returns ``model``.

    Args:
        model: a transformers ``PreTrainedModel``, a PEFT ``PeftModel``, or any module with
            ``get_input_embeddings()``.
        noise_alpha, length_mode, backend, generator: as for :class:`~neft_kernels.NoisyEmbedding`.
            ``"per_sequence"`` takes ``L`` from the ``attention_mask`` and ``position_ids`` the
            model is called with (packed rows: each sub-sequence starts where the position is 0).

    Idempotent: patching again only updates the options. Undo with :func:`unpatch_model`.
    """
    options = dict(length_mode=length_mode, backend=backend, generator=generator)
    patch = _PATCHES.get(model)
    if patch is not None:
        for emb in patch.embeddings:
            emb.configure_noise(noise_alpha, **options)
        return model
    names, found = _input_embeddings(model)
    embeddings = [make_noisy(emb, noise_alpha, **options) for emb in found]
    patch = _Patch(embeddings)
    for module in _ancestors(model, names):
        push, pop = _hooks(module, embeddings)
        patch.handles.append(module.register_forward_pre_hook(push, with_kwargs=True))
        patch.handles.append(module.register_forward_hook(pop, always_call=True))
    _PATCHES[model] = patch
    return model


def unpatch_model(model: nn.Module) -> nn.Module:
    """Undo :func:`patch_model`: the original embedding class, the same module and weight."""
    patch = _PATCHES.pop(model, None)
    if patch is not None:
        for handle in patch.handles:
            handle.remove()
        for emb in patch.embeddings:
            make_plain(emb)
    return model


def is_patched(model: nn.Module) -> bool:
    """Whether :func:`patch_model` patched ``model`` (and it was not unpatched since)."""
    return model in _PATCHES


@contextmanager
def patched(model: nn.Module, noise_alpha: float = 5.0, length_mode: str = "per_sequence",
            **options) -> Iterator[nn.Module]:
    """``patch_model`` for the ``with`` block only (unpatched on exit, also on an exception).

    A model that was already patched on entry stays patched on exit.
    """
    was_patched = is_patched(model)
    patch_model(model, noise_alpha, length_mode, **options)
    try:
        yield model
    finally:
        if not was_patched:
            unpatch_model(model)
