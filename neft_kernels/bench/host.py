"""Host time per eager forward call at a tiny shape, where nothing but the per-call cost counts.

Each call's side inputs in turn (a mask, packed ``position_ids``, both, ``cu_seqlens``), the
module in train mode, against ``F.embedding`` and transformers' hook; interleaved, median of
``reps`` samples of ``calls`` back-to-back calls (nothing waited for on a GPU).
"""

from __future__ import annotations

import statistics
from types import ModuleType
from typing import cast

import torch
import torch.nn.functional as F

from ..module import NoisyEmbedding
from ..ops import noisy_embedding
from . import measure
from .impls import ALPHA, hf_hook


def _inputs(device: torch.device, shape: tuple[int, int, int, int]):
    """A weight requiring grad, ids and a mask with half of the first row padded."""
    b, length, d, vocab = shape
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(vocab, d, generator=gen).to(device).requires_grad_()
    ids = torch.randint(0, vocab, (b, length), generator=gen).to(device)
    mask = torch.ones(b, length, dtype=torch.long, device=device)
    mask[0, length // 2:] = 0
    return weight, ids, mask


def _median_host_us(fns: dict, device: torch.device, reps: int, calls: int) -> dict[str, float]:
    """Each call's median host us over ``reps`` samples of ``calls`` calls, samples interleaved."""
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():  # warm-up: compiles, allocations, the id flag
        for _ in range(5):
            fn()
    for _ in range(reps):
        for name, fn in fns.items():
            samples[name].append(measure.host_us(fn, device, calls))
    return {name: statistics.median(s) for name, s in samples.items()}


def run(device: torch.device, shape: tuple[int, int, int, int], reps: int = 15, calls: int = 300) -> list[dict]:
    b, length, d, vocab = shape
    weight, ids, mask = _inputs(device, shape)
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
    medians = _median_host_us(fns, device, reps, calls)
    return [{"kind": "host", "call": name, "device": device.type, "shape": list(shape),
             "host_us": us, "vs_f_embedding": us / medians["F.embedding"]} for name, us in medians.items()]


def table(records: list[dict]) -> str:
    lines = [f"{'call':<40} {'host us':>8} {'x F.embedding':>14}"]
    lines += [f"{r['call']:<40} {r['host_us']:>8.1f} {r['vs_f_embedding']:>14.2f}" for r in records]
    return "\n".join(lines)


def breakdown(device: torch.device, shape: tuple[int, int, int, int], reps: int = 9,
              calls: int = 300) -> list[dict]:
    """Host microseconds of each piece of an eager call with a mask, timed alone (median of ``reps``
    samples of ``calls`` back-to-back calls): where :func:`run`'s figures go. On a GPU: the Triton
    launches (scales, rows), the C++ launch, the sync-free id check's steps, the autograd
    Function's entry, an allocation; on a CPU: the checks, the one C++ call, the seed draw."""
    from .. import validation
    from ..backends import SEED_HIGH, SEED_LOW, available_backends, draw_seed, module, resolve
    from ..compat import function_c_apply
    from ..id_check import device_id_flag

    b, length, d, vocab = shape
    weight, ids, mask = _inputs(device, shape)
    emb = NoisyEmbedding(vocab, d, device=device, noise_alpha=ALPHA).train()

    class _Nothing(torch.autograd.Function):
        @staticmethod
        def forward(ctx, w):
            return w

        @staticmethod
        def backward(ctx, grad):
            return grad

    nothing = function_c_apply(_Nothing)
    fns = {
        "F.embedding": lambda: F.embedding(ids, weight),
        f"noisy_embedding (auto: {resolve('auto', device)})": lambda: noisy_embedding(
            ids, weight, ALPHA, seed=1, attention_mask=mask),
        "NoisyEmbedding (train)": lambda: emb(ids, attention_mask=mask),
        "checks + backend resolution": lambda: (  # a tuple: both calls in one lambda
            validation.check_call(ids, weight, 0, mask, None, None, None),  # type: ignore[func-returns-value]
            resolve("auto", device)),
        "seed: draw_seed": draw_seed,
        "seed: torch.randint().item()": lambda: torch.randint(SEED_LOW, SEED_HIGH, (), dtype=torch.int64).item(),
        "torch.empty (output)": lambda: torch.empty(b, length, d, device=device),
        "autograd.Function entry (C), no work": lambda: nothing(weight),
    }
    if device.type == "cpu" and "cpu" in available_backends("cpu"):
        cpu = cast(ModuleType, module("cpu"))  # the extension's own functions, beyond Backend
        fns["cpu: forward_with_grad (C++)"] = lambda: cpu.forward_with_grad(
            ids, weight, 1, 0, None, ALPHA, length, mask, None, None, None, False, None, False, None)
    plain = weight.detach()  # the kernels alone, outside autograd
    if device.type == "cuda" and "triton" in available_backends("cuda") and resolve("auto", device) != "triton":
        fns["noisy_embedding (triton)"] = lambda: noisy_embedding(ids, weight, ALPHA, seed=1, attention_mask=mask,
                                                                  backend="triton")
    if "triton" in available_backends(device.type):  # on a CPU: the interpreter (tests)
        triton_backend = cast(ModuleType, module("triton"))  # fused_forward too, beyond Backend
        fns["triton: token_scales (1 launch)"] = lambda: triton_backend.token_scales(
            length, ids.numel(), ALPHA, d, mask, None, None, None, device)
        fns["triton: fused_forward (1 launch)"] = lambda: triton_backend.fused_forward(ids, plain, 0.1, 1, 0)
        fns["triton: forward, mask (2 launches)"] = lambda: triton_backend.forward(
            ids, plain, 1, 0, None, ALPHA, length, mask, None, None, None, False)
    if device.type == "cuda":
        flag = device_id_flag(ids)
        if flag is not None:  # None with the check off (NEFT_KERNELS_CHECK_IDS=0)
            cuda_check = "word" if flag._word is not None else "copy"
            # Tuples: both calls in one lambda.
            fns[f"id check, cuda ({cuda_check})"] = lambda: (
                device_id_flag(ids), flag.after_launch("cuda"))  # type: ignore[func-returns-value]
            fns["id check, triton (copy)"] = lambda: (
                device_id_flag(ids), flag.read_back())  # type: ignore[func-returns-value]

        def device_guard():
            with torch.cuda.device(device):
                pass

        fns["torch.cuda.device(...) enter/exit"] = device_guard
        if "cuda" in available_backends("cuda"):
            from .. import _C_cuda  # type: ignore[attr-defined]  # a compiled extension: mypy reads no .so

            fns["cuda: _C_cuda.forward (1 launch)"] = lambda: _C_cuda.forward(
                ids, plain, 1, 0, 0.1, False, 0.0, None, length, None, None, None, None, None, None, False)
            fns["cuda: _C_cuda.forward, mask (2 launches)"] = lambda: _C_cuda.forward(
                ids, plain, 1, 0, 0.0, True, ALPHA, None, length, mask, None, None, None, None, None, False)
            fns["cuda: forward_with_grad, mask (C++ node)"] = lambda: _C_cuda.forward_with_grad(
                ids, weight, 1, 0, None, ALPHA, length, mask, None, None, None, False, None, False, None)
    return [{"kind": "host_breakdown", "call": name, "device": device.type, "shape": list(shape), "host_us": us}
            for name, us in _median_host_us(fns, device, reps, calls).items()]


def breakdown_table(records: list[dict]) -> str:
    lines = [f"{'piece of an eager call':<44} {'host us':>8}"]
    lines += [f"{r['call']:<44} {r['host_us']:>8.1f}" for r in records]
    return "\n".join(lines)
