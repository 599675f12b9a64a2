"""Every backend against the independent NumPy spec model, bit for bit: each dtype, embedding width,
kind of side input (attention_mask, packed position_ids, cu_seqlens), length mode and distribution,
with and without a noise_mask (``support.cases.spec_cases`` says which, per backend)."""

import pytest
import torch

from neft_kernels.backends import available_backends

from support.asserts import DTYPES
from support.backends import NAMES, backend_id, backend_marks, targets, why_not
from support.cases import check_matches_spec_model, spec_cases


def _params():
    for backend, device in targets():
        if why_not(backend, device):  # one skipped parameter that says why, not one per case
            yield pytest.param(backend, device, None, id=backend_id(backend, device),
                               marks=backend_marks(backend, device))
            continue
        for case in spec_cases(backend, device):
            yield pytest.param(backend, device, case, id=f"{backend_id(backend, device)}-{case.id}",
                               marks=backend_marks(backend, device))


@pytest.mark.parametrize("backend,device,case", list(_params()))
def test_backend_matches_the_spec_model(backend, device, case):
    check_matches_spec_model(backend, case.dtype, case.d, case.kind, case.length_mode, device,
                             distribution=case.distribution, with_noise_mask=case.noise_mask, few_seeds=case.few_seeds)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=backend_marks("triton", "cuda"))])
def test_auto_matches_the_spec_model(device):
    """``backend="auto"`` (the C++ CPU backend on CPU tensors, Triton on CUDA ones) with the Gaussian
    stream and with a noise_mask."""
    for dtype in DTYPES:
        for kind in ("none", "mask", "packed"):
            check_matches_spec_model("auto", dtype, 13, kind, "per_sequence", device, distribution="gaussian")
    for length_mode in ("per_sequence", "padded"):
        for kind in ("none", "mask", "cu_seqlens+mask"):
            check_matches_spec_model("auto", torch.float32, 5, kind, length_mode, device, with_noise_mask=True)


def test_every_backend_is_under_test():
    """A backend added to neft_kernels must be added to support.backends.NAMES (with its devices)."""
    assert set(available_backends()) <= set(NAMES)

