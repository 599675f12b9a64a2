"""The Triton kernels (interpreter on CPU, compiled on GPU) against the spec model, and AOT builds."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import triton
import triton.language as tl

from cases import DIMS, KINDS, LENGTH_MODES, check_matches_spec_model, expected, make_weight, side_inputs
from conftest import DEVICE, DTYPES, assert_bits_equal
from neft_kernels import noisy_embedding
from neft_kernels.backends import triton as triton_backend
from neft_kernels.lengths import token_scales

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", DIMS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("length_mode", LENGTH_MODES)
def test_triton_forward_matches_spec_model(dtype, d, kind, length_mode):
    check_matches_spec_model("triton", dtype, d, kind, length_mode, DEVICE)


@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_forward_wide_rows_many_tokens(dtype):
    """Several programs along both grid axes (d > the largest lane block), int32 ids."""
    weight = make_weight(300, 4099, dtype, DEVICE)
    ids = torch.randint(0, 300, (2, 9), dtype=torch.int32, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    mask, _ = side_inputs("mask", (2, 9), DEVICE)
    out = noisy_embedding(ids, weight, 15.0, seed=99, attention_mask=mask, backend="triton")
    assert_bits_equal(out, expected(ids.long(), weight, 15.0, 99, 0, mask, None, "per_sequence"))


def _masks(width: int):
    g = torch.Generator().manual_seed(width)
    rand = torch.randint(0, 2, (3, width), generator=g)
    rand[1] = 0  # a row with no real tokens
    left = (torch.arange(width) >= width // 3).long()[None]  # (1, L): broadcast to every row
    return [rand, rand.bool(), rand.int(), left.expand(3, width), rand.reshape(3, 1, width).expand(3, 2, width)]


@pytest.mark.parametrize("width", [1, 7, 1500])  # 1500: two passes of the 1024-wide block
def test_mask_scales_kernel_gives_token_scales_bits(width):
    for mask in _masks(width):
        mask = mask.to(DEVICE)
        for alpha, d in ((5.0, 4096), (3.4641022345673926, 16), (0.0, 7)):
            got = triton_backend.mask_scales(mask, alpha, d)
            want = token_scales(mask.shape, alpha, d, attention_mask=mask)
            assert_bits_equal(got, want)


@triton.jit
def _round_bf16_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < n)
    triton_backend._store_f32(out_ptr, offs, x, offs < n, IS_BF16=True)


def test_bf16_rounding_is_to_nearest_even():
    """The kernels' float32 -> bf16 store: ties to even, carries, overflow, subnormals, NaN."""
    special = torch.tensor([1.0 + 2**-8, 1.0 + 3 * 2**-8, -(1.0 + 2**-8), 3.3961e38, -3.3961e38, 1e-40,
                            -1e-45, 0.0, -0.0, float("inf"), float("-inf"), float("nan")])
    bits = torch.randint(-2**31, 2**31, (4096 - len(special),), generator=torch.Generator().manual_seed(0),
                         dtype=torch.int64).to(torch.int32).view(torch.float32)
    x = torch.cat([special, bits]).to(DEVICE)
    out = torch.empty(x.shape, dtype=torch.bfloat16, device=DEVICE)
    _round_bf16_kernel[(1,)](x, out.view(torch.int16), x.numel(), BLOCK=4096)
    assert_bits_equal(out, x.to(torch.bfloat16))


def test_triton_refuses_cpu_tensors_without_the_interpreter():
    code = ("import torch, neft_kernels; "
            "neft_kernels.noisy_embedding(torch.zeros(2, dtype=torch.long), torch.zeros(3, 4), 1.0, "
            "seed=0, backend='triton')")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT)
    if torch.cuda.is_available():
        pytest.skip("with a GPU present this path is exercised by the GPU tests")
    assert res.returncode != 0 and "TRITON_INTERPRET=1" in res.stderr


def test_kernels_compile_ahead_of_time_for_sm80_and_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT)
    res = subprocess.run([sys.executable, str(ROOT / "tools" / "aot_compile.py")],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert res.returncode == 0, res.stderr
    reports = [json.loads(line) for line in res.stdout.splitlines()]
    kernels = {(r["kernel"], r["variant"], r["arch"]) for r in reports}
    assert len(kernels) == len(reports) == 2 * 3 * 4  # archs x dtypes x (2 forward + 2 backward)
    assert {r["arch"] for r in reports} == {"sm_80", "sm_90"}
    for r in reports:
        assert 0 < r["registers"] <= 255, r
        assert r["spill_bytes"] == 0, r
        assert r["sass_ffma"] == 0 and r["ptx_ftz"] == 0, r  # spec v1: no FMA, no flush-to-zero
