"""pytest-benchmark suite for regression tracking (not part of the default test run).

    python -m pytest benchmarks/ --benchmark-autosave       # then --benchmark-compare
"""

import pytest
import torch

from neft_kernels.bench.impls import implementations

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SHAPE = (8, 1024, 4096, 32000) if DEVICE.type == "cuda" else (2, 512, 1024, 32000)
IMPLS = implementations(DEVICE)


def _sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


@pytest.fixture(scope="module", params=[torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def inputs(request):
    b, length, d, vocab = SHAPE
    weight = torch.randn(vocab, d, device=DEVICE, dtype=request.param, requires_grad=True)
    ids = torch.randint(0, vocab, (b, length), device=DEVICE)
    mask = torch.ones(b, length, dtype=torch.long, device=DEVICE)
    grad_out = torch.randn(b, length, d, device=DEVICE, dtype=request.param)
    return ids, weight, mask, grad_out


@pytest.mark.parametrize("impl", IMPLS, ids=[f"{i.name}[{i.backend}]" for i in IMPLS])
def test_forward(benchmark, impl, inputs):
    ids, weight, mask, _ = inputs
    benchmark(lambda: (impl.fn(ids, weight, mask), _sync()))


@pytest.mark.parametrize("impl", IMPLS, ids=[f"{i.name}[{i.backend}]" for i in IMPLS])
def test_forward_backward(benchmark, impl, inputs):
    ids, weight, mask, grad_out = inputs
    benchmark(lambda: (torch.autograd.grad(impl.fn(ids, weight, mask), weight, grad_out), _sync()))
