"""Compile the Triton kernels ahead of time for NVIDIA GPUs, with no GPU present.

Prints one JSON line per (kernel, variant, arch) with registers, stack, shared memory and spills read
from the cubin by ``cuobjdump --dump-resource-usage``, the kernel's SASS instruction count, the
count of FMA instructions in the PTX and SASS and of flush-to-zero instructions in the PTX (spec v1
allows neither), the PTX's float32 -> 16-bit conversions (round to nearest even), and the division
and square-root instructions of the scales kernel (float64) and of the Gaussian stream (float32):
the spec needs them rounded to nearest; ptxas expands those IEEE instructions with FFMAs of its
own, which are exact by construction.

    python tools/aot_compile.py                 # sm_80 and sm_90
    python tools/aot_compile.py --arch 90 --keep out/   # also keep .ptx/.cubin files
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from neft_kernels.backends import triton as kernels

if kernels.INTERPRETED:
    sys.exit("unset TRITON_INTERPRET: ahead-of-time compilation needs the real Triton compiler")

_PTR = {"fp32": "*fp32", "fp16": "*fp16", "bf16": "*i16"}  # bf16 travels as int16 words
_TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _variants(embedding_dim: int):
    """(kernel name, variant name, JITFunction, signature, constexprs, options) as the launchers use them."""
    fwd_n, fwd_q = kernels.forward_blocks(embedding_dim)
    bwd_d = kernels.backward_block(embedding_dim)
    for has_mask, has_pos, has_cu, has_noise, alpha_ptr, variant in (
            (True, False, False, False, False, "mask"), (True, True, False, False, False, "mask + positions"),
            (False, False, True, False, False, "cu_seqlens"),
            (True, False, False, True, True, "mask + noise mask, alpha from memory")):
        sig = {"mask_ptr": "*i64", "m_s0": "i64", "m_s1": "i64", "pos_ptr": "*i64", "p_s0": "i64", "p_s1": "i64",
               "cu_ptr": "*i32", "n_cu": "i32", "cu_steps": "i32", "noise_ptr": "*i8", "n_s0": "i64", "n_s1": "i64",
               "out_ptr": "*fp32", "width": "i32", "alpha_bits": "i64", "alpha_ptr": "*fp64", "d": "i32",
               "HAS_MASK": "constexpr", "HAS_POS": "constexpr", "HAS_CU": "constexpr", "HAS_NOISE_MASK": "constexpr",
               "ALPHA_FROM_PTR": "constexpr", "BLOCK": "constexpr", "WALK": "constexpr"}
        consts = {"HAS_MASK": has_mask, "HAS_POS": has_pos, "HAS_CU": has_cu, "HAS_NOISE_MASK": has_noise,
                  "ALPHA_FROM_PTR": alpha_ptr, "BLOCK": kernels._SCALES_BLOCK, "WALK": kernels._SCALES_WALK}
        yield "token_scales", variant, kernels._token_scales_kernel, sig, consts, kernels.SCALES_LAUNCH_OPTIONS
    for dtype in ("fp32", "bf16", "fp16"):
        for per_token, seed_ptr, gaussian, variant in (
                (False, False, False, "scalar scale"), (True, False, False, "per-token scale"),
                (True, True, False, "per-token scale, device seed"), (True, True, True, "gaussian")):
            sig = {"ids_ptr": "*i64", "w_ptr": _PTR[dtype], "out_ptr": _PTR[dtype], "scale_ptr": "*fp32",
                   "scale_value": "fp32", "seed": "i64", "seed_ptr": "*i64", "offset": "i64", "bad_ptr": "*i64",
                   "n_tokens": "i32", "d": "i32", "n_lanes": "i32", "w_stride": "i32", "n_rows": "i32",
                   "PER_TOKEN_SCALE": "constexpr", "SEED_FROM_PTR": "constexpr", "RECORD_BAD": "constexpr",
                   "IS_BF16": "constexpr", "GAUSSIAN": "constexpr", "EARLY_LOADS": "constexpr", "BLOCK_N": "constexpr",
                   "BLOCK_Q": "constexpr"}
            consts = {"PER_TOKEN_SCALE": per_token, "SEED_FROM_PTR": seed_ptr, "RECORD_BAD": True,
                      "IS_BF16": dtype == "bf16", "GAUSSIAN": gaussian,
                      "EARLY_LOADS": kernels.early_loads(_TORCH_DTYPES[dtype], gaussian), "BLOCK_N": fwd_n,
                      "BLOCK_Q": fwd_q}
            yield ("noisy_embedding_fwd", f"{dtype}, {variant}", kernels._noisy_embedding_fwd_kernel, sig, consts,
                   kernels.LAUNCH_OPTIONS)
        sig = {"grad_ptr": _PTR[dtype], "sorted_ids_ptr": "*i64", "order_ptr": "*i64", "seg_end_ptr": "*i64",
               "gw_ptr": _PTR[dtype], "d": "i32", "n_rows": "i32", "padding_idx": "i32", "SCALE_BY_FREQ": "constexpr",
               "IS_BF16": "constexpr", "BLOCK_D": "constexpr", "ROWS": "constexpr"}
        consts = {"SCALE_BY_FREQ": False, "IS_BF16": dtype == "bf16", "BLOCK_D": bwd_d, "ROWS": kernels._BWD_ROWS}
        yield "embedding_bwd", dtype, kernels._embedding_bwd_kernel, sig, consts, kernels.LAUNCH_OPTIONS


_CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


def _cuobjdump(flag: str, cubin: Path) -> str:
    return subprocess.run([str(_CUOBJDUMP), flag, str(cubin)], capture_output=True, text=True, check=True).stdout


def _resource_usage(cubin: Path) -> dict:
    text = _cuobjdump("--dump-resource-usage", cubin)
    fields = {k: int(v) for k, v in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", text)}
    # Register spills land in local memory, so LOCAL == 0 means no spills.
    return {"registers": fields["REG"], "stack_bytes": fields["STACK"], "shared_bytes": fields["SHARED"],
            "spill_bytes": fields["LOCAL"]}


# Integer arguments that equal the embedding dim, or its lane count, for contiguous tensors.
_WIDTH_ARGS = {"d": lambda dim: dim, "w_stride": lambda dim: dim, "n_lanes": lambda dim: -(-dim // 4)}


def _runtime_attrs(fn, sig: dict, embedding_dim: int) -> dict:
    """The divisibility facts the JIT gives a launch on contiguous tensors at ``embedding_dim``: every
    pointer (allocations are 16-byte aligned) and each width argument that is a multiple of 16.
    Without them the compiler cannot prove alignment and never vectorises a load."""
    attrs = {}
    for name, kind in sig.items():
        width = _WIDTH_ARGS.get(name)
        if kind.startswith("*") or (width is not None and width(embedding_dim) % 16 == 0):
            attrs[(fn.arg_names.index(name),)] = [["tt.divisibility", 16]]
    return attrs


def compile_all(archs: list[int], embedding_dim: int = 4096, keep: Path | None = None) -> list[dict]:
    """Compile every variant for every arch at the blocks used for ``embedding_dim``."""
    reports = []
    with tempfile.TemporaryDirectory() as tmp:
        out_dir = keep or Path(tmp)
        out_dir.mkdir(parents=True, exist_ok=True)
        for arch in archs:
            for name, variant, fn, sig, consts, options in _variants(embedding_dim):
                attrs = _runtime_attrs(fn, sig, embedding_dim)
                compiled = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                                          target=GPUTarget("cuda", arch, 32), options=options)
                stem = f"{name}_{re.sub(r'[^a-z0-9]+', '_', variant)}_sm{arch}"
                cubin = out_dir / f"{stem}.cubin"
                cubin.write_bytes(compiled.asm["cubin"])
                (out_dir / f"{stem}.ptx").write_text(compiled.asm["ptx"])
                sass = _cuobjdump("-sass", cubin)
                reports.append({"kernel": name, "variant": variant, "arch": f"sm_{arch}", "d": embedding_dim,
                                **_resource_usage(cubin),
                                # Spec v1 forbids contraction and flushing subnormals: count both.
                                "sass_instructions": len(re.findall(r"^\s+/\*[0-9a-f]{4}\*/", sass, re.M)),
                                "sass_ffma": len(re.findall(r"\bFFMA\b", sass)),
                                "ptx_ftz": len(re.findall(r"\.ftz\b", compiled.asm["ptx"])),
                                "ptx_fma": len(re.findall(r"\bfma\.", compiled.asm["ptx"])),
                                # Narrowing float32 to 16 bits rounds to nearest even (cvt.rn).
                                "ptx_narrowing": sorted(set(re.findall(r"\bcvt\.\w+\.(?:bf16|f16)(?:x2)?\.f32\b",
                                                                       compiled.asm["ptx"]))),
                                # Every divide and root must be IEEE (round to nearest): the scales'
                                # float64 ones, the Gaussian stream's float32 ones.
                                "ptx_div_sqrt": sorted(set(re.findall(r"\b(?:div|sqrt)\.\w+\.f(?:32|64)\b",
                                                                      compiled.asm["ptx"])))})
    return reports


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, action="append", help="compute capability, e.g. 90 (repeatable)")
    parser.add_argument("--dim", type=int, default=4096, help="embedding dim that picks the block sizes")
    parser.add_argument("--keep", type=Path, help="directory to keep the .ptx and .cubin files in")
    args = parser.parse_args()
    for report in compile_all(args.arch or [80, 90], args.dim, args.keep):
        print(json.dumps(report))


if __name__ == "__main__":
    main()
