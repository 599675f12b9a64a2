"""The Triton kernels (interpreter on CPU, compiled on GPU) beyond the spec-model grid
(tests/kernels/test_spec_equivalence.py): wide rows, the scales kernel, the id record, the device seed,
bf16 rounding, and the ahead-of-time builds for sm_80 and sm_90."""

import json
import os
import subprocess
import sys

import pytest
import torch
import triton
import triton.language as tl

from neft_kernels import noisy_embedding
from neft_kernels.backends import available_backends
from neft_kernels.backends import triton as triton_backend
from neft_kernels.lengths import token_scales

from support import ROOT
from support.asserts import DTYPES, assert_bits_equal
from support.backends import interpreted, on_backends, requires
from support.cases import expected, make_weight, scale_cases, side_inputs
from support.devices import DEVICE, HAS_CUDA


@requires("triton")
@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_forward_wide_rows_many_tokens(dtype):
    """Several programs along both grid axes (d > the largest lane block), int32 ids."""
    weight = make_weight(300, 4099, dtype, DEVICE)
    ids = torch.randint(0, 300, (2, 9), dtype=torch.int32, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    mask, _ = side_inputs("mask", (2, 9), DEVICE)
    out = noisy_embedding(ids, weight, 15.0, seed=99, attention_mask=mask, backend="triton")
    assert_bits_equal(out, expected(ids.long(), weight, 15.0, 99, 0, mask, None, "per_sequence"))


# Under the interpreter the long rows and the small blocks (every program walking across its
# neighbours) take 20 s to 2 min each: slow there, quick compiled.
_SLOW_HERE = [pytest.mark.slow] if interpreted("triton", DEVICE) else []


@requires("triton")
@pytest.mark.parametrize("width,block,walk", [(1, None, None), (7, None, None),
                                              pytest.param(1500, None, None, marks=_SLOW_HERE),
                                              pytest.param(7, 2, 2, marks=_SLOW_HERE),
                                              pytest.param(37, 4, 2, marks=_SLOW_HERE),
                                              pytest.param(37, 8, 16, marks=_SLOW_HERE)])
def test_token_scales_kernel_gives_reference_bits(width, block, walk, monkeypatch):
    """The one-launch scales kernel against the reference's tensor ops; small blocks make every
    program walk across its neighbours, as long packed rows do at full size."""
    # The scale's rounding, alpha 0 and a strided cu_seqlens are the same in every program: where
    # rows outgrow a block (the walks, slow under the interpreter) one alpha and dense entries suffice.
    alphas = ((5.0, 4096), (3.4641022345673926, 16), (0.0, 7))
    if block:
        monkeypatch.setattr(triton_backend, "_SCALES_BLOCK", block)
        monkeypatch.setattr(triton_backend, "_SCALES_WALK", walk)
    walks = width > triton_backend._SCALES_BLOCK
    if walks:
        alphas = alphas[:1]
    for mask, pos, cu in scale_cases(width):
        mask, pos, cu = (None if t is None else t.to(DEVICE) for t in (mask, pos, cu))
        for alpha, d in alphas:
            got = triton_backend.token_scales(width, 3 * width, alpha, d, mask, pos, cu)
            if cu is not None and not walks:  # a strided view of the same entries gives the same scales
                strided = torch.stack([cu, cu], 1).reshape(-1)[::2]
                assert_bits_equal(triton_backend.token_scales(width, 3 * width, alpha, d, mask, pos, strided), got)
            want = token_scales((3, width), alpha, d, attention_mask=mask, position_ids=pos, cu_seqlens=cu)
            assert_bits_equal(got, want)


@requires("triton")
def test_forward_kernel_records_out_of_range_ids():
    """What the GPU id check reads back: the (min, max) of the bad ids and V, folded into the buffer."""
    weight = make_weight(6, 9, torch.float32, DEVICE)
    flag = torch.tensor([2**63 - 1, -2**63, 0], device=DEVICE)
    ids = torch.tensor([2, 6, -1, 5, 9], device=DEVICE)
    out = triton_backend.fused_forward(ids, weight, 0.25, 3, 0, bad_ids=flag)
    assert flag.tolist() == [-1, 9, 6] and out[[1, 2, 4]].isnan().all()
    triton_backend.fused_forward(torch.tensor([0, -7], device=DEVICE), weight, 0.25, 3, 0, bad_ids=flag)
    assert flag.tolist() == [-7, 9, 6]
    triton_backend.fused_forward(torch.tensor([1, 2], device=DEVICE), weight, 0.25, 3, 0, bad_ids=flag)
    assert flag.tolist() == [-7, 9, 6]  # good ids record nothing


@requires("triton")
def test_device_seed_gives_the_seed_bits():
    """A seed the kernel reads from memory (graph-safe) is the same key as a host seed."""
    weight = make_weight(20, 13, torch.bfloat16, DEVICE)
    ids = torch.randint(0, 20, (9,)).to(DEVICE)
    host = triton_backend.fused_forward(ids, weight, 0.125, -12345, 7)
    device = triton_backend.fused_forward(ids, weight, 0.125, torch.tensor(-12345, device=DEVICE), 7)
    assert_bits_equal(device, host)


@triton.jit
def _round_bf16_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < n)
    triton_backend._store_f32(out_ptr, offs, x, offs < n, IS_BF16=True)


@requires("triton")
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


@pytest.mark.slow  # a fresh interpreter importing torch and triton
@pytest.mark.skipif(HAS_CUDA, reason="with a GPU present this path is exercised by the GPU tests")
def test_triton_refuses_cpu_tensors_without_the_interpreter():
    code = ("import torch, neft_kernels; "
            "neft_kernels.noisy_embedding(torch.zeros(2, dtype=torch.long), torch.zeros(3, 4), 1.0, "
            "seed=0, backend='triton')")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT)
    assert res.returncode != 0 and "TRITON_INTERPRET=1" in res.stderr


@pytest.mark.slow  # a fresh interpreter importing torch and triton
@pytest.mark.skipif(HAS_CUDA, reason="with a GPU present triton would compile for it")
@requires("triton")
@pytest.mark.skipif(not hasattr(triton, "knobs"), reason="triton before 3.4 interprets only with TRITON_INTERPRET=1")
def test_any_spelling_of_triton_interpret_rounds_like_the_interpreter():
    """triton reads TRITON_INTERPRET as a flag ("true" interprets as "1" does); the kernels' choice of
    rounding follows triton's decision, so bf16 keeps the reference's bits."""
    code = ("import torch; from neft_kernels import noisy_embedding; "
            "w = torch.randn(50, 64).bfloat16(); ids = torch.randint(0, 50, (4, 32)); "
            "a, b = (noisy_embedding(ids, w, 5.0, seed=3, backend=k) for k in ('triton', 'torch')); "
            "print(int((a.view(torch.int16) != b.view(torch.int16)).sum()))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "TRITON_INTERPRET": "true"})
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "0"


@pytest.mark.slow
def test_kernels_compile_ahead_of_time_for_sm80_and_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT)
    res = subprocess.run([sys.executable, str(ROOT / "tools" / "aot_compile.py")],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert res.returncode == 0, res.stderr
    reports = [json.loads(line) for line in res.stdout.splitlines()]
    kernels = {(r["kernel"], r["variant"], r["arch"]) for r in reports}
    assert len(kernels) == len(reports) == 2 * (4 + 3 * (4 + 1))  # archs x (scales + dtypes x (forward + backward))
    assert {r["arch"] for r in reports} == {"sm_80", "sm_90"}
    for r in reports:
        assert 0 < r["registers"] <= 255, r
        assert r["spill_bytes"] == 0, r
        assert r["ptx_fma"] == 0 and r["ptx_ftz"] == 0, r  # the spec: no FMA, no flush-to-zero
        # bf16 and fp16 outputs round to nearest even in hardware, two elements an instruction
        narrowing = {"bf16": ["cvt.rn.bf16x2.f32"], "fp16": ["cvt.rn.f16x2.f32"]}.get(r["variant"].split(",")[0], [])
        if r["kernel"] == "noisy_embedding_fwd":
            assert r["ptx_narrowing"] == narrowing, r
        else:
            assert set(r["ptx_narrowing"]) <= {"cvt.rn.bf16.f32", "cvt.rn.f16.f32", *narrowing}, r
        # ptxas expands IEEE div/sqrt with exact FFMAs of its own; elsewhere there is no FFMA.
        if r["kernel"] == "token_scales":
            assert r["ptx_div_sqrt"] == ["div.rn.f64", "sqrt.rn.f64"], r
        elif r["variant"].endswith("gaussian"):
            assert r["ptx_div_sqrt"] == ["div.rn.f32", "sqrt.rn.f32"], r
        else:
            assert r["sass_ffma"] == 0 and r["ptx_div_sqrt"] == [], r


def test_launch_blocks_fit_real_widths():
    """At most 1/8 of a block idles: d = 1152 (288 lanes) takes 5 x 64 lanes, not one 512-lane block."""
    from neft_kernels.backends import triton as kernels

    expected_lanes = {576: 32, 896: 32, 1152: 64, 2048: 512, 2304: 128, 3584: 128, 4096: 1024, 5120: 256, 8192: 1024}
    for d, lanes in expected_lanes.items():
        assert kernels.forward_blocks(d)[1] == lanes, d
        q = d // 4
        assert (-q) % lanes * 8 <= q
    assert kernels.backward_block(1152) == 256 and kernels.backward_block(4096) == 1024
    assert kernels.fitted_block(3, 1024) == 4 and kernels.fitted_block(1, 1024) == 1


@on_backends("triton")
def test_seeds_around_the_32_bit_boundaries_give_the_reference_bits(backend, device):
    """Launch arguments of 2**31 to 2**32 - 1 reach the kernel typed int64 but may be held as 32 bits."""
    weight = torch.randn(10, 16, generator=torch.Generator().manual_seed(0)).to(device)
    ids = torch.tensor([[1, 2, 3]], device=device)
    for seed in (2**31 - 1, 2**31, 3_000_000_000, 2**32 - 1, 2**32, -(2**31) - 1):
        out = noisy_embedding(ids, weight, 5.0, seed=seed, backend=backend)
        assert_bits_equal(out, noisy_embedding(ids, weight, 5.0, seed=seed, backend="torch"))


def test_an_interpreter_that_cannot_run_the_kernels_is_refused_by_name(monkeypatch):
    """Triton's interpreter before 3.7 cannot run a run-time loop with numpy 2.4 (triton-lang/triton#9171):
    the backend then takes no CPU tensors and says why, instead of failing inside a kernel."""
    import numpy

    monkeypatch.setattr(triton_backend, "INTERPRETED", True)
    for triton_version, numpy_version, refused in [("3.6.0", "2.4.6", True), ("3.2.0", "2.5.0", True),
                                                   ("3.6.0+git1234", "2.4rc1", True), ("3.6.0", "2.3.5", False),
                                                   ("3.7.0", "2.4.6", False), ("3.7+rocm", "2.4.0", False),
                                                   ("main", "2.4.0", False)]:
        monkeypatch.setattr(triton, "__version__", triton_version)
        monkeypatch.setattr(numpy, "__version__", numpy_version)
        reason = triton_backend._cpu_unavailable()
        assert (reason is not None and "triton-lang/triton#9171" in reason) == refused, (triton_version, numpy_version)
    monkeypatch.setattr(triton_backend, "CPU_UNAVAILABLE", reason := "the interpreter cannot run the kernels")
    assert "triton" not in available_backends("cpu")
    with pytest.raises(RuntimeError, match=reason):
        noisy_embedding(torch.zeros(2, 3, dtype=torch.long), torch.zeros(4, 8), 1.0, seed=0, backend="triton")
