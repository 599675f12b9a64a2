"""pytest-benchmark suite for regression tracking, on the CLI's implementations and inputs (not part
of the default test run):

    python -m pytest benchmarks/ --benchmark-autosave       # then --benchmark-compare
"""

import pytest
import torch

from neft_kernels.bench.impls import implementations, inputs, neft_backends

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SHAPE = (8, 1024, 4096, 32000) if DEVICE.type == "cuda" else (2, 512, 1024, 32000)
NAMES = [("embedding", "eager"), ("hf_hook", "eager"), ("hf_hook_compiled", "inductor"),
         ("rand_like_compiled", "inductor")] + [("neft", b) for b in neft_backends(DEVICE)]


@pytest.fixture(scope="module")
def impls():
    return {(i.name, i.backend): i.fn for i in implementations(DEVICE)}


@pytest.fixture(scope="module", params=[torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def case(request):
    return inputs(*SHAPE, request.param, DEVICE)


def _sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("name", NAMES, ids=[f"{n}[{b}]" for n, b in NAMES])
def test_forward(benchmark, impls, name, case):
    ids, weight, mask, _ = case
    fn = impls[name]
    benchmark(lambda: (fn(ids, weight, mask), _sync()))


@pytest.mark.parametrize("name", NAMES, ids=[f"{n}[{b}]" for n, b in NAMES])
def test_forward_backward(benchmark, impls, name, case):
    ids, weight, mask, grad_out = case
    fn = impls[name]
    benchmark(lambda: (torch.autograd.grad(fn(ids, weight, mask), weight, grad_out), _sync()))
