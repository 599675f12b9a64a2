"""The CPU backend's instruction sets (csrc/cpu): every ISA this CPU runs gives the reference's bits.

The kernels pick their ISA once per process (the best the CPU runs, or ``NEFT_KERNELS_CPU_ISA``), so
each ISA is checked in a Python process of its own, forced with the variable: the forward (uniform
and Gaussian, every dtype, masks, packing, cu_seqlens, noise_mask, special values, lane-block
tails), a long stream across a counter carry and a 32 MiB output against ``spec.noise``, and
``philox_words`` against ``spec.philox4x32_10``. The processes run side by side; run as a script,
this file is that check.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from support import TESTS
from support.backends import requires

pytestmark = requires("cpu")

ISAS = ("avx512", "avx2", "generic")
TIMEOUT_S = 300


def _spawn(mode: str, isa: str | None) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "NEFT_KERNELS_CPU_ISA"}
    if isa is not None:
        env["NEFT_KERNELS_CPU_ISA"] = isa
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(TESTS), env.get("PYTHONPATH")) if p)
    return subprocess.Popen([sys.executable, __file__, mode], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


@pytest.fixture(scope="module")
def runs() -> dict[str, tuple[int, str, str]]:
    """(exit status, stdout, stderr) of the check under each ISA this CPU runs."""
    from neft_kernels import _C_cpu

    procs = {isa: _spawn("check", isa) for isa in _C_cpu.cpu_isas()}
    results = {}
    for name, proc in procs.items():
        try:
            out, err = proc.communicate(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        results[name] = (proc.returncode, out, err)
    return results


def test_the_cpu_runs_generic_and_lists_isas_best_first():
    from neft_kernels import _C_cpu

    isas = _C_cpu.cpu_isas()
    assert isas[-1] == "generic" and list(isas) == [isa for isa in ISAS if isa in isas]


@pytest.mark.parametrize("isa", ISAS)
def test_forced_isa_gives_the_reference_bits_and_a_bad_name_is_refused(isa, runs):
    """Each process first sets an unknown name: every call that needs the kernels refuses it, naming the
    ones that work, and the refusal is not cached; then the forced ISA is chosen and checked."""
    if isa not in runs:
        pytest.skip(f"this CPU does not run {isa}")
    status, out, err = runs[isa]
    assert status == 0, err[-4000:]
    refusals, verdict = out.strip().split("\n")
    refusals = json.loads(refusals)
    assert len(refusals) == 3  # cpu_isa, the forward and philox_words all raise it
    for message in refusals:
        assert "NEFT_KERNELS_CPU_ISA=avx1024 is not a CPU ISA of neft_kernels: use avx512, avx2 or generic" in message
    assert verdict == f"ok {isa}"


def test_this_process_uses_the_best_isa_or_the_forced_one():
    from neft_kernels import _C_cpu

    forced = os.environ.get("NEFT_KERNELS_CPU_ISA", "").strip().lower()
    assert _C_cpu.cpu_isa() == (forced if forced not in ("", "auto") else _C_cpu.cpu_isas()[0])


@pytest.mark.parametrize("isa", ISAS)
def test_an_isa_the_cpu_lacks_is_refused(isa):
    from neft_kernels import _C_cpu

    if isa in _C_cpu.cpu_isas():
        pytest.skip(f"this CPU runs {isa}")
    proc = _spawn("lacking", isa)
    out, err = proc.communicate(timeout=TIMEOUT_S)
    assert proc.returncode == 0, err[-4000:]
    assert f"NEFT_KERNELS_CPU_ISA={isa}: this CPU lacks" in out and "it runs: " in out


# ---- what the processes run


def _check(isa: str) -> None:
    """Everything in one process whose kernels are forced to ``isa``; raises on any difference."""
    from neft_kernels import _C_cpu, noisy_embedding, spec
    from neft_kernels.spec import philox4x32_10

    from support.asserts import DTYPES, assert_bits_equal
    from support.cases import cu_seqlens_for, make_weight, noise_mask_for, side_inputs

    assert _C_cpu.cpu_isa() == isa, (_C_cpu.cpu_isa(), isa)
    # One thread for the reference's many small ops: the processes run side by side, and idle OpenMP
    # threads spinning against each other would cost more than the work; the kernels' long stream below
    # runs on two.
    torch.set_num_threads(1)

    # The forward against the reference: d = 13 (lanes fewer than a vector), 300 (75 lanes: vector tails),
    # 1030 (258 lanes: a second lane block of 2, a short last quarter). Masks, packing, cu_seqlens and a
    # noise_mask; inf, NaN, values that round to inf and subnormals in the rows read.
    special = torch.tensor([float("inf"), float("-inf"), float("nan"), 3.3e38, -3.3e38, 6.5e4, 1e-40, -0.0])
    shape = (3, 37)
    gen = torch.Generator().manual_seed(11)
    for d in (13, 300, 1030):
        weight32 = make_weight(64, d, torch.float32)
        weight32[1, :8] = special
        weight32[2, d - 8:] = special
        ids = torch.randint(0, 64, shape, generator=gen)
        ids[0, :3] = torch.tensor([1, 2, 1])
        mask, pos = side_inputs("both", shape)
        cu = cu_seqlens_for("cu_seqlens", shape)
        noise_mask = noise_mask_for(shape)
        for dtype in DTYPES:
            weight = weight32.to(dtype)
            for distribution in ("uniform", "gaussian"):
                for seed, offset, kwargs in ((7, 0, {"attention_mask": mask, "position_ids": pos}),
                                             (-3, 2**32 - 1001, {"cu_seqlens": cu, "noise_mask": noise_mask}),
                                             (2**40 + 7, 12345, {"length_mode": "padded"})):
                    args = (ids, weight, 5.0)
                    kw = {"seed": seed, "offset": offset, "distribution": distribution, **kwargs}
                    assert_bits_equal(noisy_embedding(*args, backend="cpu", **kw),
                                      noisy_embedding(*args, backend="torch", **kw))

    # A long stream across a counter carry (the low word wraps mid-vector), several threads' worth:
    # rows of -0.0 at scale 1 make out = -0.0 + e = e, so the output is the noise itself.
    n, d, seed, offset = 256, 1024, -77, 2**32 - 5003
    rows = torch.zeros(n, dtype=torch.int64)
    for distribution in ("uniform", "gaussian"):
        torch.set_num_threads(2)
        out, _, _ = _C_cpu.forward(rows, torch.full((1, d), -0.0), seed, offset, 1.0, False, 0.0, n, None, None, None,
                                   None, distribution == "gaussian")
        torch.set_num_threads(1)
        assert_bits_equal(out, spec.noise(n, d, seed, offset, distribution=distribution))

    # A 32 MiB output (a fresh mapping, first touched by the kernel): token ranges at both ends and across the
    # carry against the reference stream.
    n, d, offset = 8192, 1024, 2**32 - 2048 * 256
    torch.set_num_threads(2)
    out, _, _ = _C_cpu.forward(torch.zeros(n, dtype=torch.int64), torch.full((1, d), -0.0), seed, offset, 1.0, False,
                               0.0, n, None, None, None, None, False)
    torch.set_num_threads(1)
    assert out.nbytes >= 32 << 20
    for first in (0, 2048 - 8, n - 16):
        assert_bits_equal(out[first:first + 16], spec.noise(16, d, seed, offset, first_token=first))

    # The bare stream, whole and partial vectors, across the carry.
    for seed in (0, -5, 2**40 + 7):
        for n_calls in (1, 7, 33, 300, 5000):
            words = torch.empty(n_calls, 4, dtype=torch.int32)
            torch.set_num_threads(2)
            _C_cpu.philox_words(words, seed, 2**32 - 300)
            torch.set_num_threads(1)
            counters = torch.arange(2**32 - 300, 2**32 - 300 + n_calls)
            assert torch.equal(words.long() & 0xFFFFFFFF, torch.stack(philox4x32_10(counters, seed), 1))
    print("ok", isa)


def _refusals() -> list[str]:
    """The error of each call that needs the kernels, under the current NEFT_KERNELS_CPU_ISA."""
    from neft_kernels import _C_cpu, noisy_embedding

    messages = []
    ids, weight, words = torch.zeros(1, 2, dtype=torch.int64), torch.ones(3, 8), torch.empty(4, 4, dtype=torch.int32)
    for call in (_C_cpu.cpu_isa, lambda: noisy_embedding(ids, weight, 5.0, seed=1, backend="cpu"),
                 lambda: _C_cpu.philox_words(words, 0, 0)):
        try:
            call()
        except RuntimeError as err:
            messages.append(str(err))
    return messages


def _lacking() -> None:
    print(" | ".join(_refusals()))


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "check":
        forced = os.environ["NEFT_KERNELS_CPU_ISA"]
        os.environ["NEFT_KERNELS_CPU_ISA"] = "avx1024"
        print(json.dumps(_refusals()))
        os.environ["NEFT_KERNELS_CPU_ISA"] = forced
        _check(forced)
    elif mode == "lacking":
        _lacking()
