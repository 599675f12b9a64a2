"""NEFTune's knobs: the options object, alpha as data under torch.compile, noise_mask and noise_tokens,
alpha schedules and the noise statistics. The Gaussian stream and noise_mask against the spec model:
tests/kernels/test_spec_equivalence.py; the Gaussian moments: tests/spec/test_statistics.py."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo.testing

import neft_kernels as nk
from neft_kernels import NoiseOptions, NoisyEmbedding, noisy_embedding
from neft_kernels.backends import module
from neft_kernels.lengths import token_scales

from support.asserts import assert_bits_equal, assert_uniform_noise_of_alpha
from support.backends import on_backends
from support.cases import make_weight

# --- the options object ---------------------------------------------------------------------------

def test_every_entry_point_takes_the_same_options_and_refuses_a_misspelling():
    for make in (lambda **o: NoisyEmbedding(10, 4, **o), lambda **o: nk.make_noisy(torch.nn.Embedding(10, 4), **o),
                 lambda **o: nk.patch_model(_TinyModel(), **o), lambda **o: NoiseOptions.make(**o)):
        with pytest.raises(TypeError, match=r"unknown noise option\(s\) \['distrib'\]"):
            make(distrib="gaussian")
        with pytest.raises(ValueError, match="distribution must be one of"):
            make(distribution="laplace")
    # an entry point with keywords of its own lists them beside the options
    with pytest.raises(TypeError, match=r"\['padding_ix'\]; the options .*; NoisyEmbedding also takes .*'padding_idx'"):
        NoisyEmbedding(10, 4, padding_ix=0)
    emb = NoisyEmbedding(10, 4, noise_alpha=2.0, distribution="gaussian", noise_tokens="response")
    assert emb.noise_options == NoiseOptions(2.0, distribution="gaussian", noise_tokens="response")
    with pytest.raises(ValueError):
        emb.configure_noise(noise_alpha=1.0, length_mode="nope")  # nothing changes when one option is refused
    assert emb.noise_options.noise_alpha == 2.0
    assert "distribution=gaussian" in repr(emb)


class _TinyModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(10, 4)

    def get_input_embeddings(self):
        return self.embed

    def forward(self, input_ids, attention_mask=None, labels=None):
        return self.embed(input_ids)


# --- alpha as data --------------------------------------------------------------------------------

@pytest.mark.parametrize("backend_name", ["aot_eager", "inductor"])
@pytest.mark.parametrize("dynamic", [None, True])
def test_alpha_changes_every_step_under_fullgraph_compile_with_no_recompile(backend_name, dynamic):
    torch._dynamo.reset()
    emb = NoisyEmbedding(50, 64, noise_alpha=5.0, backend="torch")
    counter = torch._dynamo.testing.CompileCounterWithBackend(backend_name)
    step = torch.compile(emb, fullgraph=True, backend=counter, dynamic=dynamic)
    ids = torch.randint(0, 50, (4, 32))
    clean = emb.weight[ids].detach()
    frames = []
    for alpha in (5.0, 1.0, 12.5, 0.25):
        emb.noise_alpha = alpha
        out = step(ids)
        assert_uniform_noise_of_alpha(out, clean, alpha, 32)
        frames.append(counter.frame_count)
    assert frames[0] > 0 and frames == frames[:1] * 4  # compiled by the first call, never again


def test_a_module_compiled_at_alpha_0_takes_a_later_alpha_without_recompiling():
    """A schedule's warm-up starts at alpha 0: the compiled graph holds the op then too (no guard on
    alpha's value, as an exported program or a CUDA graph keeps none)."""
    torch._dynamo.reset()
    emb = NoisyEmbedding(50, 64, noise_alpha=0.0, backend="torch")
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    step = torch.compile(emb, fullgraph=True, backend=counter)
    ids = torch.randint(0, 50, (4, 32))
    clean = emb.weight[ids].detach()
    assert torch.equal(step(ids), clean)
    frames = counter.frame_count
    emb.noise_alpha = 5.0
    assert_uniform_noise_of_alpha(step(ids), clean, 5.0, 32)
    assert frames > 0 and counter.frame_count == frames


@pytest.mark.slow  # torch.compile of a whole model with dynamic shapes
def test_alpha_on_a_compiled_patched_model_over_several_lengths():
    from support.hf_models import VOCAB, build

    torch._dynamo.reset()
    model = nk.patch_model(build("llama"), noise_alpha=5.0, backend="torch").train()
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    step = torch.compile(model, fullgraph=True, backend=counter, dynamic=True)
    frames = []
    for i, length in enumerate((8, 13, 21, 34)):
        model.get_input_embeddings().noise_alpha = 1.0 + i
        ids = torch.randint(0, VOCAB, (2, length))
        step(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.sum().backward()
        frames.append(counter.frame_count)
    assert frames[0] > 0 and frames == frames[:1] * 4  # one compile for every length and every alpha


@pytest.mark.slow  # torch.compile of a whole model
def test_no_graph_break_and_no_recompile_without_fullgraph():
    """Without fullgraph, dynamo would split the graph at anything untraceable: count the breaks."""
    from torch._dynamo.utils import counters

    from support.hf_models import VOCAB, build

    torch._dynamo.reset()
    counters.clear()
    model = nk.patch_model(build("llama"), noise_alpha=5.0, distribution="gaussian", backend="torch").train()
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    step = torch.compile(model, backend=counter)
    ids = torch.randint(0, VOCAB, (2, 16))
    mask = torch.ones_like(ids)
    mask[1, 10:] = 0
    frames = []
    for alpha in (5.0, 2.5, 7.0):
        model.get_input_embeddings().noise_alpha = alpha
        step(input_ids=ids, attention_mask=mask).logits.sum().backward()
        frames.append(counter.frame_count)
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    assert frames[0] > 0 and frames == frames[:1] * 3  # compiled by the first call only


@on_backends("triton")
def test_a_tensor_alpha_is_read_on_the_device_by_the_triton_scales_kernel(backend, device):
    triton_backend = module(backend)
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]], device=device)
    noise = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]], device=device)
    for alpha in (5.0, 0.3):
        got = triton_backend.token_scales(4, 8, torch.tensor(alpha, dtype=torch.float64, device=device), 64, mask,
                                          None, None, noise)
        want = token_scales((2, 4), alpha, 64, attention_mask=mask, noise_mask=noise)
        assert_bits_equal(got, want)
    plain = triton_backend.token_scales(4, 8, torch.tensor(5.0, dtype=torch.float64, device=device), 64, None, None,
                                        None, None, torch.device(device))
    assert_bits_equal(plain, torch.full((8,), token_scales((2, 4), 5.0, 64)))  # L = the row width


def test_a_functional_tensor_alpha_equals_the_float():
    w = make_weight(20, 8, torch.float32)
    ids = torch.randint(0, 20, (2, 5))
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0]])
    for backend in ("torch", "auto"):
        want = noisy_embedding(ids, w, 3.0, seed=4, attention_mask=mask, backend=backend)
        got = noisy_embedding(ids, w, torch.tensor(3.0), seed=4, attention_mask=mask, backend=backend)
        assert_bits_equal(got, want)
    with pytest.raises(ValueError, match="noise_alpha must be finite"):
        noisy_embedding(ids, w, torch.tensor(-1.0), seed=4)
    with pytest.raises(TypeError, match="one floating value"):
        noisy_embedding(ids, w, torch.tensor([1.0, 2.0]), seed=4)


def test_alpha_follows_the_module_to_its_device_and_stays_float64():
    emb = NoisyEmbedding(10, 4, noise_alpha=3.0)
    emb.to(torch.float16)
    assert emb._alpha_data.dtype == torch.float64 and emb._alpha_data.item() == 3.0
    emb.to_empty(device="meta")
    assert emb._alpha_data.device.type == "meta"
    emb.to_empty(device="cpu")
    assert emb._alpha_data.item() == 3.0


# --- noise_mask and noise_tokens ------------------------------------------------------------------

def test_noise_mask_tokens_stay_clean_and_still_count_towards_L():
    w = make_weight(20, 16, torch.float32)
    ids = torch.randint(0, 20, (1, 8))
    keep = torch.tensor([[False] * 3 + [True] * 5])
    out = noisy_embedding(ids, w, 5.0, seed=1, noise_mask=keep)
    full = noisy_embedding(ids, w, 5.0, seed=1)
    assert torch.equal(out[0, :3], w[ids[0, :3]])
    assert_bits_equal(out[0, 3:], full[0, 3:])  # the same L (8) and the same noise where noised


def test_patch_model_noises_the_response_only_from_the_labels():
    model = nk.patch_model(_TinyModel(), noise_alpha=5.0, noise_tokens="response", backend="torch").train()
    ids = torch.randint(0, 10, (2, 6))
    labels = ids.clone()
    labels[:, :2] = -100
    torch.manual_seed(0)
    out = model(ids, labels=labels)
    clean = model.embed.weight[ids]
    assert torch.equal(out[:, :2], clean[:, :2]) and not torch.equal(out[:, 2:], clean[:, 2:])
    nk.patch_model(model, noise_alpha=5.0, noise_tokens="prompt", backend="torch")
    out = model(ids, labels=labels)
    assert not torch.equal(out[:, :2], clean[:, :2]) and torch.equal(out[:, 2:], clean[:, 2:])
    with pytest.raises(ValueError, match="labels"):
        model(ids)
    model.eval()
    assert torch.equal(model(ids), clean)  # eval: no noise, labels or not


# --- schedules ------------------------------------------------------------------------------------

def test_alpha_schedules():
    assert [nk.alpha_schedule(4.0)(s) for s in (0, 100)] == [4.0, 4.0]
    linear = nk.alpha_schedule(10.0, "linear", final_alpha=2.0, total_steps=5)
    assert [linear(s) for s in range(7)] == pytest.approx([10.0, 8.4, 6.8, 5.2, 3.6, 2.0, 2.0])
    cosine = nk.alpha_schedule(10.0, "cosine", warmup_steps=2, total_steps=6)
    assert [round(cosine(s), 6) for s in range(7)] == [0.0, 5.0, 10.0, 8.535534, 5.0, 1.464466, 0.0]
    assert nk.alpha_schedule(1.0, lambda s: 0.5 * s)(4) == 2.0
    # a callable gives alpha itself: a warm-up or a final alpha beside it would be silently ignored
    for keywords in ({"warmup_steps": 4}, {"final_alpha": 1.0}):
        with pytest.raises(ValueError, match="callable schedule"):
            nk.alpha_schedule(1.0, lambda s: 0.5 * s, **keywords)
        with pytest.raises(ValueError, match="callable schedule"):
            nk.AlphaScheduler(nk.patch_model(_TinyModel()), 1.0, lambda s: 0.5 * s, **keywords)
    with pytest.raises(ValueError, match="total_steps"):
        nk.alpha_schedule(5.0, "linear")
    with pytest.raises(ValueError, match="schedule must be one of"):
        nk.alpha_schedule(5.0, "step")


def test_alpha_scheduler_sets_every_noisy_embedding_like_an_lr_scheduler():
    model = nk.patch_model(_TinyModel(), noise_alpha=8.0)
    scheduler = nk.AlphaScheduler(model, 8.0, "linear", total_steps=4)
    assert model.embed.noise_alpha == 8.0
    alphas = [scheduler.step() for _ in range(5)]
    assert alphas == [6.0, 4.0, 2.0, 0.0, 0.0] and model.embed.noise_alpha == 0.0
    state = scheduler.state_dict()
    again = nk.AlphaScheduler(model, 8.0, "linear", total_steps=4)
    again.load_state_dict(state)
    assert again.alpha == 0.0
    with pytest.raises(ValueError, match="noise_alpha must be finite"):
        nk.AlphaScheduler(model, 1.0, lambda s: -1.0)
    # on a model not patched yet every step would set nothing
    with pytest.raises(ValueError, match="no NoisyEmbedding in _TinyModel: patch the model"):
        nk.AlphaScheduler(_TinyModel(), 8.0)


# --- statistics -----------------------------------------------------------------------------------

def test_noise_stats_are_recorded_on_request_only():
    emb = NoisyEmbedding(50, 32, noise_alpha=5.0)
    ids = torch.randint(0, 50, (2, 10))
    mask = torch.tensor([[1] * 10, [1] * 4 + [0] * 6])
    emb(ids, attention_mask=mask)
    assert emb.read_noise_stats() == {}
    emb.record_noise_stats()
    emb(ids, attention_mask=mask)
    emb(ids, attention_mask=mask, noise_mask=torch.zeros_like(mask))
    stats = emb.read_noise_stats()
    assert stats["noised_fraction"] == pytest.approx(14 / 40)
    assert stats["mean_length"] == pytest.approx((10 * 10 + 4 * 4) / 14)
    # |e| ~ U(0, 1): the noise norm is about alpha / sqrt(3 L) per token, against an embedding norm of about 0.1 sqrt(d)
    assert 0 < stats["noise_ratio"] < 10
    assert emb.read_noise_stats() == {}  # reading stops the recording


@pytest.mark.parametrize("shape", [(0, 5), (2, 0), (0,)])
def test_noise_stats_of_an_empty_batch_count_no_tokens(shape):
    emb = NoisyEmbedding(50, 32, noise_alpha=5.0)
    emb.record_noise_stats()
    assert emb(torch.zeros(shape, dtype=torch.long)).shape == shape + (32,)  # recording does not break the call
    assert emb.read_noise_stats() == {"noised_fraction": 0.0, "mean_length": 0.0, "noise_ratio": 0.0}


@pytest.mark.parametrize("length_mode", ["padded", "per_sequence"])
def test_noise_ratio_leaves_out_zero_embeddings(length_mode):
    """A padding_idx row is zero (nn.Embedding's init): noised (padded mode, or no mask), it has no
    noise-to-embedding ratio, and must not swamp the mean of the others'."""
    torch.manual_seed(0)
    emb = NoisyEmbedding(50, 32, padding_idx=0, noise_alpha=5.0, length_mode=length_mode)
    ids = torch.randint(1, 50, (2, 10))
    ids[1, 6:] = 0
    emb.record_noise_stats()
    noisy = emb(ids)  # no mask: every token noised, the padding too
    stats = emb.read_noise_stats()
    clean = torch.nn.functional.embedding(ids, emb.weight).double()
    ratios = (noisy.double() - clean).norm(dim=-1) / clean.norm(dim=-1)
    assert stats["noised_fraction"] == 1.0
    assert stats["noise_ratio"] == pytest.approx(ratios[ids != 0].mean().item(), rel=1e-6)
