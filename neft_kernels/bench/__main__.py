"""``python -m neft_kernels.bench``: NEFTune forward/backward against the hook, compiled peers and
plain embedding, side by side in one run, on the best device present; then whole training steps.

Per op: the eager back-to-back time per call (median and spread), host time per call, GPU time
alone (CUDA-graph replay, forward, GPU only), peak memory, achieved GB/s against the bytes each
pass must move, and that as a percentage of this machine's copy bandwidth measured in the same run.
Per training step (Llama-shaped model, AdamW): step time and peak memory with no noise,
transformers' hook and ``patch_model``. The default run is short; ``--full`` is the whole sweep.
"""

from __future__ import annotations

import argparse
import datetime
import platform
from pathlib import Path

import torch
from tqdm import tqdm

from .. import backends
from . import host, measure, models, report, train_step
from .harness import HOST_SHAPE, PASSES, compile_settings, pass_callables, shapes, train_configs
from .impls import implementations, inputs


def _philox_floors(device: torch.device, shape_list, reps: int) -> dict[tuple, float]:
    """CPU only: median ms of the bare vectorised Philox stream for each shape's B*L*d noise values,
    written into a buffer allocated once."""
    try:
        from .._C_cpu import philox_words
    except ImportError:
        return {}
    if device.type != "cpu":
        return {}
    buffers = {s: torch.empty(-(-s[0] * s[1] * s[2] // 4), 4, dtype=torch.int32) for s in shape_list}
    fns = {s: (lambda out=buf: philox_words(out, 1, 0)) for s, buf in buffers.items()}
    return {s: measure.summary(t)["median_ms"] for s, t in measure.interleaved_times(fns, device, reps, 1).items()}


def _cpu_isa() -> str | None:
    """The instruction set the C++ CPU kernels use here (their figures depend on it), if built."""
    try:
        from .._C_cpu import cpu_isa
    except ImportError:
        return None
    return cpu_isa()


def _shape(text: str) -> tuple[int, int, int, int]:
    try:
        values = tuple(int(x) for x in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 4 or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected B,L,d,V (four positive integers), got {text!r}")
    return values


def run(device: torch.device, dtypes: list[torch.dtype], quick: bool, backend_names: list[str] | None = None,
        progress: bool = True, only_shapes: list[tuple[int, int, int, int]] | None = None) -> list[dict]:
    """Every (shape, dtype, pass, implementation) record, against the copy bandwidth of this run."""
    on_gpu = device.type == "cuda"
    reps, inner = (30, 10) if on_gpu else ((7, 1) if quick else (10, 1))
    first_copy_gbps = measure.copy_bandwidth(device, reps=reps)
    impls = implementations(device, backend_names)
    meta = {"device": device.type, "torch": torch.__version__, "date": datetime.date.today().isoformat(),
            "device_name": (torch.cuda.get_device_name(device) if on_gpu
                            else platform.processor() or platform.machine()),
            "threads": torch.get_num_threads(), **({"cpu_isa": _cpu_isa()} if not on_gpu else {})}
    shape_list = only_shapes or shapes(device, quick)
    floors = _philox_floors(device, shape_list, reps)
    records = []
    configs = [(s, dt, p) for s in shape_list for dt in dtypes for p in PASSES]
    batch_key = None  # the first config makes its batch
    for (b, length, d, vocab), dtype, pass_ in tqdm(configs, desc="neft bench", disable=not progress):
        if batch_key != ((b, length, d, vocab), dtype):  # configs come grouped by shape and dtype
            batch_key, batch = ((b, length, d, vocab), dtype), inputs(b, length, d, vocab, dtype, device)
        fns = pass_callables(impls, pass_, batch)
        times = measure.interleaved_times(fns, device, reps=reps, inner=inner)
        elem = batch[1].element_size()
        moved = measure.bytes_moved(pass_, b * length, d, vocab, elem)
        rows = []
        for impl, fn in fns.items():
            stats = measure.summary(times[impl])
            gbps = moved / (stats["median_ms"] / 1e3) / 1e9
            rows.append({"impl": impl.name, "backend": impl.backend, "pass": pass_, "shape": [b, length, d, vocab],
                         "B": b, "L": length, "d": d, "V": vocab, "tokens": b * length,
                         "dtype": str(dtype).removeprefix("torch."), **stats,
                         "peak_bytes": measure.peak_bytes(fn, device), "output_bytes": b * length * d * elem,
                         "bytes_moved": moved, "gbps": gbps, **meta})
            rows[-1]["host_us"] = measure.host_us(fn, device)
            if device.type == "cuda" and pass_ == "forward":
                rows[-1]["graph_ms"] = measure.graph_ms(fn)
            if (b, length, d, vocab) in floors:
                rows[-1]["philox_floor_ms"] = floors[b, length, d, vocab]
        hook_ms = next(r["median_ms"] for r in rows if r["impl"] == "hf_hook")
        for r in rows:
            r["speedup_vs_hf_hook"] = hook_ms / r["median_ms"]
        records += rows
    # Load from elsewhere can only lower a bandwidth: keep the better of a first and a last reading
    # (both recorded: far apart, the machine was busy and every figure of the run is noisy).
    last_copy_gbps = measure.copy_bandwidth(device, reps=reps)
    copy_gbps = max(first_copy_gbps, last_copy_gbps)
    for r in records:
        r.update(copy_gbps=copy_gbps, copy_gbps_first=first_copy_gbps, copy_gbps_last=last_copy_gbps)
        r["pct_of_copy_bw"] = 100 * r["gbps"] / copy_gbps
    return records


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(prog="python -m neft_kernels.bench", description=__doc__,
                                     epilog=report.COLUMNS_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"],
                        help="default: cuda if present")
    parser.add_argument("--dtype", action="append", choices=["float32", "bfloat16"],
                        help="repeatable; default both")
    parser.add_argument("--backend", action="append", choices=["triton", "cuda", "cpu", "torch"],
                        help="neft backends to time, repeatable (default: the device's fused ones; torch is the "
                             "pure-PyTorch reference)")
    parser.add_argument("--full", action="store_true",
                        help="every shape and both training-step models (default: a short run, about a minute "
                             "on 2 CPU cores)")
    parser.add_argument("--no-train", action="store_true", help="skip the training-step benchmark")
    parser.add_argument("--models", nargs="*", choices=list(models.MODEL_SHAPES), metavar="MODEL",
                        help="the model-shape table (real models' width and vocabulary, a padded batch and a "
                             "packed row), for the named models or, with no name, all of: "
                             + ", ".join(models.MODEL_SHAPES) + " (default: with --full on a GPU)")
    parser.add_argument("--shape", action="append", metavar="B,L,d,V",
                        type=_shape,
                        help="repeatable; replaces the default shapes")
    parser.add_argument("--json", type=Path, help="write the records (and -host / -train-step files beside it)")
    parser.add_argument("--csv", type=Path, help="write the op records as CSV")
    parser.add_argument("--plot", type=Path, help="a PNG of speed-up and memory (needs matplotlib)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.plot:  # fail before the run, not after it
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            parser.error("--plot needs matplotlib: pip install 'neft_kernels[bench]'")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device cuda: torch {torch.__version__} sees no CUDA GPU here")
    for name in args.backend or ():
        reason = backends.why_unavailable(name, device)
        if reason is not None:
            parser.error(f"--backend {name} cannot run on {device.type} here: {reason}")
    dtypes = [getattr(torch, name) for name in (args.dtype or ["float32", "bfloat16"])]
    quick = not args.full
    with compile_settings():
        records = run(device, dtypes, quick, args.backend, progress=not args.no_progress, only_shapes=args.shape)
    first = records[0]
    threads = f"{first['threads']} thread{'s' if first['threads'] != 1 else ''}"
    isa = f", CPU kernels: {first['cpu_isa']}" if first.get("cpu_isa") else ""
    print(f"\n{first['device_name']} ({first['device']}, {threads}{isa}), torch {first['torch']}, "
          f"{first['date']}; copy bandwidth {first['copy_gbps']:.1f} GB/s")
    if min(first["copy_gbps_first"], first["copy_gbps_last"]) < 0.8 * first["copy_gbps"]:
        print(f"warning: copy bandwidth read {first['copy_gbps_first']:.1f} GB/s before the run and "
              f"{first['copy_gbps_last']:.1f} after it: other work is using this machine, every figure is noisy")
    print(report.table(records))
    print("(columns: python -m neft_kernels.bench --help)")
    for r in records:
        if r["pass"] == "forward" and r["impl"] == "neft" and "philox_floor_ms" in r:
            print(f"neft[{r['backend']}] forward {r['B']},{r['L']},{r['d']},{r['V']} {r['dtype']}: "
                  f"{r['median_ms'] / r['philox_floor_ms']:.2f}x the bare Philox stream "
                  f"({r['philox_floor_ms'] * 1e6 / (r['tokens'] * r['d']):.3f} ns/element)")
    host_records = host.run(device, HOST_SHAPE)
    print(f"\nHost time per eager forward call at B,L,d,V = {','.join(map(str, HOST_SHAPE))} "
          f"(weight requires grad):")
    print(host.table(host_records))
    model_records = []
    if args.models is not None or (args.full and device.type == "cuda"):
        with compile_settings():
            model_records = models.run(device, dtypes, args.backend, args.models or None,
                                       progress=not args.no_progress)
        print("\nModel shapes (" + models.TABLE_HELP + "):")
        print(models.table(model_records))
    steps = []
    if not args.no_train:
        for name, dtype, batch, length, per_round, rounds in train_configs(device, quick):
            steps += train_step.run(name, device, dtype, batch, length, per_round, rounds)
        print("\nTraining steps (forward, backward, AdamW), variants interleaved:")
        print(train_step.table(steps))
    written = []
    for path, write in ((args.json, report.write_json), (args.csv, report.write_csv), (args.plot, report.plot)):
        if path:
            path.parent.mkdir(parents=True, exist_ok=True)
            write(records, path)
            written.append(path)
    if args.json:
        for suffix, extra in (("-host", host_records), ("-train-step", steps), ("-models", model_records)):
            if extra:
                written.append(args.json.with_name(args.json.stem + suffix + ".json"))
                report.write_json(extra, written[-1])
    print("\nwritten: " + ", ".join(map(str, written)) if written
          else "\nnothing saved (--json PATH, --csv PATH and --plot PATH write the results)")
    return records + host_records + model_records + steps


if __name__ == "__main__":
    main()
