"""Benchmark output: the stdout table, JSON, CSV and the plot."""

from __future__ import annotations

import csv
import json
from pathlib import Path

_COLUMNS = [("impl", "{:<18}"), ("backend", "{:<8}"), ("pass", "{:<16}"), ("shape", "{:<22}"),
            ("dtype", "{:<8}"), ("median_ms", "{:>9.3f}"), ("spread_ms", "{:>15}"), ("peak_MiB", "{:>9.1f}"),
            ("gbps", "{:>7.1f}"), ("pct_of_copy_bw", "{:>6.1f}"), ("vs_hf_hook", "{:>7.2f}")]
_HEADERS = ["impl", "backend", "pass", "B,L,d,V", "dtype", "median ms", "p20-p80 ms", "peak MiB", "GB/s",
            "%copy", "x hook"]


def _row(r: dict) -> dict:
    return {**r, "shape": ",".join(map(str, r["shape"])), "spread_ms": f"{r['p20_ms']:.3f}-{r['p80_ms']:.3f}",
            "peak_MiB": r["peak_bytes"] / 2**20, "vs_hf_hook": r["speedup_vs_hf_hook"]}


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
    """Speed-up over the hook against tokens per batch (one panel per pass), and forward memory."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    passes = ["forward", "backward", "forward_backward"]
    fig, axes = plt.subplots(1, 4, figsize=(22, 5))
    series: dict[tuple, list[tuple[int, float]]] = {}
    for r in records:
        key = (r["pass"], f"{r['impl']}[{r['backend']}]", r["dtype"], r["d"], r["V"])
        series.setdefault(key, []).append((r["tokens"], r["speedup_vs_hf_hook"]))
    for (pass_, impl, dtype, d, vocab), points in sorted(series.items()):
        ax = axes[passes.index(pass_)]
        xs, ys = zip(*sorted(points))
        ax.plot(xs, ys, marker="o", linestyle="-" if dtype == "bfloat16" else "--",
                label=f"{impl} {dtype} d={d} V={vocab}")
    for ax, pass_ in zip(axes, passes):
        ax.set(title=f"{pass_}: speed-up over hf_hook", xlabel="tokens per batch", ylabel="x hf_hook", xscale="log")
        ax.axhline(1.0, color="grey", linewidth=0.8)
    axes[0].legend(fontsize=6)

    fwd = [r for r in records if r["pass"] == "forward"]
    impls = sorted({f"{r['impl']}[{r['backend']}]" for r in fwd})
    ratio = {i: [r["peak_bytes"] / r["output_bytes"] for r in fwd if f"{r['impl']}[{r['backend']}]" == i]
             for i in impls}
    axes[3].bar(impls, [max(ratio[i]) for i in impls])
    axes[3].set(title="forward peak memory (max over shapes)", ylabel="peak bytes / output bytes")
    axes[3].tick_params(axis="x", rotation=30, labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
