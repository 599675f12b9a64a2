"""Class surgery: an ``nn.Embedding`` (any subclass) made a :class:`NoisyEmbedding` in place, and back.

The module object, its weight Parameter and its ``state_dict`` stay the same; only the class
changes, to a generated class deriving from both (``noisy_class``), so the subclass's own forward
still runs.
"""

from __future__ import annotations

from functools import cache
from typing import cast

from torch import nn

from .module import NOISE_STATE, ORIGINAL_CLASS, NoisyEmbedding
from .options import NoiseOptions


@cache
def noisy_class(cls: type[nn.Embedding]) -> type[NoisyEmbedding]:
    """The :class:`NoisyEmbedding` class an instance of ``cls`` becomes when made noisy.

    ``nn.Embedding`` maps to ``NoisyEmbedding``. A subclass maps to a class deriving from both,
    ``NoisyEmbedding`` first: its own ``forward`` (Gemma's scaling, say) still runs, in eval mode
    as it is, in train mode with the noise added to its output, where transformers' NEFTune hook
    adds it too.
    """
    if issubclass(cls, NoisyEmbedding):
        return cls
    if cls is nn.Embedding:
        return NoisyEmbedding
    own_forward = cls.forward is not nn.Embedding.forward
    return type(f"Noisy{cls.__name__}", (NoisyEmbedding, cls),
                {"_noise_after_own_forward": own_forward, "_neft_base": cls, "__module__": __name__})


def rebuild_noisy(base: type[nn.Embedding]) -> NoisyEmbedding:
    """Unpickling a module of a generated class: the class is made again from its base."""
    cls = noisy_class(base)  # type: ignore[arg-type]  # a class is hashable (mypy#11470)
    return cls.__new__(cls)


def make_noisy(embedding: nn.Embedding, noise_alpha: float = 5.0, **options) -> NoisyEmbedding:
    """Turn ``embedding`` itself into a :class:`NoisyEmbedding`, in place.

    The module object, its weight Parameter (so tied heads stay tied), its buffers and its
    ``state_dict`` stay the same; only the class changes. Calling it again sets the options
    (:class:`~neft_kernels.NoiseOptions`, as keywords). :func:`make_plain` undoes it. Every option
    is checked first: when it raises, the module is as it was.
    """
    noise_options = NoiseOptions.make(noise_alpha=noise_alpha, **options)
    if not isinstance(embedding, nn.Embedding):
        raise TypeError(f"expected an nn.Embedding, got {type(embedding).__name__}")
    vars(embedding).pop(MADE_PLAIN, None)
    if embedding.sparse:
        raise ValueError("NoisyEmbedding does not support sparse=True: its fused backward produces a dense gradient")
    if not isinstance(embedding, NoisyEmbedding):
        vars(embedding)[ORIGINAL_CLASS] = type(embedding)
        embedding.__class__ = noisy_class(type(embedding))  # type: ignore[arg-type]  # a class is hashable (mypy#11470)
    embedding = cast(NoisyEmbedding, embedding)  # a class assignment is invisible to type checkers
    embedding.configure_noise(noise_options)
    return embedding


@cache
def _without_noise(cls: type, noisy: type, original: type) -> type:
    """``cls`` with ``noisy`` replaced by ``original`` among its bases: a class that wrapped ours
    later (FSDP2's ``fully_shard`` makes ``FSDP<cls>``) keeps its wrapping."""
    if cls is noisy:
        return original
    bases = tuple(_without_noise(b, noisy, original)  # type: ignore[arg-type]  # a class is hashable (mypy#11470)
                  if issubclass(b, noisy) else b for b in cls.__bases__)
    namespace = {k: v for k, v in vars(cls).items() if k not in ("__dict__", "__weakref__")}  # FSDP's __deepcopy__
    return type(cls.__name__.replace(noisy.__name__, original.__name__), bases, namespace)


MADE_PLAIN = "_neft_made_plain"  # set by make_plain: patch_model's hooks leave such an embedding plain


def make_plain(embedding: nn.Embedding) -> nn.Embedding:
    """Undo :func:`make_noisy`: the original class again, the same module and weight."""
    original = vars(embedding).pop(ORIGINAL_CLASS, None)
    if original is not None:
        vars(embedding)[MADE_PLAIN] = True
        embedding.__class__ = _without_noise(
            type(embedding), noisy_class(original),  # type: ignore[arg-type]  # a class is hashable (mypy#11470)
            original)
        for name in NOISE_STATE:
            vars(embedding).pop(name, None)
    return embedding
