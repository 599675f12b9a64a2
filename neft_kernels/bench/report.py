"""Benchmark output: the stdout table, JSON, CSV and the plot."""

from __future__ import annotations

import csv
import json
from pathlib import Path

_COLUMNS = [("impl", "{:<18}"), ("backend", "{:<8}"), ("pass", "{:<16}"), ("shape", "{:<22}"),
            ("dtype", "{:<8}"), ("median_ms", "{:>9.3f}"), ("spread_ms", "{:>15}"), ("peak_MiB", "{:>9.1f}"),
            ("gbps", "{:>7.1f}"), ("pct_of_copy_bw", "{:>6.1f}"), ("vs_hf_hook", "{:>7.2f}"),
            ("host", "{:>7}"), ("graph", "{:>8}")]
_HEADERS = ["impl", "backend", "pass", "B,L,d,V", "dtype", "median ms", "p20-p80 ms", "peak MiB", "GB/s",
            "%copy", "x hook", "host us", "graph ms"]


def _row(r: dict) -> dict:
    return {**r, "shape": ",".join(map(str, r["shape"])), "spread_ms": f"{r['p20_ms']:.3f}-{r['p80_ms']:.3f}",
            "peak_MiB": r["peak_bytes"] / 2**20, "vs_hf_hook": r["speedup_vs_hf_hook"],
            "host": f"{r['host_us']:.1f}" if "host_us" in r else "-",
            "graph": f"{r['graph_ms']:.4f}" if r.get("graph_ms") is not None else "-"}


def table(records: list[dict]) -> str:
    """The records as a fixed-width text table (also used, as is, in the README)."""
    widths = [len(fmt.format(*([0.0] if "f}" in fmt else [""]))) for _, fmt in _COLUMNS]
    lines = [" ".join(h.rjust(w) if "{:>" in fmt else h.ljust(w)
                      for h, w, (_, fmt) in zip(_HEADERS, widths, _COLUMNS))]
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
    """Speed-up over the hook against tokens per batch (one panel per pass), and forward memory.

    Colour: implementation; line: dtype (solid bf16, dashed fp32); marker: model shape (d, V).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    passes = ["forward", "backward", "forward_backward"]
    label = lambda r: f"{r['impl']}[{r['backend']}]"  # noqa: E731
    impls = list(dict.fromkeys(label(r) for r in records))
    models = list(dict.fromkeys((r["d"], r["V"]) for r in records))
    colours = {i: f"C{k}" for k, i in enumerate(impls)}
    markers = {m: "os^Dv"[k % 5] for k, m in enumerate(models)}
    styles = {"bfloat16": "-", "float32": "--"}

    fig, axes = plt.subplots(1, 4, figsize=(22, 5.5))
    series: dict[tuple, list[tuple[int, float]]] = {}
    for r in records:
        series.setdefault((r["pass"], label(r), r["dtype"], (r["d"], r["V"])), []).append(
            (r["tokens"], r["speedup_vs_hf_hook"]))
    for (pass_, impl, dtype, model), points in series.items():
        xs, ys = zip(*sorted(points))
        axes[passes.index(pass_)].plot(xs, ys, color=colours[impl], linestyle=styles.get(dtype, ":"),
                                       marker=markers[model])
    for ax, pass_ in zip(axes, passes):
        ax.set(title=f"{pass_}: speed-up over hf_hook", xlabel="tokens per batch", ylabel="x hf_hook",
               xscale="log", yscale="log")
        ax.axhline(1.0, color="grey", linewidth=0.8)

    fwd = [r for r in records if r["pass"] == "forward"]
    worst = [max(r["peak_bytes"] / r["output_bytes"] for r in fwd if label(r) == i) for i in impls]
    axes[3].bar(range(len(impls)), worst, color=[colours[i] for i in impls])
    axes[3].set_xticks(range(len(impls)), impls, rotation=30, fontsize=7)
    axes[3].set(title="forward peak memory (worst shape)", ylabel="peak bytes / output bytes")

    handles = [Line2D([], [], color=colours[i], label=i) for i in impls]
    handles += [Line2D([], [], color="k", linestyle=v, label=k) for k, v in styles.items()]
    handles += [Line2D([], [], color="k", marker=markers[m], linestyle="", label=f"d={m[0]} V={m[1]}")
                for m in models]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
