"""Rank-aware noise under torch.distributed, within spec v1.

Every rank draws its seeds from its own generator; with the same ``torch.manual_seed`` on every
rank (the usual setup) the seeds agree. What separates ranks is the Philox **offset**: a rank's
noise uses counters from ``noise_rank << 48`` on. Disjoint counter ranges of one key are
independent streams, and ``2**48`` counters (``2**50`` noise values) per rank per call is far
more than any batch needs.

* Data parallel (DDP, FSDP2, plain ``init_process_group``): ``noise_rank`` is the global rank,
  so ranks draw different noise even for the same batch.
* Tensor parallel: the ranks of a TP group must add the *same* noise. ``noise_rank`` is then the
  group's smallest global rank: equal within the group, distinct across groups. The group is
  declared with ``tp_group=``, or taken from the mesh of a DTensor weight (``RowwiseParallel``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, TypeGuard

import torch

if TYPE_CHECKING or torch.distributed.is_available():  # the type checker sees the class
    from torch.distributed.tensor import DTensor
else:  # a torch build without distributed: nothing is ever a DTensor
    DTensor = ()

RANK_SHIFT = 48
MAX_RANKS = 1 << 14  # rank << 48 stays below 2**62: every counter below 2**63 (validation.check_offset)


_AVAILABLE = torch.distributed.is_available()


def _initialized() -> bool:
    return _AVAILABLE and torch.distributed.is_initialized()


def is_dtensor(t: torch.Tensor) -> TypeGuard[DTensor]:
    return isinstance(t, DTensor)


def noise_rank(tp_group=None, weight: torch.Tensor | None = None) -> int:
    """Which noise stream this rank draws: 0 without torch.distributed (as in one process)."""
    if not _initialized():
        return 0
    dist = torch.distributed
    if tp_group is None and weight is not None and is_dtensor(weight):
        mesh = weight.device_mesh
        if mesh.ndim != 1:
            raise ValueError("a DTensor weight on a multi-dimensional mesh: pass tp_group= (the mesh dimension "
                             "whose ranks must share noise), e.g. mesh.get_group('tp')")
        tp_group = mesh.get_group()
    if tp_group is None:
        rank = dist.get_rank()
    else:
        ranks = dist.get_process_group_ranks(tp_group)
        if dist.get_rank() not in ranks:
            raise ValueError(f"tp_group holds ranks {ranks}, not this rank ({dist.get_rank()}): pass the group this "
                             "rank's embedding is replicated across")
        rank = min(ranks)
    if rank >= MAX_RANKS:
        raise ValueError(f"rank-aware noise supports {MAX_RANKS} noise streams (ranks), got rank {rank}")
    return rank


def rank_offset(tp_group=None, weight: torch.Tensor | None = None) -> int:
    """The Philox offset of this rank's noise stream."""
    return noise_rank(tp_group, weight) << RANK_SHIFT if _initialized() else 0
