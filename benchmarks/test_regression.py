"""pytest-benchmark suite for regression tracking, on the CLI's cases (``neft_kernels.bench.harness``):
the same implementations, inputs and passes at the quick run's largest shape. Not part of the
default test run:

    python -m pytest benchmarks/ --benchmark-autosave       # then --benchmark-compare
"""

import pytest
import torch

from neft_kernels.bench.harness import PASSES, compile_settings, pass_callables, shapes
from neft_kernels.bench.impls import implementations, inputs, neft_backends

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="module")
def impls():
    with compile_settings():
        yield {f"{i.name}[{i.backend}]": i for i in implementations(DEVICE)}


@pytest.fixture(scope="module", params=[torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def batch(request):
    return inputs(*shapes(DEVICE, quick=True)[-1], request.param, DEVICE)


def _synced(fn):
    if DEVICE.type != "cuda":
        return fn
    return lambda: (fn(), torch.cuda.synchronize())


IMPLS = ["embedding[eager]", "hf_hook[eager]", "hf_hook_compiled[inductor]", "rand_like_compiled[inductor]"] + [
    f"neft[{b}]" for b in neft_backends(DEVICE)]


@pytest.mark.parametrize("pass_", PASSES)
@pytest.mark.parametrize("impl", IMPLS)
def test_pass(benchmark, impls, batch, impl, pass_):
    benchmark.group = pass_
    with compile_settings():
        (fn,) = pass_callables([impls[impl]], pass_, batch).values()
        benchmark(_synced(fn))
