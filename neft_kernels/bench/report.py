"""Benchmark output: the stdout table, JSON, CSV and the plot."""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # matplotlib is optional: imported where the plot is drawn
    from matplotlib.typing import LineStyleType

_COLUMNS = [("impl", "{:<18}"), ("backend", "{:<8}"), ("pass", "{:<16}"), ("shape", "{:<22}"),
            ("dtype", "{:<8}"), ("median_ms", "{:>9.3f}"), ("spread_ms", "{:>15}"), ("peak_MiB", "{:>9.1f}"),
            ("gbps", "{:>7.1f}"), ("pct_of_copy_bw", "{:>6.1f}"), ("vs_hf_hook", "{:>7.2f}"),
            ("host", "{:>7}"), ("graph", "{:>8}")]
_HEADERS = ["impl", "backend", "pass", "B,L,d,V", "dtype", "median ms", "p20-p80 ms", "peak MiB", "GB/s",
            "%copy", "x hook", "host us", "graph ms"]


COLUMNS_HELP = """columns of the table:
  impl        embedding: F.embedding alone (the floor); hf_hook: transformers' NEFTune hook (lookup,
              zeros_like, uniform_, add); *_compiled: the hook, and the same noise written with
              rand_like, compiled by inductor (the strongest peers); neft: noisy_embedding, fused
              (neft_no_id_check, GPU only: with the id range check off)
  backend     eager / inductor for the peers; neft's backend (triton, cuda, cpu; torch on request)
  pass        forward; backward (of a kept graph); forward_backward (both, as a training step does)
  B,L,d,V     batch, sequence length, embedding dim, vocabulary; rows are padded from L/2 to L real tokens
  median ms   eager back-to-back wall time per call (GPU: CUDA events), median over interleaved reps
  p20-p80 ms  the spread of those reps
  peak MiB    memory one call allocates beyond what was live before it
  GB/s        bytes the pass must move (ids, rows read, output written; the backward's gradient
              table) over the median time; %copy: that against this run's copy bandwidth
  x hook      hf_hook's median time over this row's (> 1: faster than the hook)
  host us     host time per call: the Python and launch cost a training loop pays (GPU: nothing waited for)
  graph ms    GPU time alone, by CUDA-graph replay (GPU forward only)
  x hook > 1 means faster than the hook; every other "x" column (x F.embedding, x emb, x no noise) > 1
  means slower than its baseline.

then, on CPU, per forward shape: neft's median over the bare Philox stream's for the same number of
  noise values (the C++ kernels' own Philox, into a buffer allocated once: the floor of a fused
  forward), and that floor in ns per element; it depends on the CPU's instruction set (printed in the
  header, NEFT_KERNELS_CPU_ISA forces one).
host-time table: host microseconds per eager forward call at a tiny shape, where only the per-call
  cost counts (Python, checks, launches; a GPU is never waited for), with each side input in turn,
  and that over F.embedding's.
training steps: a Llama-shaped model from a config (random weights, padded batches with masks,
  AdamW), with no noise, transformers' hook and patch_model, interleaved in rounds. step ms: median
  over rounds; x no noise: the median over rounds of the step time over the same round's no-noise
  step time (paired, so that drift between rounds cancels; it need not equal the ratio of the
  medians), with its 20th-80th percentile.
warning: the copy bandwidth read before and after the run differ by more than 20%: other work is
  using the machine, and every figure is noisy."""


def _row(r: dict) -> dict:
    return {**r, "shape": ",".join(map(str, r["shape"])), "spread_ms": f"{r['p20_ms']:.3f}-{r['p80_ms']:.3f}",
            "peak_MiB": r["peak_bytes"] / 2**20, "vs_hf_hook": r["speedup_vs_hf_hook"],
            "host": f"{r['host_us']:.1f}" if "host_us" in r else "-",
            "graph": f"{r['graph_ms']:.4f}" if r.get("graph_ms") is not None else "-"}


def table(records: list[dict]) -> str:
    """The records as a fixed-width text table (also used, as is, in the README)."""
    widths = [len(fmt.format(*([0.0] if "f}" in fmt else [""]))) for _, fmt in _COLUMNS]
    lines = [" ".join(h.rjust(w) if "{:>" in fmt else h.ljust(w)
                      for h, w, (_, fmt) in zip(_HEADERS, widths, _COLUMNS, strict=True))]
    for r in records:
        row = _row(r)
        lines.append(" ".join(fmt.format(row[key]) for key, fmt in _COLUMNS))
    return "\n".join(lines)


def write_json(records: list[dict], path: Path) -> None:
    path.write_text(json.dumps(records, indent=1) + "\n")


def write_csv(records: list[dict], path: Path) -> None:
    fields = [k for k in records[0] if k != "shape"] if records else []
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(records)


def plot(records: list[dict], path: Path) -> None:
    """Speed-up over the hook, one panel per pass, and forward memory.

    A short run (one or two shapes per model) is drawn as grouped bars, one group per shape and
    dtype; a sweep as lines against tokens per batch (colour: implementation; line: dtype, solid
    bf16, dashed fp32; marker: model shape (d, V)).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    passes = ["forward", "backward", "forward_backward"]
    label = lambda r: f"{r['impl']}[{r['backend']}]"  # noqa: E731
    impls = list(dict.fromkeys(label(r) for r in records))
    colours = {i: f"C{k}" for k, i in enumerate(impls)}
    fig, axes = plt.subplots(1, 4, figsize=(22, 5.5))
    sweep = max(Counter((r["pass"], label(r), r["dtype"], r["d"], r["V"]) for r in records).values()) > 2
    handles = [Patch(color=colours[i], label=i) for i in impls]
    if sweep:
        handles += _plot_lines(axes, passes, records, label, colours)
    else:
        _plot_bars(axes, passes, records, label, impls, colours)
    for ax, pass_ in zip(axes, passes, strict=False):
        ax.set(title=f"{pass_}: speed-up over hf_hook (> 1: faster)", ylabel="x hf_hook", yscale="log")
        ax.axhline(1.0, color="grey", linewidth=0.8)

    fwd = [r for r in records if r["pass"] == "forward"]
    worst = [max(r["peak_bytes"] / r["output_bytes"] for r in fwd if label(r) == i) for i in impls]
    axes[3].bar(range(len(impls)), worst, color=[colours[i] for i in impls])
    axes[3].set_xticks(range(len(impls)), impls, rotation=30, ha="right", fontsize=8)
    axes[3].set(title="forward peak memory (worst shape)", ylabel="peak bytes / output bytes")
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=9, frameon=False)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_bars(axes, passes, records, label, impls, colours) -> None:
    groups = list(dict.fromkeys((tuple(r["shape"]), r["dtype"]) for r in records))
    width = 0.8 / len(impls)
    for ax, pass_ in zip(axes, passes, strict=False):
        for k, impl in enumerate(impls):
            speed = {(tuple(r["shape"]), r["dtype"]): r["speedup_vs_hf_hook"] for r in records
                     if r["pass"] == pass_ and label(r) == impl}
            xs = [g + (k - (len(impls) - 1) / 2) * width for g in range(len(groups))]
            ax.bar(xs, [speed.get(g, float("nan")) for g in groups], width, color=colours[impl])
        ax.set_xticks(range(len(groups)), [f"{','.join(map(str, s))}\n{d}" for s, d in groups], fontsize=8)
        ax.set_xlabel("B,L,d,V and dtype")


def _plot_lines(axes, passes, records, label, colours) -> list:
    from matplotlib.lines import Line2D

    models = list(dict.fromkeys((r["d"], r["V"]) for r in records))
    markers = {m: "os^Dv"[k % 5] for k, m in enumerate(models)}
    styles: dict[str, LineStyleType] = {"bfloat16": "-", "float32": "--"}
    series: dict[tuple, list[tuple[int, float]]] = {}
    for r in records:
        series.setdefault((r["pass"], label(r), r["dtype"], (r["d"], r["V"])), []).append(
            (r["tokens"], r["speedup_vs_hf_hook"]))
    for (pass_, impl, dtype, model), points in series.items():
        xs, ys = zip(*sorted(points), strict=True)
        axes[passes.index(pass_)].plot(xs, ys, color=colours[impl], linestyle=styles.get(dtype, ":"),
                                       marker=markers[model])
    for ax in axes[:3]:
        ax.set(xlabel="tokens per batch", xscale="log")
    return ([Line2D([], [], color="k", linestyle=v, label=k) for k, v in styles.items()]
            + [Line2D([], [], color="k", marker=markers[m], linestyle="", label=f"d={m[0]} V={m[1]}")
               for m in models])
