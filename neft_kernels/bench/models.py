"""The model-shape table: the embeddings of real models (width, vocabulary), a padded batch with an
attention_mask (its pads one id, as collators pad) and one packed row with position_ids, forward,
backward and both, against ``F.embedding``, transformers' hook and the strongest compiled peer.

On a GPU the kernel figures come from CUDA-graph replay (GPU time alone); ``%copy`` is the bytes a
pass must move over that time, against this run's copy bandwidth.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..ops import noisy_embedding
from . import measure
from .harness import PASSES, pass_fn
from .impls import ALPHA, hf_hook, neft_backends, padded_batch, rand_like

# name: (embedding dim, vocabulary)
MODEL_SHAPES = {
    "smollm2-135m": (576, 49152), "qwen2.5-0.5b": (896, 151936), "gemma-3-1b": (1152, 262144),
    "llama-3.2-1b": (2048, 128256), "gemma-2-2b": (2304, 256000), "qwen2.5-7b": (3584, 152064),
    "llama-3-8b": (4096, 128256),
}
# name: (rows, tokens per row, side input); the packed row holds sequences of 64 to 4096 tokens.
LAYOUTS = {"padded 8x2048": (8, 2048, "attention_mask"), "packed 1x32768": (1, 32768, "position_ids")}


def model_inputs(d: int, vocab: int, layout: str, dtype: torch.dtype,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    """(ids, weight requiring grad, side-input kwargs, output gradient) of one row of the table."""
    rows, width, side = LAYOUTS[layout]
    gen = torch.Generator().manual_seed(0)
    # Made on the device: a CPU randn of a 262144 x 1152 table takes seconds.
    weight = torch.randn(vocab, d, device=device, dtype=dtype, generator=torch.Generator(device).manual_seed(0))
    weight.requires_grad_()
    if side == "attention_mask":
        ids, value = padded_batch(rows, width, vocab, gen)
    else:
        ids = torch.randint(0, vocab, (rows, width), generator=gen)
        value, start = torch.empty(rows, width, dtype=torch.long), 0
        while start < width:
            n = int(torch.randint(64, 4097, (1,), generator=gen))
            value[:, start:start + n] = torch.arange(min(n, width - start))
            start += n
    grad_out = torch.randn(rows, width, d, device=device, dtype=dtype, generator=torch.Generator(device).manual_seed(1))
    return ids.to(device), weight, {side: value.to(device)}, grad_out


def _impls(device: torch.device, dtype: torch.dtype, backends: list[str] | None) -> dict[str, Callable]:
    impls: dict[str, Callable] = {"embedding[eager]": lambda ids, w, side: F.embedding(ids, w),
                                  "hf_hook[eager]": lambda ids, w, side: hf_hook(ids, w, None)}
    if dtype == torch.bfloat16:  # one compile per row: the compiled peer on the dtype training uses
        compiled = torch.compile(rand_like, dynamic=False)
        impls["rand_like_compiled[inductor]"] = lambda ids, w, side: compiled(ids, w, None)
    for b in backends or neft_backends(device):
        impls[f"neft[{b}]"] = (lambda ids, w, side, b=b: noisy_embedding(ids, w, ALPHA, seed=1234, backend=b,
                                                                          **side))
    return impls


def cases(dtypes: list[torch.dtype], models: list[str] | None = None) -> list[tuple[str, str, torch.dtype, str]]:
    """(model, layout, dtype, pass): bf16 every pass; float32 the forward (its bandwidth goal)."""
    out = []
    for model in models or MODEL_SHAPES:
        for layout in LAYOUTS:
            for dtype in dtypes:
                passes = PASSES if dtype == torch.bfloat16 else ("forward",)
                out += [(model, layout, dtype, p) for p in passes]
    return out


def run(device: torch.device, dtypes: list[torch.dtype], backends: list[str] | None = None,
        models: list[str] | None = None, progress: bool = True, reps: int = 10, inner: int = 5) -> list[dict]:
    """One record per (model, layout, dtype, pass, implementation)."""
    on_gpu = device.type == "cuda"
    copy_gbps = measure.copy_bandwidth(device, reps=reps)
    records, key, batch, impls = [], None, None, None
    for model, layout, dtype, pass_ in tqdm(cases(dtypes, models), desc="model shapes", disable=not progress):
        d, vocab = MODEL_SHAPES[model]
        if key != (model, layout, dtype):
            key, batch = (model, layout, dtype), None
            if on_gpu:
                torch.cuda.empty_cache()
            batch, impls = model_inputs(d, vocab, layout, dtype, device), _impls(device, dtype, backends)
        assert batch is not None and impls is not None  # the first case makes them
        ids, weight, side, grad_out = batch
        fns = {name: pass_fn(pass_, fn, ids, weight, side, grad_out) for name, fn in impls.items()}
        times = measure.interleaved_times(fns, device, reps=reps, inner=inner)
        moved = measure.bytes_moved(pass_, ids.numel(), d, vocab, weight.element_size())
        rows = []
        for name, fn in fns.items():
            stats = measure.summary(times[name])
            graph = measure.graph_ms(fn, reps=10, inner=inner) if on_gpu and pass_ != "backward" else None
            best_ms = graph if graph is not None else stats["median_ms"]
            rows.append({"model": model, "layout": layout, "impl": name, "pass": pass_, "B": ids.shape[0],
                         "L": ids.shape[1], "d": d, "V": vocab, "tokens": ids.numel(),
                         "dtype": str(dtype).removeprefix("torch."), **stats, "graph_ms": graph,
                         "peak_bytes": measure.peak_bytes(fn, device), "bytes_moved": moved,
                         "pct_of_copy_bw": 100 * moved / (best_ms / 1e3) / 1e9 / copy_gbps, "copy_gbps": copy_gbps,
                         "device": device.type})
        base = next(r for r in rows if r["impl"].startswith("embedding"))
        hook = next(r for r in rows if r["impl"].startswith("hf_hook"))
        for r in rows:
            r["vs_embedding"] = _best(r) / _best(base)
            r["vs_embedding_peak"] = r["peak_bytes"] / max(base["peak_bytes"], 1)
            r["speedup_vs_hf_hook"] = hook["median_ms"] / r["median_ms"]
        records += rows
    return records


def _best(r: dict) -> float:
    return r["graph_ms"] if r["graph_ms"] is not None else r["median_ms"]


def table(records: list[dict]) -> str:
    """Fixed-width text: GPU time (graph replay; eager where none) and its ratio to F.embedding's."""
    head = (f"{'model':<13} {'layout':<15} {'pass':<16} {'dtype':<8} {'impl':<28} {'graph ms':>9} {'eager ms':>9} "
            f"{'x emb':>6} {'%copy':>6} {'peak MiB':>9} {'x emb mem':>9} {'x hook':>7}")
    lines = [head]
    for r in records:
        graph = f"{r['graph_ms']:.4f}" if r["graph_ms"] is not None else "-"
        lines.append(f"{r['model']:<13} {r['layout']:<15} {r['pass']:<16} {r['dtype']:<8} {r['impl']:<28} "
                     f"{graph:>9} {r['median_ms']:>9.4f} {r['vs_embedding']:>6.2f} {r['pct_of_copy_bw']:>6.1f} "
                     f"{r['peak_bytes'] / 2**20:>9.1f} {r['vs_embedding_peak']:>9.2f} "
                     f"{r['speedup_vs_hf_hook']:>7.2f}")
    return "\n".join(lines)


TABLE_HELP = """model-shape table (--models): x emb = this row's GPU time (graph replay; the eager median where a
pass cannot be captured: the backward of a kept graph) over F.embedding's; %copy from that time;
x emb mem = peak memory over F.embedding's; x hook = the hook's eager median over this row's"""
