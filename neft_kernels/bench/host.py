"""Host time per eager forward call at a tiny shape, where nothing but the per-call cost counts.

Each call's side inputs in turn (a mask, packed ``position_ids``, both, ``cu_seqlens``), the
module in train mode, against ``F.embedding`` and transformers' hook; interleaved, median of
``reps`` samples of ``calls`` back-to-back calls (nothing waited for on a GPU).
"""

from __future__ import annotations

import statistics

import torch
import torch.nn.functional as F

from ..module import NoisyEmbedding
from ..ops import noisy_embedding
from . import measure
from .impls import ALPHA, hf_hook


def run(device: torch.device, shape: tuple[int, int, int, int], reps: int = 15, calls: int = 300) -> list[dict]:
    b, length, d, vocab = shape
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(vocab, d, generator=gen).to(device).requires_grad_()
    ids = torch.randint(0, vocab, (b, length), generator=gen).to(device)
    mask = torch.ones(b, length, dtype=torch.long, device=device)
    mask[0, length // 2:] = 0
    pos = torch.arange(length, device=device).repeat(b, 1)
    pos[:, length // 2:] -= length // 2
    cu = torch.arange(0, b * length + 1, length // 2, dtype=torch.int32, device=device)
    emb = NoisyEmbedding(vocab, d, _weight=weight.detach().clone(), device=device, noise_alpha=ALPHA).train()
    fns = {
        "F.embedding": lambda: F.embedding(ids, weight),
        "hf_hook": lambda: hf_hook(ids, weight, mask),
        "neft, attention_mask": lambda: noisy_embedding(ids, weight, ALPHA, seed=1, attention_mask=mask),
        "neft, position_ids": lambda: noisy_embedding(ids, weight, ALPHA, seed=1, position_ids=pos),
        "neft, both": lambda: noisy_embedding(ids, weight, ALPHA, seed=1, attention_mask=mask, position_ids=pos),
        "neft, cu_seqlens": lambda: noisy_embedding(ids, weight, ALPHA, seed=1, cu_seqlens=cu),
        "NoisyEmbedding (train), attention_mask": lambda: emb(ids, attention_mask=mask),
    }
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():  # warm-up: compiles, allocations
        for _ in range(5):
            fn()
    for _ in range(reps):
        for name, fn in fns.items():
            samples[name].append(measure.host_us(fn, device, calls))
    base = statistics.median(samples["F.embedding"])
    return [{"kind": "host", "call": name, "device": device.type, "shape": list(shape),
             "host_us": statistics.median(s), "vs_f_embedding": statistics.median(s) / base}
            for name, s in samples.items()]


def table(records: list[dict]) -> str:
    lines = [f"{'call':<40} {'host us':>8} {'x F.embedding':>14}"]
    lines += [f"{r['call']:<40} {r['host_us']:>8.1f} {r['vs_f_embedding']:>14.2f}" for r in records]
    return "\n".join(lines)
