"""The spec: Philox (known answers, the reference against the NumPy model), the reference op's
shapes, the lengths of the paper's footnote and the one-division scale (on every backend)."""

import math

import numpy as np
import pytest
import torch

from neft_kernels import noisy_embedding
from neft_kernels.lengths import token_scales
from neft_kernels.spec import philox4x32_10

from support import spec_model
from support.asserts import assert_bits_equal
from support.backends import on_backends
from support.cases import SEEDS, expected, make_weight

# Random123's known-answer vectors for Philox4x32-10.
KAT = [((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
       ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
       ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1))]


@pytest.mark.parametrize("ctr,key,out", KAT)
def test_spec_model_philox_known_answers(ctr, key, out):
    assert tuple(int(x) for x in spec_model.philox4x32_10(np.array(ctr, dtype=np.uint32), key)) == out


def test_reference_philox_known_answer_and_model():
    words = philox4x32_10(torch.tensor([0]), 0)
    assert tuple(int(w) for w in words) == KAT[0][2]
    counters = torch.tensor([0, 1, 2**32 - 1, 2**32, 2**45 + 17, 2**63 - 1])
    for seed in SEEDS:
        s = seed % 2**64
        ctr = np.zeros((len(counters), 4), dtype=np.uint32)
        ctr[:, 0] = (counters.numpy() & 0xFFFFFFFF).astype(np.uint32)
        ctr[:, 1] = (counters.numpy() >> 32).astype(np.uint32)
        model = spec_model.philox4x32_10(ctr, (s & 0xFFFFFFFF, s >> 32))
        ours = torch.stack(philox4x32_10(counters, seed), dim=1).numpy()
        np.testing.assert_array_equal(ours, model.astype(np.int64))


def test_reference_one_dim_ids_are_one_sequence():
    weight = make_weight(20, 8, torch.float32)
    ids = torch.tensor([3, 1, 4, 1, 5, 9, 2, 6])
    out = noisy_embedding(ids, weight, 10.0, seed=7, backend="torch")
    assert out.shape == (8, 8)
    assert_bits_equal(out, expected(ids, weight, 10.0, 7, 0, None, None, "per_sequence"))
    assert_bits_equal(out, noisy_embedding(ids[None], weight, 10.0, seed=7, backend="torch")[0])


def test_lengths_follow_the_paper_footnote():
    # row 0: right-padded (3 real); row 1: left-padded (2 real); row 2: packed 2 + 3 tokens
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 0, 1, 1], [1, 1, 1, 1, 1]])
    pos = torch.tensor([[0, 1, 2, 3, 4], [1, 1, 1, 0, 1], [0, 1, 0, 1, 2]])
    d, alpha = 16, 4.0

    def s(length):
        return float(np.float32(alpha / math.sqrt(length * d)))

    by_mask = token_scales(mask.shape, alpha, d, attention_mask=mask).view(3, 5).tolist()
    assert by_mask == [[s(3)] * 3 + [0, 0], [0, 0, 0, s(2), s(2)], [s(5)] * 5]
    by_pos = token_scales(mask.shape, alpha, d, position_ids=pos).view(3, 5).tolist()
    assert by_pos == [[s(5)] * 5, [s(3)] * 3 + [s(2)] * 2, [s(2)] * 2 + [s(3)] * 3]
    both = token_scales(mask.shape, alpha, d, attention_mask=mask, position_ids=pos).view(3, 5).tolist()
    assert both == [[s(3)] * 3 + [0, 0], [0, 0, 0, s(2), s(2)], [s(2)] * 2 + [s(3)] * 3]
    assert token_scales(mask.shape, alpha, d) == s(5)
    assert token_scales(mask.shape, alpha, d, attention_mask=mask, length_mode="padded") == s(5)


# alpha / sqrt(L * d) with a tensor divisor must not become reciprocal-then-multiply;
# reciprocal * alpha rounds differently for this alpha and d.
ALPHA_RECIPROCAL_ROUNDS_OFF, D_RECIPROCAL_ROUNDS_OFF = 3.4641022345673926, 16


def test_scale_is_one_float64_division_rounded_once():
    alpha, d = ALPHA_RECIPROCAL_ROUNDS_OFF, D_RECIPROCAL_ROUNDS_OFF
    want = float(np.float32(alpha / math.sqrt(3 * d)))
    assert token_scales((1, 3), alpha, d) == want
    assert token_scales((1, 3), alpha, d, attention_mask=torch.ones(1, 3, dtype=torch.long)).tolist() == [want] * 3


@on_backends()
def test_per_token_scales_on_the_device_are_the_one_division(backend, device):
    """The per-token path (a mask) on the tensors' device gives the scalar path's bits and the spec's."""
    alpha, d = ALPHA_RECIPROCAL_ROUNDS_OFF, D_RECIPROCAL_ROUNDS_OFF
    weight = make_weight(8, d, torch.float32, device)
    ids, mask = torch.tensor([[1, 2, 3]], device=device), torch.ones(1, 3, dtype=torch.long, device=device)
    masked = noisy_embedding(ids, weight, alpha, seed=1, attention_mask=mask, backend=backend)
    assert_bits_equal(masked, noisy_embedding(ids, weight, alpha, seed=1, backend=backend))
    assert_bits_equal(masked, expected(ids, weight, alpha, 1, 0, mask, None, "per_sequence"))


def test_side_inputs_broadcast_like_hugging_face_position_ids():
    weight = make_weight(20, 8, torch.float32)
    ids = torch.randint(0, 20, (3, 6), generator=torch.Generator().manual_seed(0))
    pos = torch.tensor([[0, 1, 2, 0, 1, 2]])
    out = noisy_embedding(ids, weight, 5.0, seed=2, position_ids=pos, backend="torch")
    assert_bits_equal(out, noisy_embedding(ids, weight, 5.0, seed=2, position_ids=pos.expand(3, 6), backend="torch"))
    assert_bits_equal(out, expected(ids, weight, 5.0, 2, 0, None, pos.expand(3, 6), "per_sequence"))


def test_round_to_float32_ties_to_even():
    from neft_kernels.lengths import round_to_float32

    ulp = 2.0**-23
    assert round_to_float32(1 + ulp / 2) == 1.0  # tie, even mantissa below
    assert round_to_float32(1 + 3 * ulp / 2) == 1 + 2 * ulp  # tie, even mantissa above
    assert round_to_float32(1 + ulp / 2 + 2**-40) == 1 + ulp
    for x in (0.0, 0.1, 5 / math.sqrt(512 * 4096), 3.4e38):
        assert round_to_float32(x) == float(np.float32(x))
    # Subnormal results round once, to a multiple of 2**-149 (24 bits first would make the second a
    # tie: 2.5 * 2**-149 + 2**-175 went to 2 * 2**-149); past the range, inf.
    tiny = 2.0**-149
    for x in (2.5 * tiny + 2.0**-175, 2.5 * tiny, 3.5 * tiny, 0.4 * tiny, 0.6 * tiny, 2.0**-126 - 2.0**-160,
              1.17e-38, 3.4028235677973366e38, 3.4028235677973367e38, 1e39, 1e300):
        with np.errstate(over="ignore"):
            assert round_to_float32(x) == float(np.float32(x)), x
    assert round_to_float32(1e39) == math.inf


@on_backends("torch", "cpu", "triton", device="cpu")
def test_tiny_alpha_scales_round_once_on_both_paths(backend, device):
    """An alpha whose scale is a float32 subnormal: the one-scale path (no side input) gives the
    per-token path's bits and the spec model's (float32 of the float64 quotient, rounded once)."""
    weight, ids = torch.zeros(3, 1), torch.tensor([0])
    alpha = 2.5 * 2.0**-149 + 2.0**-175  # d = L = 1: the scale is alpha
    one = noisy_embedding(ids, weight, alpha, seed=1, backend=backend)
    per_token = noisy_embedding(ids, weight, alpha, seed=1, backend=backend, attention_mask=torch.ones(1, dtype=int))
    assert_bits_equal(one, per_token)
    assert_bits_equal(one, expected(ids, weight, alpha, 1, 0, None, None, "per_sequence"))


@pytest.mark.slow  # 75M floats, ~4 s
def test_doubling_folds_into_the_uniform_scale_for_every_word():
    """``(x * UNIFORM_SCALE) * 2 - 1 == x * UNIFORM_SCALE_X2 - 1`` in float32 for every value the
    map meets (x = float32 of 0 .. 2**31 - 1): the kernels' one multiply gives spec v1's bits."""
    from neft_kernels.spec import UNIFORM_SCALE, UNIFORM_SCALE_X2

    scale, scale_x2, one = np.float32(UNIFORM_SCALE), np.float32(UNIFORM_SCALE_X2), np.float32(1)
    assert scale_x2 == scale * 2
    # Those floats, each once (ints round to them, 2**31 included): 0 .. 2**24 exactly, then each
    # binade [2**e, 2**(e+1)) for e = 24 .. 30 in its 2**23 steps (all exact in float32).
    steps = np.arange(1 << 23, dtype=np.float32)
    chunks = [np.arange(0, 1 << 24, dtype=np.float32)]
    chunks += [np.float32(2.0**e) + steps * np.float32(2.0 ** (e - 23)) for e in range(24, 31)]
    chunks.append(np.array([2.0**31], dtype=np.float32))
    every = np.concatenate(chunks)
    assert len(every) == (1 << 24) + 7 * (1 << 23) + 1 and (np.diff(every) > 0).all()  # each float once
    for x in chunks:
        two_steps = (x * scale) * np.float32(2) - one
        np.testing.assert_array_equal((x * scale_x2 - one).view(np.int32), two_steps.view(np.int32))
