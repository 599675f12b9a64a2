"""``patch_model``: NEFTune for a Hugging Face (or PEFT) model in one line.

The input embedding becomes a :class:`~neft_kernels.NoisyEmbedding` in place (same module, same
weight Parameter, same ``state_dict``), and forward hooks on the modules above it whose
``forward`` takes ``attention_mask`` or ``position_ids`` hand those arguments to the embedding,
so that ``L`` is per sequence, or per packed sub-sequence. Duck-typed: any module with
``get_input_embeddings()`` works, transformers is never imported here.

No registry: the patch lives in the model itself (the embeddings' class, the marked hooks), so a
``deepcopy`` of a patched model is a patched model that :func:`unpatch_model` can undo, and
each hook finds its embeddings below the module it runs on.
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from .. import validation
from ..module import NoisyEmbedding, make_noisy, make_plain

_SIDE_INPUTS = ("attention_mask", "position_ids")
# flash-attention's packed-sequence starts, as DataCollatorWithFlattening(return_flash_attn_kwargs=True)
# passes them down through the models' **kwargs.
_CU_SEQLENS = "cu_seq_lens_q"
_MARK = "_neft_side_input_hook"


def _input_embeddings(model: nn.Module) -> list[nn.Embedding]:
    """Every distinct ``nn.Embedding`` that looks up the input embedding's weight.

    That is ``get_input_embeddings()`` itself, the embeddings inside it (PEFT's
    ``modules_to_save`` wrapper and its trainable copy, LoRA's base layer), and any other module
    sharing its weight: transformers 5 gives T5 and BART separate encoder and decoder embeddings
    tied to ``shared``, and the model only ever calls those.
    """
    if not hasattr(model, "get_input_embeddings"):
        raise TypeError(f"{type(model).__name__} has no get_input_embeddings(); pass a transformers or PEFT model")
    root = model.get_input_embeddings()
    inner = [m for m in root.modules() if isinstance(m, nn.Embedding)]
    if not inner:
        raise TypeError(f"the input embeddings of {type(model).__name__} hold no nn.Embedding "
                        f"(got {type(root).__name__})")
    weights = {id(m.weight) for m in inner}
    found = {id(m): m for m in inner}
    for m in model.modules():
        if isinstance(m, nn.Embedding) and id(m.weight) in weights:
            found.setdefault(id(m), m)
    return list(found.values())


def _noisy_below(module: nn.Module, paths: tuple[str, ...]) -> list[NoisyEmbedding]:
    """The noisy embeddings at (or inside, once PEFT has wrapped them) ``paths`` below ``module``."""
    out = []
    for path in paths:
        try:
            sub = module.get_submodule(path)
        except AttributeError:
            continue
        out.extend(m for m in sub.modules() if isinstance(m, NoisyEmbedding))
    return out


def _make_hooks(paths: tuple[str, ...], signature: inspect.Signature, outermost: bool):
    """A pre-hook that pushes this call's side inputs onto each embedding's stack, and a hook that
    pops exactly that frame. The innermost call decides each side input its ``forward`` takes (a
    decoder called without a mask gets none, not its encoder's); one it does not take comes from
    the enclosing frame (BERT's embeddings module takes ``position_ids`` but not the model's
    ``attention_mask``). The outermost module's pre-hook first drops frames that an interrupted
    call (``KeyboardInterrupt`` skips ``always_call`` hooks) left behind."""
    var_keyword = next((p.name for p in signature.parameters.values() if p.kind is p.VAR_KEYWORD), None)
    takes = (*(name in signature.parameters for name in _SIDE_INPUTS),
             _CU_SEQLENS in signature.parameters or var_keyword is not None)

    def push(module, args, kwargs):
        try:
            bound = signature.bind_partial(*args, **kwargs).arguments
        except TypeError:
            bound = kwargs
        cu_seqlens = bound.get(_CU_SEQLENS, kwargs.get(_CU_SEQLENS))
        if cu_seqlens is None and var_keyword is not None:
            cu_seqlens = (bound.get(var_keyword) or {}).get(_CU_SEQLENS)
        if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1:
            cu_seqlens = None
        frame = (*(bound.get(name) for name in _SIDE_INPUTS), cu_seqlens)
        for emb in _noisy_below(module, paths):
            stack = emb._side_input_stack
            if outermost:
                stack.clear()
            outer = stack[-1] if stack else (None, None, None)
            stack.append(tuple(mine if own else theirs for mine, theirs, own in zip(frame, outer, takes)))

    def pop(module, *_):
        for emb in _noisy_below(module, paths):
            stack = emb._side_input_stack
            if stack:
                stack.pop()

    setattr(push, _MARK, True)
    setattr(pop, _MARK, True)
    return push, pop


def _hook_ancestors(model: nn.Module, embeddings: list[NoisyEmbedding]) -> None:
    """Hook every module above an embedding whose forward takes a side input (once per module)."""
    targets = {id(e) for e in embeddings}
    names = [name for name, m in model.named_modules(remove_duplicate=False) if id(m) in targets]
    modules = dict(model.named_modules(remove_duplicate=False))
    hooked = set()
    prefixes = sorted({".".join(n.split(".")[:i]) for n in names for i in range(n.count(".") + 1)}, key=len)
    for prefix in prefixes:
        module = modules[prefix]
        if id(module) in hooked or isinstance(module, nn.Embedding) or _has_our_hook(module):
            continue
        try:
            signature = inspect.signature(module.forward)
        except (TypeError, ValueError):
            continue
        if not any(p in signature.parameters for p in _SIDE_INPUTS):
            continue
        outermost = not hooked  # prefixes come shortest first
        hooked.add(id(module))
        paths = tuple(n[len(prefix) + 1:] if prefix else n for n in names if not prefix or n.startswith(prefix + "."))
        push, pop = _make_hooks(paths, signature, outermost)
        module.register_forward_pre_hook(push, with_kwargs=True)
        module.register_forward_hook(pop, always_call=True)


def _has_our_hook(module: nn.Module) -> bool:
    return any(getattr(fn, _MARK, False) for fn in module._forward_pre_hooks.values())


def _remove_our_hooks(module: nn.Module) -> None:
    # What RemovableHandle.remove does, for hooks whose handles a deepcopy did not carry over.
    for hooks, extras in ((module._forward_pre_hooks, (module._forward_pre_hooks_with_kwargs,)),
                          (module._forward_hooks, (module._forward_hooks_with_kwargs,
                                                   module._forward_hooks_always_called))):
        for key in [k for k, fn in hooks.items() if getattr(fn, _MARK, False)]:
            del hooks[key]
            for extra in extras:
                extra.pop(key, None)


def is_patched(model: nn.Module) -> bool:
    """Whether ``model`` holds a noisy embedding or our hooks (from :func:`patch_model`)."""
    return any(isinstance(m, NoisyEmbedding) and "_neft_original_class" in vars(m) or _has_our_hook(m)
               for m in model.modules())


def patch_model(model: nn.Module, noise_alpha: float = 5.0, length_mode: str = "per_sequence", *,
                backend: str = "auto", generator=None, tp_group=None) -> nn.Module:
    """Add NEFTune noise to ``model``'s input embeddings in train mode; returns ``model``.

    Args:
        model: a transformers ``PreTrainedModel``, a PEFT ``PeftModel``, or any module with
            ``get_input_embeddings()``.
        noise_alpha, length_mode, backend, generator, tp_group: as for
            :class:`~neft_kernels.NoisyEmbedding`.
            ``"per_sequence"`` takes ``L`` from the ``attention_mask`` and ``position_ids`` that
            the innermost hooked module (the one calling the embedding) was called with; packed
            rows start a sub-sequence wherever the position is 0.

    Idempotent: patching again only updates the options. Undo with :func:`unpatch_model`.
    """
    options = dict(length_mode=length_mode, backend=backend, generator=generator, tp_group=tp_group)
    # Everything that can be refused is refused before the model is touched.
    validation.check_noise_options(noise_alpha, options)
    targets = _input_embeddings(model)
    for emb in targets:
        if emb.sparse:
            raise ValueError(f"{type(emb).__name__}(sparse=True) cannot be patched: the fused backward produces a "
                             "dense gradient")
    embeddings = [make_noisy(e, noise_alpha, **options) for e in targets]
    _hook_ancestors(model, embeddings)
    return model


def unpatch_model(model: nn.Module) -> nn.Module:
    """Undo :func:`patch_model` on ``model`` and everything in it (copies of a patched model too):
    the original embedding classes, the same modules and weights, no hooks left."""
    for module in model.modules():
        _remove_our_hooks(module)
        if isinstance(module, nn.Embedding):
            make_plain(module)
    return model


@contextmanager
def patched(model: nn.Module, noise_alpha: float = 5.0, length_mode: str = "per_sequence",
            **options) -> Iterator[nn.Module]:
    """``patch_model`` for the ``with`` block only: on exit (also on an exception) the model is
    as it was on entry, unpatched, or patched with its earlier options. Options that are refused
    raise before the model is touched."""
    before = [(e, e.noise_options()) for e in model.modules() if isinstance(e, NoisyEmbedding)]
    was_patched = is_patched(model)
    patch_model(model, noise_alpha, length_mode, **options)
    try:
        yield model
    finally:
        if not was_patched:
            unpatch_model(model)
        for emb, opts in before:
            emb.configure_noise(**opts)
