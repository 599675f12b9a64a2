"""Timing, peak memory and the bytes each pass must move.

Timing interleaves the implementations rep by rep, so that drift in clocks or load spreads over all
of them; each sample times ``inner`` calls (CUDA events on GPU, ``perf_counter`` on CPU).

Peak memory is what one call allocates beyond what existed before it: on CUDA
``torch.cuda.max_memory_allocated``; on CPU the peak of the running sum of every allocation and free
that PyTorch's CPU allocator reports to the profiler (``profile_memory=True``) during the call,
which covers eager ops, Triton launchers and inductor-generated code alike.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import statistics
import time
from typing import Callable, Hashable, Mapping, TypeVar

import torch
from torch.profiler import ProfilerActivity, profile


def syncer(device: torch.device) -> Callable[[], None]:
    """What waits for the device's queued work: ``torch.cuda.synchronize`` on a GPU, nothing on a CPU."""
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


@contextlib.contextmanager
def _quiet_stderr():
    """Kineto announces every profiler start/stop on fd 2; keep the progress bar readable."""
    saved = os.dup(2)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def peak_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Bytes allocated at the peak of one call of ``fn`` beyond those live before it."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        result = fn()
        torch.cuda.synchronize()
        del result
        return torch.cuda.max_memory_allocated() - base
    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
        del result
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    return max([0, *itertools.accumulate(e.nbytes() for e in events)])


_Key = TypeVar("_Key", bound=Hashable)


def interleaved_times(fns: Mapping[_Key, Callable[[], object]], device: torch.device, reps: int,
                      inner: int, warmup: int = 2) -> dict[_Key, list[float]]:
    """Seconds per call: ``reps`` samples of each function, taken in turn."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples: dict[_Key, list[float]] = {name: [] for name in fns}
    sync = syncer(device)
    for _ in range(reps):
        for name, fn in fns.items():
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(inner):
                    fn()
                end.record()
                end.synchronize()
                samples[name].append(start.elapsed_time(end) / 1e3 / inner)
            else:
                sync()
                t0 = time.perf_counter()
                for _ in range(inner):
                    fn()
                samples[name].append((time.perf_counter() - t0) / inner)
    return samples


def host_us(fn: Callable[[], object], device: torch.device, calls: int = 20) -> float:
    """Microseconds of host time per call with nothing waited for (Python, checks and launches).

    On a GPU, where this exceeds the kernel time a call is bound by the host: the GPU idles between
    kernels unless the caller queues other work. On a CPU it is the whole call.
    """
    sync = syncer(device)
    sync()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - t0
    sync()
    return elapsed / calls * 1e6


def graph_ms(fn: Callable[[], object], reps: int = 20, inner: int = 10) -> float | None:
    """GPU time alone: milliseconds per call when ``inner`` calls captured in a CUDA graph are replayed
    (no host cost at all). None where ``fn`` cannot be captured."""
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(inner):
                fn()
    except Exception:  # a peer that syncs or allocates on the host cannot be captured
        torch.cuda.synchronize()
        return None
    graph.replay()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / inner)
    return statistics.median(times)


def spread(values: list[float]) -> tuple[float, float]:
    """The 20th and 80th percentiles (the value itself for one)."""
    q = statistics.quantiles(values, n=5) if len(values) > 1 else [values[0]] * 4
    return q[0], q[-1]


def summary(samples: list[float]) -> dict[str, float]:
    """Median and spread (20th-80th percentile) in milliseconds."""
    ms = [s * 1e3 for s in samples]
    p20, p80 = spread(ms)
    return {"median_ms": statistics.median(ms), "p20_ms": p20, "p80_ms": p80, "samples": len(ms)}


def copy_bandwidth(device: torch.device, reps: int) -> float:
    """This machine's device-memory copy bandwidth in GB/s (read + write counted), over a copy of
    1 GiB on a GPU, 256 MiB on a CPU."""
    nbytes = (1 << 30) if device.type == "cuda" else (1 << 28)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    times = interleaved_times({"copy": lambda: dst.copy_(src)}, device, reps=reps, inner=2)["copy"]
    return 2 * nbytes / statistics.median(times) / 1e9


def bytes_moved(pass_: str, tokens: int, d: int, vocab: int, elem: int) -> int:
    """Bytes a pass must move at the least.

    forward: read ids and the looked-up rows, write the output (+4 B/token of scale).
    backward: read the output gradient and ids, write the dense (V, d) weight gradient.
    """
    forward = tokens * (8 + 4) + 2 * tokens * d * elem
    backward = tokens * 8 + tokens * d * elem + vocab * d * elem
    return {"forward": forward, "backward": backward, "forward_backward": forward + backward}[pass_]
