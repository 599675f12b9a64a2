"""The CUDA C++ kernels' bits without a GPU: csrc/cuda/kernels.cuh built for the host with
support/cuda_emulator.cpp (every (block, thread) run in turn, the launcher's shape and lane choice)
against the reference, on both forward paths (16 bytes or one lane a thread), bad ids (never read:
tables between faulting pages), device seeds, the Gaussian stream and the backward's in-order sums."""

import ctypes
import shutil
import subprocess
import sys

import pytest
import torch

from neft_kernels.backends.reference import reference_backward, reference_forward

from support import ROOT, cuda_include
from support.asserts import assert_bits_equal
from support.cases import scale_cases

_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_INT64_MAX, _INT64_MIN = (1 << 63) - 1, -(1 << 63)


def _build_emulator(tmp_path_factory, *defines: str) -> str:
    include, compiler = cuda_include(), shutil.which("c++") or shutil.which("g++")
    if include is None or compiler is None:
        pytest.skip("needs a host C++ compiler and the CUDA headers (cuda_fp16.h)")
    lib = tmp_path_factory.mktemp("cuda_emulator") / "emulator.so"
    res = subprocess.run([compiler, "-std=c++17", "-O2", "-ffp-contract=off", "-fPIC", "-shared", "-pthread",
                          f"-I{include}", *(f"-D{d}" for d in defines),
                          str(ROOT / "tests" / "support" / "cuda_emulator.cpp"), "-o", str(lib)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    return str(lib)


@pytest.fixture(scope="module")
def emulator_lib(tmp_path_factory) -> str:
    return _build_emulator(tmp_path_factory)


def load_emulator(lib: str) -> ctypes.CDLL:
    emu = ctypes.CDLL(lib)
    p, i64, u64 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_uint64
    emu.emulated_forward.restype = ctypes.c_int
    emu.emulated_forward.argtypes = [ctypes.c_int, p, p, p, p, ctypes.c_float, p, u64, u64, i64, i64, i64, i64, p,
                                     p, ctypes.c_bool]
    emu.emulated_backward.restype = None
    emu.emulated_backward.argtypes = [ctypes.c_int, p, p, p, p, p, i64, i64, i64, i64, ctypes.c_bool]
    emu.emulated_token_scales.restype = None
    emu.emulated_token_scales.argtypes = [p, p, p, i64, i64, i64, i64, ctypes.c_double, p, p]
    emu.emulated_token_of.restype = i64
    emu.emulated_token_of.argtypes = [i64, i64, ctypes.c_int, i64]
    emu.emulated_lane_multiplier.restype = ctypes.c_uint32
    emu.emulated_lane_multiplier.argtypes = [i64, i64, ctypes.c_int]
    emu.emulated_set_reverse_order.argtypes = [ctypes.c_bool]
    emu.emulated_divergent_blocks.restype = i64
    return emu


@pytest.fixture(scope="module")
def emulator(emulator_lib) -> ctypes.CDLL:
    return load_emulator(emulator_lib)


def _ptr(t: torch.Tensor | None):
    return None if t is None else t.data_ptr()


def _forward(emu, ids, weight, scale, seed, offset, gaussian, seed_in_memory=False, out_offset=0):
    """The emulated launch: (out, lanes per thread, bad-id record, bad-id word). ``out_offset`` elements
    shift the output off 16-byte alignment."""
    n, d = ids.numel(), weight.shape[1]
    out = torch.empty(n * d + out_offset, dtype=weight.dtype)[out_offset:].view(n, d)
    bad = torch.tensor([_INT64_MAX, _INT64_MIN, 0], dtype=torch.int64)
    word = torch.zeros(1, dtype=torch.int32)
    scales = scale if isinstance(scale, torch.Tensor) else None
    seed_tensor = torch.tensor(seed, dtype=torch.int64) if seed_in_memory else None
    lanes = emu.emulated_forward(_DTYPES[weight.dtype], _ptr(ids), _ptr(weight), _ptr(out), _ptr(scales),
                                 0.0 if scales is not None else scale, _ptr(seed_tensor), seed % (1 << 64),
                                 offset, n, d, weight.stride(0), weight.shape[0], _ptr(bad), _ptr(word), gaussian)
    return out, lanes, bad, int(word)


@pytest.mark.parametrize("dtype", list(_DTYPES))
@pytest.mark.parametrize("d", [1, 5, 13, 64, 96, 576, 1152])
@pytest.mark.parametrize("gaussian", [False, True])
def test_forward_matches_the_reference_on_both_lane_paths(emulator, dtype, d, gaussian):
    gen = torch.Generator().manual_seed(d)
    vocab = 40
    ids = torch.randint(0, vocab, (37,), generator=gen)
    scales = torch.rand(37, generator=gen) * 0.1
    scales[3] = 0.0
    table = torch.randn(vocab, d + 8, generator=gen).to(dtype)
    for weight, out_offset, scale in ((table[:, :d].contiguous(), 0, scales),  # aligned: 16 bytes where d allows
                                      (table[:, :d].contiguous(), 1, 0.03125),  # output off alignment: one lane
                                      (table[:, 1:d + 1], 0, scales)):  # a row stride of d + 8, base off alignment
        for seed, offset, in_memory in ((5, 0, False), (-(2**62) - 7, 2**32 - 50, True)):
            out, lanes, _, word = _forward(emulator, ids, weight, scale, seed, offset, gaussian, in_memory, out_offset)
            assert word == 0  # every id in range
            expected = reference_forward(ids, weight, scale, seed, offset, "gaussian" if gaussian else "uniform")
            assert_bits_equal(out, expected)
            vector = 16 // weight.element_size()
            assert lanes == (vector if d % (4 * vector) == 0 and weight.is_contiguous() and not out_offset else 1)


# Bad ids in a process of its own, on tables between two pages that fault on any access: a bad id's
# row, were it read, would fault there (just past the end, just before the start), and so would a
# wild id's. Both lane paths (16 bytes on packed and padded rows; one lane).
_BAD_IDS_RUN = """
import ctypes, mmap, sys
import torch
sys.path.insert(0, sys.argv[2])
from kernels.test_cuda_emulated import _forward, load_emulator
from neft_kernels.backends.reference import reference_forward
from support.asserts import assert_bits_equal
emu = load_emulator(sys.argv[1])
libc = ctypes.CDLL(None)
libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
page = mmap.PAGESIZE
vocab = 10
for dtype in (torch.float32, torch.bfloat16, torch.float16):
    for d, stride in ((64, 64), (64, 72), (13, 13)):
        for at_end in (False, True):
            size = vocab * stride * dtype.itemsize
            span = -(-size // page) * page
            buf = mmap.mmap(-1, span + 2 * page)
            base = ctypes.addressof(ctypes.c_char.from_buffer(buf))
            start = base + page + (span - size) // 16 * 16 * at_end
            table = torch.frombuffer((ctypes.c_char * size).from_address(start), dtype=dtype).view(vocab, stride)
            table.copy_(torch.randn(vocab, stride))
            assert libc.mprotect(base, page, 0) == 0 and libc.mprotect(base + page + span, page, 0) == 0
            weight = table[:, :d]
            ids = torch.tensor([3, -1, vocab, 9, -4, vocab + 1, 2**40, 0])
            out, lanes, bad, word = _forward(emu, ids, weight, 0.5, 11, 0, False)
            assert (lanes > 1) == (d == 64), lanes
            assert_bits_equal(out, reference_forward(ids, weight, 0.5, 11, 0))
            assert out[[1, 2, 4, 5, 6]].isnan().all() and not out[[0, 3, 7]].isnan().any()
            assert bad.tolist() == [-4, 2**40, vocab] and word == 1, (bad, word)
print("ok")
"""


def test_bad_ids_are_never_read_get_nan_rows_and_are_recorded(emulator_lib):
    res = subprocess.run([sys.executable, "-c", _BAD_IDS_RUN, emulator_lib, str(ROOT / "tests")],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), (res.returncode, res.stderr[-2000:])


@pytest.mark.parametrize("dtype", list(_DTYPES))
@pytest.mark.parametrize("d", [1, 13, 130, 300])
@pytest.mark.parametrize("padding_idx, scale_grad_by_freq", [(None, False), (2, True)])
def test_backward_sums_each_ids_rows_in_token_order(emulator, dtype, d, padding_idx, scale_grad_by_freq):
    gen = torch.Generator().manual_seed(d)
    vocab = 12
    ids = torch.randint(0, 6, (200,), generator=gen)
    ids[:3] = torch.tensor([-1, vocab, vocab - 1])  # out of range ids get no row
    grad = (torch.randn(200, d, generator=gen) * 100).to(dtype)
    sorted_ids, order = torch.sort(ids, stable=True)
    seg_end = torch.searchsorted(sorted_ids, sorted_ids, right=True)
    grad_weight = torch.zeros(vocab, d, dtype=dtype)
    emulator.emulated_backward(_DTYPES[dtype], _ptr(grad), _ptr(sorted_ids), _ptr(order), _ptr(seg_end),
                               _ptr(grad_weight), ids.numel(), d, vocab,
                               -1 if padding_idx is None else padding_idx, scale_grad_by_freq)
    assert_bits_equal(grad_weight, reference_backward(grad, ids, vocab, padding_idx, scale_grad_by_freq))


def test_forward_threads_find_their_token_by_multiply_and_shift(emulator):
    """lane_groups' multiplier gives g // groups for launches of fewer than 2^31 threads (tokens'
    edges, near the top of that range too; widths 1 to 79 and larger ones up to 2^31), and the
    division takes over from 2^31 threads on (or where a token has one lane group)."""
    gen = torch.Generator().manual_seed(0)
    for d in [*range(1, 80), 96, 576, 1152, 4097, 16380, 2**20 + 4, 2**31 - 8]:
        for lanes in (1, 4, 8):
            groups = ((d + 3) // 4 + lanes - 1) // lanes
            top = (2**31 - 1) // groups  # tokens of the largest launch under 2^31 threads
            for n_tokens in (top, top + 1):
                threads = n_tokens * groups
                multiplied = emulator.emulated_lane_multiplier(n_tokens, d, lanes) != 0
                assert multiplied == (groups > 1 and threads < 2**31), (d, lanes, n_tokens)
                edges = [t * groups + k for t in (0, 1, n_tokens // 2, n_tokens - 1) for k in (0, groups - 1)]
                picks = torch.randint(0, threads, (64,), generator=gen).tolist()
                for g in {*edges, *picks, threads - 1}:
                    assert emulator.emulated_token_of(n_tokens, d, lanes, g) == g // groups, (d, lanes, n_tokens, g)


def _token_scales(emu, width: int, alpha: float, d: int, mask, pos, cu, noise_mask, alpha_in_memory=False):
    """The emulated token_scales_cuda: side inputs as the binding passes them ((rows, width) strides,
    0 along broadcast dims; element sizes)."""
    rows = 3
    data, strides, sizes = [], [], []
    for t in (mask, pos, noise_mask):
        data.append(_ptr(t))
        strides += [0, 0] if t is None else [s if n > 1 else 0 for s, n in zip(t.stride(), t.shape, strict=True)]
        sizes.append(8 if t is None else t.element_size())
    data.append(_ptr(cu))
    strides += [0, 0 if cu is None else cu.stride(0)]
    sizes.append(8 if cu is None else cu.element_size())
    alpha_tensor = torch.tensor(alpha, dtype=torch.float64) if alpha_in_memory else None
    out = torch.full((rows * width,), float("nan"))
    emu.emulated_token_scales((ctypes.c_void_p * 4)(*data), (ctypes.c_int64 * 8)(*strides), (ctypes.c_int * 4)(*sizes),
                              0 if cu is None else cu.numel(), rows, width, d, 0.0 if alpha_in_memory else alpha,
                              _ptr(alpha_tensor), _ptr(out))
    return out


def _check_scales(emu, width: int, alphas=((5.0, 4096), (3.4641022345673926, 16), (0.0, 7))):
    """Every scale case, with each block's threads run in ascending and in descending order (a missing
    barrier shows in one of them), and no block whose threads pass different numbers of barriers."""
    from neft_kernels.lengths import token_scales

    g = torch.Generator().manual_seed(width + 2)
    noise_masks = (None, torch.randint(0, 2, (3, width), generator=g).bool(),
                   (torch.arange(width) % 3 == 0)[None].expand(3, width))
    for reverse in (False, True):
        emu.emulated_set_reverse_order(reverse)
        for i, (mask, pos, cu) in enumerate(scale_cases(width)):
            noise_mask = noise_masks[i % len(noise_masks)]
            for alpha, d in alphas:
                got = _token_scales(emu, width, alpha, d, mask, pos, cu, noise_mask, alpha_in_memory=i % 2 == 1)
                want = token_scales((3, width), alpha, d, attention_mask=mask, position_ids=pos, cu_seqlens=cu,
                                    noise_mask=noise_mask)
                assert_bits_equal(got, want if isinstance(want, torch.Tensor) else torch.full_like(got, want))
    emu.emulated_set_reverse_order(False)
    assert emu.emulated_divergent_blocks() == 0


@pytest.mark.parametrize("width", [1, 7, 37, 1500, 2 * 4096 + 37])
def test_token_scales_match_the_reference(emulator, width):
    """Masks of every width, broadcast strides, packed rows, cu_seqlens (int32, int64, repeats, past the
    end), noise masks, alpha as a value or in memory; rows of one tile and of three."""
    _check_scales(emulator, width, *([((5.0, 4096), (0.0, 7))] if width > 4096 else []))


@pytest.fixture(scope="module", params=[4, 8], ids=lambda n: f"{n}-threads")
def small_tile_emulator(tmp_path_factory, request) -> ctypes.CDLL:
    return load_emulator(_build_emulator(tmp_path_factory, f"NEFT_SCALE_THREADS={request.param}"))


@pytest.mark.parametrize("width", [9, 37, 300, 600])
def test_token_scales_across_tiles_and_windows(small_tile_emulator, width):
    """Tiles of 64 or 128 tokens, summaries read 4 or 8 tiles at a time: sub-sequences cross many
    tiles and windows, as long packed rows do at full size. (8 threads scan in an odd number of
    steps, 4 and 256 in an even one.)"""
    _check_scales(small_tile_emulator, width)


def test_token_scales_with_no_side_input_use_the_row_width(emulator):
    """A tensor alpha alone makes the scales per token: L is the row width."""
    got = _token_scales(emulator, 11, 5.0, 64, None, None, None, None, alpha_in_memory=True)
    assert_bits_equal(got, torch.full((33,), 5.0 / (11 * 64) ** 0.5, dtype=torch.float32))
