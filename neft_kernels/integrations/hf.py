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
import logging
import weakref
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from ..compat import hooks, remove_hooks
from ..module import MISSING_LABELS, ORIGINAL_CLASS, NoisyEmbedding
from ..options import NoiseOptions
from ..patching import MADE_PLAIN, make_noisy, make_plain

logger = logging.getLogger("neft_kernels")
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
    try:
        root = model.get_input_embeddings()  # type: ignore[operator]  # HF method, typed Tensor | Module
    except NotImplementedError as err:  # character-level models (CANINE) have no token embedding table
        raise TypeError(f"{type(model).__name__} has no input embeddings to patch ({err})") from err
    if root is None:
        raise TypeError(f"{type(model).__name__}.get_input_embeddings() returned None: nothing to patch")
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
    out: list[NoisyEmbedding] = []
    for path in paths:
        try:
            sub = module.get_submodule(path)
        except AttributeError:
            continue
        out.extend(m for m in sub.modules() if isinstance(m, NoisyEmbedding))
    return out


class _HookFrame(tuple):
    """A side-input frame pushed by a hook (the frames of ``side_inputs`` blocks are plain tuples): the
    only kind the hooks pop, and that the outermost call drops as left behind."""


class _SideInputHook:
    """The forward pre-hook (``push``) and hook (``pop``) that hand a module's side inputs to the
    noisy embeddings at ``paths`` below it. Objects of a module-level class, so that a patched model
    pickles (``torch.save(model)``) and deep-copies with its hooks.

    The innermost call decides each side input its ``forward`` takes (a decoder called without a
    mask gets none, not its encoder's); a mask or position ids it does not take come from the
    enclosing frame (BERT's embeddings module takes ``position_ids`` but not the model's
    ``attention_mask``); ``cu_seqlens`` always comes from the innermost call. The outermost
    module's pre-hook first drops frames that an interrupted call (``KeyboardInterrupt`` skips
    ``always_call`` hooks) left behind, and makes noisy again an input embedding that was replaced
    since patching (``resize_token_embeddings``).
    """

    def __init__(self, paths: tuple[str, ...], signature: inspect.Signature, outermost: bool, pop: bool):
        self.paths, self.outermost, self.pop = paths, outermost, pop
        self.var_keyword = next((p.name for p in signature.parameters.values() if p.kind is p.VAR_KEYWORD), None)
        # cu_seqlens indexes one call's flat tokens: never inherited (a decoder must not get its encoder's).
        self.takes = (*(name in signature.parameters for name in _SIDE_INPUTS), True)
        self.takes_labels = "labels" in signature.parameters
        self._signature = signature
        setattr(self, _MARK, True)

    def __getstate__(self) -> dict:
        # A signature holds annotations that need not pickle; it is read again from the module.
        return {k: v for k, v in vars(self).items() if k != "_signature"}

    def _bound(self, module, args, kwargs) -> dict:
        if getattr(self, "_signature", None) is None:
            self._signature = inspect.signature(module.forward)
        try:
            return self._signature.bind_partial(*args, **kwargs).arguments
        except TypeError:
            return kwargs

    def __call__(self, module, args, *rest):
        if self.pop:
            for emb in _noisy_below(module, self.paths):
                if emb._side_input_stack and type(emb._side_input_stack[-1]) is _HookFrame:
                    emb._side_input_stack.pop()
            return None
        kwargs = rest[0]
        if self.outermost:
            _repatch_replaced(module)
        bound = self._bound(module, args, kwargs)
        cu_seqlens = bound.get(_CU_SEQLENS, kwargs.get(_CU_SEQLENS))
        if cu_seqlens is None and self.var_keyword is not None:
            cu_seqlens = (bound.get(self.var_keyword) or {}).get(_CU_SEQLENS)
        if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1:
            cu_seqlens = None
        frame = (*(bound.get(name) for name in _SIDE_INPUTS), cu_seqlens)
        labels = bound.get("labels")
        for emb in _noisy_below(module, self.paths):
            stack = emb._side_input_stack
            if self.outermost:  # hooks' frames left behind; a user's side_inputs block around the call stays
                stack[:] = [f for f in stack if type(f) is not _HookFrame]
            outer = stack[-1] if stack else (None, None, None, MISSING_LABELS)
            mine = tuple(m if own else theirs for m, theirs, own in zip(frame, outer, self.takes, strict=False))
            stack.append(_HookFrame((*mine, self._noise_mask(emb.noise_options.noise_tokens, labels, outer[3]))))
        return None

    def _noise_mask(self, noise_tokens: str, labels, outer):
        """The tokens to noise, from the labels of the innermost call that takes them (causal LMs'
        labels are aligned with their input ids: -100 marks the prompt)."""
        if noise_tokens == "all":  # an enclosing side_inputs(noise_mask=...) block's, if any
            return None if outer is MISSING_LABELS else outer
        if not self.takes_labels:
            return outer
        if not isinstance(labels, torch.Tensor):
            return MISSING_LABELS
        return labels != -100 if noise_tokens == "response" else labels == -100


def _hook_ancestors(model: nn.Module, embeddings: list[NoisyEmbedding]) -> None:
    """Hook every module above an embedding whose forward takes a side input (once per module)."""
    targets = {id(e) for e in embeddings}
    names = [name for name, m in model.named_modules(remove_duplicate=False) if id(m) in targets]
    modules = dict(model.named_modules(remove_duplicate=False))
    hooked: set[int] = set()
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
        module.register_forward_pre_hook(_SideInputHook(paths, signature, outermost, pop=False), with_kwargs=True)
        module.register_forward_hook(_SideInputHook(paths, signature, outermost, pop=True), always_call=True)


def _has_our_hook(module: nn.Module) -> bool:
    return any(getattr(fn, _MARK, False) for fn in hooks(module, "forward_pre").values())


def _remove_our_hooks(module: nn.Module) -> None:
    # Also for hooks whose handles a deepcopy or pickle did not carry over.
    for kind in ("forward_pre", "forward"):
        remove_hooks(module, kind, [k for k, fn in hooks(module, kind).items() if getattr(fn, _MARK, False)])


_OPTIONS = "_neft_patch_options"  # on the patched root: what patch_model was last called with


def _repatch_replaced(root: nn.Module) -> None:
    """Make noisy again an input embedding that replaced the patched one (``set_input_embeddings``,
    or a resize that builds a new module), with the options ``patch_model`` was last called with.
    An embedding the user turned back with ``make_plain`` stays plain."""
    options = vars(root).get(_OPTIONS)
    if options is None or not hasattr(root, "get_input_embeddings"):
        return
    modules = list(root.get_input_embeddings().modules())  # type: ignore[operator]  # HF method, typed Tensor | Module
    if not any(isinstance(m, NoisyEmbedding) or vars(m).get(MADE_PLAIN) for m in modules):
        patch_model(root, **options.as_kwargs())


def _neftune_sites(model: nn.Module) -> list[nn.Module]:
    """Where another NEFTune implementation puts its hook: the input embeddings, and every module of
    ``get_input_embeddings()`` (PEFT's LoRA or ``modules_to_save`` wrapper, where transformers'
    ``activate_neftune`` hooks a PEFT model)."""
    sites = {id(m): m for m in _input_embeddings(model)}
    embeddings = model.get_input_embeddings()  # type: ignore[operator]  # HF method, typed Tensor | Module
    sites.update((id(m), m) for m in embeddings.modules())
    return list(sites.values())


def _is_neftune_hook(fn) -> bool:
    return "neftune" in getattr(fn, "__name__", type(fn).__name__).lower()


def other_neftune(model: nn.Module) -> list[str]:
    """Any NEFTune mechanism other than ours on ``model``'s input embeddings: transformers' forward
    hook (and TRL's or Unsloth's copies of it, all named ``neftune_post_forward_hook``), a
    ``neftune_noise_alpha`` attribute on an embedding, or on the model or its config."""
    found = []
    for site in _neftune_sites(model):
        for fn in hooks(site, "forward").values():
            if _is_neftune_hook(fn):
                found.append(f"a forward hook {getattr(fn, '__name__', type(fn).__name__)} on {type(site).__name__}")
        if getattr(site, "neftune_noise_alpha", None) is not None:
            found.append(f"{type(site).__name__}.neftune_noise_alpha = {site.neftune_noise_alpha}")
    for owner in (model, getattr(model, "config", None)):
        alpha = getattr(owner, "neftune_noise_alpha", None)
        if alpha is not None:
            found.append(f"{type(owner).__name__}.neftune_noise_alpha = {alpha}")
    return found


def remove_other_neftune(model: nn.Module) -> int:
    """Remove what :func:`other_neftune` finds (the hooks and the attributes); returns how many."""
    removed = 0
    for site in _neftune_sites(model):
        keys = [k for k, fn in hooks(site, "forward").items() if _is_neftune_hook(fn)]
        removed += remove_hooks(site, "forward", keys)
        removed += vars(site).pop("neftune_noise_alpha", None) is not None
    for owner in (model, getattr(model, "config", None)):
        if owner is not None and getattr(owner, "neftune_noise_alpha", None) is not None:
            try:
                delattr(owner, "neftune_noise_alpha")
            except AttributeError:
                owner.neftune_noise_alpha = None
            removed += 1
    return removed


def refuse_other_neftune(model: nn.Module) -> None:
    """Raise if another NEFTune mechanism would add noise on top of ours."""
    found = other_neftune(model)
    if found:
        raise RuntimeError(
            "another NEFTune mechanism is active on this model (" + "; ".join(found) + "): with neft_kernels it "
            "would add noise twice. Unset TrainingArguments.neftune_noise_alpha (or your library's NEFTune option), "
            "or remove it with neft_kernels.integrations.hf.remove_other_neftune(model)")


def is_patched(model: nn.Module) -> bool:
    """Whether ``model`` holds an embedding made noisy by :func:`patch_model` (or ``make_noisy``), or
    our hooks: the check that the noise is on."""
    return any(isinstance(m, NoisyEmbedding) and ORIGINAL_CLASS in vars(m) or _has_our_hook(m)
               for m in model.modules())


def patch_model(model: nn.Module, noise_alpha: float = 5.0, length_mode: str = "per_sequence",
                **options) -> nn.Module:
    """Add NEFTune noise to ``model``'s input embeddings in train mode; returns ``model``.

    Args:
        model: a transformers ``PreTrainedModel``, a PEFT ``PeftModel``, or any module with
            ``get_input_embeddings()``.
        noise_alpha, length_mode, options: :class:`~neft_kernels.NoiseOptions` (``distribution``,
            ``noise_tokens``, ``backend``, ``generator``, ``tp_group``), as keywords.
            ``"per_sequence"`` takes ``L`` from the ``attention_mask`` and ``position_ids`` that
            the innermost hooked module (the one calling the embedding) was called with; packed
            rows start a sub-sequence wherever the position is 0. ``noise_tokens="response"``
            (or ``"prompt"``) takes the noised tokens from the ``labels`` the model is called with.

    Idempotent: patching again sets the options to those given (the others to their defaults).
    Undo with :func:`unpatch_model`.
    """
    # Everything that can be refused is refused before the model is touched.
    noise_options = NoiseOptions.make(noise_alpha=noise_alpha, length_mode=length_mode, **options)
    if noise_options.noise_tokens != "all" and getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        raise ValueError(f"noise_tokens={noise_options.noise_tokens!r} takes the noised tokens from the labels, and an "
                         "encoder-decoder's labels are the decoder's targets, not its input tokens: use "
                         "noise_tokens='all'")
    targets = _input_embeddings(model)
    for emb in targets:
        if emb.sparse:
            raise ValueError(f"{type(emb).__name__}(sparse=True) cannot be patched: the fused backward produces a "
                             "dense gradient")
    refuse_other_neftune(model)
    first_time = not is_patched(model)
    embeddings = [make_noisy(e, **noise_options.as_kwargs()) for e in targets]
    _hook_ancestors(model, embeddings)
    vars(model)[_OPTIONS] = noise_options
    if first_time:  # said once per patch, not per call
        names = sorted({name for name, m in model.named_modules() if any(m is e for e in embeddings)})
        logger.info("NEFTune noise on %s of %s: noise_alpha=%s, length_mode=%s, distribution=%s, noise_tokens=%s, "
                    "backend=%s", ", ".join(names), type(model).__name__, noise_options.noise_alpha,
                    noise_options.length_mode, noise_options.distribution, noise_options.noise_tokens,
                    noise_options.backend)
    return model


def unpatch_model(model: nn.Module) -> nn.Module:
    """Undo :func:`patch_model` on ``model`` and everything in it (copies of a patched model too):
    the original embedding classes, the same modules and weights, no hooks left."""
    for module in model.modules():
        _remove_our_hooks(module)
        vars(module).pop(_OPTIONS, None)
        if isinstance(module, nn.Embedding):
            make_plain(module)
            vars(module).pop(MADE_PLAIN, None)  # unpatched as a whole: nothing left to remember
    return model


@contextmanager
def patched(model: nn.Module, noise_alpha: float = 5.0, length_mode: str = "per_sequence",
            **options) -> Iterator[nn.Module]:
    """``patch_model`` for the ``with`` block only: on exit (also on an exception) the model is
    as it was on entry, unpatched, or patched with its earlier options. Options that are refused
    raise before the model is touched."""
    restore = _snapshot(model)
    patch_model(model, noise_alpha, length_mode, **options)
    try:
        yield model
    finally:
        restore()


def _snapshot(model: nn.Module):
    """A function that puts ``model``'s patch state back exactly as it is now: which embeddings are
    noisy and with which options (hand-built ones too), which modules carry our hooks, what
    ``patch_model`` last recorded on the root, and which embeddings were made plain by hand. It
    holds the root weakly (a run that never ended keeps its restore beside the model, not in it)."""
    noisy = [(e, e.noise_options) for e in model.modules() if isinstance(e, NoisyEmbedding)]
    plain = [(e, vars(e).get(MADE_PLAIN)) for e in model.modules()
             if isinstance(e, nn.Embedding) and not isinstance(e, NoisyEmbedding)]
    hooked = {id(m) for m in model.modules() if _has_our_hook(m)}
    root_options, root = vars(model).get(_OPTIONS), weakref.ref(model)

    def restore() -> None:
        model = root()
        if model is None:
            return
        was_noisy = {id(emb) for emb, _ in noisy}
        for module in model.modules():
            if id(module) not in hooked:
                _remove_our_hooks(module)
            if isinstance(module, NoisyEmbedding) and id(module) not in was_noisy and ORIGINAL_CLASS in vars(module):
                # made noisy since (a replaced input embedding, PEFT's copy): as patched then
                if root_options is None:
                    make_plain(module)
                    vars(module).pop(MADE_PLAIN, None)
                else:
                    module.configure_noise(root_options)
        for emb, made_plain in plain:
            make_plain(emb)
            if not made_plain:
                vars(emb).pop(MADE_PLAIN, None)
        for emb, opts in noisy:  # its options again (made noisy again if unpatched since)
            make_noisy(emb, **opts.as_kwargs())
        if any(not _has_our_hook(m) for m in model.modules() if id(m) in hooked):  # unpatched since
            _hook_ancestors(model, [emb for emb, _ in noisy])
        if root_options is None:
            vars(model).pop(_OPTIONS, None)
        else:
            vars(model)[_OPTIONS] = root_options

    return restore
