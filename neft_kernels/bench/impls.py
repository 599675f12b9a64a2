"""The implementations the benchmark compares, each a ``(ids, weight, mask) -> output`` callable."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from ..backends import available_backends
from ..id_check import set_id_check
from ..ops import noisy_embedding

ALPHA = 5.0


@dataclass(frozen=True)
class Impl:
    name: str
    backend: str
    fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def embedding(ids: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return F.embedding(ids, weight)


def hf_hook(ids: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """transformers' ``neftune_post_forward_hook`` on a plain lookup: L = padded width."""
    out = F.embedding(ids, weight)
    dims = torch.tensor(out.size(1) * out.size(2))
    mag = ALPHA / torch.sqrt(dims)
    # 0-d tensor bounds, as the hook passes them (torch takes them; its stub says float).
    return out + torch.zeros_like(out).uniform_(-mag, mag)  # type: ignore[arg-type]


def rand_like(ids: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The same noise written for inductor, which fuses it into one kernel: the strongest peer."""
    out = F.embedding(ids, weight)
    mag = ALPHA / (out.size(1) * out.size(2)) ** 0.5
    return out + (torch.rand_like(out) * 2 - 1) * mag


def _neft(backend: str, id_check: bool = True):
    def fn(ids: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        previous = set_id_check(id_check)
        try:
            return noisy_embedding(ids, weight, ALPHA, seed=1234, attention_mask=mask, backend=backend)
        finally:
            set_id_check(previous)
    return fn


def neft_backends(device: torch.device) -> list[str]:
    """The backends timed by default: the fused ones of a device (the Triton interpreter is a test
    tool; the pure-PyTorch reference is timed on request, ``--backend torch``)."""
    wanted = ("triton", "cuda") if device.type == "cuda" else ("cpu",)
    return [b for b in wanted if b in available_backends()] or ["torch"]


def implementations(device: torch.device, backends: list[str] | None = None) -> list[Impl]:
    """Every implementation, in table order; compiled ones are compiled lazily on first call (run them
    under :func:`neft_kernels.bench.harness.compile_settings`)."""
    impls = [
        Impl("embedding", "eager", embedding),
        Impl("hf_hook", "eager", hf_hook),
        # Static shapes: the peers get kernels specialised to every shape, their best case.
        Impl("hf_hook_compiled", "inductor", torch.compile(hf_hook, dynamic=False)),
        Impl("rand_like_compiled", "inductor", torch.compile(rand_like, dynamic=False)),
    ]
    impls += [Impl("neft", b, _neft(b)) for b in (backends or neft_backends(device))]
    if device.type == "cuda":  # what the sync-free id check (a device record, then a host word or a copy) costs
        impls += [Impl("neft_no_id_check", b, _neft(b, id_check=False)) for b in (backends or neft_backends(device))]
    return impls


# A collator pads with the tokenizer's pad token (eos where it has none), and models such as Llama
# have no padding_idx: a batch's pads are one id, whose gradient row sums every one of them.
PAD_ID = 2


def padded_batch(b: int, length: int, vocab: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """CPU (ids, attention_mask) of a padded batch: real lengths from half the row to all of it, as
    in a typical instruction batch; the pads hold ``PAD_ID`` (the last id of a smaller vocabulary)."""
    ids = torch.randint(0, vocab, (b, length), generator=gen)
    real = torch.linspace(length // 2, length, b).long()
    mask = (torch.arange(length)[None, :] < real[:, None]).long()
    return ids.masked_fill(mask == 0, min(PAD_ID, vocab - 1)), mask


def inputs(b: int, length: int, d: int, vocab: int, dtype: torch.dtype, device: torch.device):
    """(ids, weight requiring grad, attention_mask, output gradient) of one benchmark shape."""
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(vocab, d, generator=gen).to(dtype).to(device).requires_grad_()
    ids, mask = padded_batch(b, length, vocab, gen)
    grad_out = torch.randn(b, length, d, generator=gen).to(dtype).to(device)
    return ids.to(device), weight, mask.to(device), grad_out
