"""The benchmark's cases, shared by ``python -m neft_kernels.bench`` and the pytest-benchmark suite
(``benchmarks/``): the shapes, the passes and what each pass times, and the compile settings.
Importing it changes nothing; :func:`compile_settings` scopes the one global setting a run needs."""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch

from .impls import Impl

PASSES = ("forward", "backward", "forward_backward")
MODELS = {"llama2-7b": (4096, 32000), "llama3-8b": (4096, 128256), "small": (1024, 32000)}


# Tiny shapes, where only the per-call host cost counts (the CPU host-time goal's shape).
HOST_SHAPE = (2, 16, 64, 1000)


def shapes(device: torch.device, quick: bool) -> list[tuple[int, int, int, int]]:
    """(B, L, d, V) to run: GPU 2k-16k tokens per batch; CPU fewer (the reference is slow)."""
    if device.type == "cuda":
        if quick:
            return [(8, 1024, 4096, 32000)]
        return [(b, 1024, d, v) for d, v in MODELS.values() for b in (2, 4, 8, 16)]
    if quick:
        return [HOST_SHAPE, (2, 512, 1024, 32000)]
    return [HOST_SHAPE, (1, 512, 4096, 32000), (4, 512, 4096, 32000), (4, 512, 4096, 128256),
            (1, 512, 1024, 32000), (8, 512, 1024, 32000)]


def train_configs(device: torch.device, quick: bool) -> list[tuple[str, torch.dtype, int, int, int, int]]:
    """(model, dtype, B, L, steps per round, rounds) of the training-step benchmark."""
    if device.type == "cuda":
        runs = [("smollm2-135m", torch.bfloat16, 8, 2048, 3, 9)]
        return runs if quick else runs + [("llama-3.2-1b", torch.bfloat16, 4, 2048, 3, 9)]
    return [("tiny-llama", torch.float32, 4, 128, 2, 5 if quick else 9)]


def pass_fn(pass_: str, fn, ids, weight, mask, grad_out) -> Callable[[], object]:
    """One call of ``pass_`` through ``fn(ids, weight, mask)``: the forward, the backward of a kept graph,
    or both. ``mask`` is passed through as is (the model table passes its side-input kwargs there)."""
    if pass_ == "forward":
        return lambda: fn(ids, weight, mask)
    if pass_ == "backward":
        out = fn(ids, weight, mask)
        return lambda: torch.autograd.grad(out, weight, grad_out, retain_graph=True)
    return lambda: torch.autograd.grad(fn(ids, weight, mask), weight, grad_out)


def pass_callables(impls: list[Impl], pass_: str, batch) -> dict[Impl, Callable[[], object]]:
    """Each implementation's call of ``pass_`` on ``batch`` (``impls.inputs``'s tuple)."""
    ids, weight, mask, grad_out = batch
    return {i: pass_fn(pass_, i.fn, ids, weight, mask, grad_out) for i in impls}


@contextlib.contextmanager
def compile_settings() -> Iterator[None]:
    """One compiled graph per (shape, dtype, pass) for the compiled peers: never fall back to eager
    silently (dynamo's default recompile limit would, after 8 shapes)."""
    import torch._dynamo

    with torch._dynamo.config.patch(recompile_limit=1024, fail_on_recompile_limit_hit=True):
        yield
