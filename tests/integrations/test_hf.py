"""patch_model / unpatch_model / no_noise on real transformers classes built from tiny configs."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import neft_kernels
from neft_kernels import NoisyEmbedding, no_noise, noisy_embedding, patch_model, patched, unpatch_model
from neft_kernels.integrations.hf import is_patched

from support import hf_models
from support.asserts import assert_bits_equal
from support.hf_models import ARCHS, build, packed_batch, padded_batch

ALPHA = 5.0
SEED_LOW, SEED_HIGH = -(1 << 63), (1 << 63) - 1


def _seed_of(generator_seed: int) -> torch.Tensor:
    """The seed a NoisyEmbedding with ``torch.Generator().manual_seed(generator_seed)`` draws first."""
    g = torch.Generator().manual_seed(generator_seed)
    return torch.randint(SEED_LOW, SEED_HIGH, (), dtype=torch.int64, generator=g)


def _capture(module: nn.Module) -> tuple[dict, object]:
    seen = {}
    return seen, module.register_forward_hook(lambda m, args, out: seen.update(ids=args[0], out=out.detach()))


def _expected(model_before_patch_embedding, emb_class, weight, ids, seed, **side):
    """What the embedding must output in train mode: spec v1 noise on the module's own output."""
    if emb_class is nn.Embedding:
        return noisy_embedding(ids, weight, ALPHA, seed=seed, backend="torch", **side)
    plain = model_before_patch_embedding(ids).detach()  # a subclass's forward (Gemma's scaling)
    rows = plain.reshape(-1, plain.shape[-1])
    positions = torch.arange(rows.shape[0]).view(ids.shape)
    return noisy_embedding(positions, rows, ALPHA, seed=seed, backend="torch", **side).view(plain.shape)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_patch_is_drop_in_and_unpatch_restores(arch):
    model = build(arch)
    emb = model.get_input_embeddings()
    cls, weight = type(emb), emb.weight
    keys = {k: v.clone() for k, v in model.state_dict().items()}
    tied = model.get_output_embeddings().weight is weight
    ids, mask = padded_batch()
    model.eval()
    eval_logits = model(input_ids=ids, attention_mask=mask).logits

    assert patch_model(model, ALPHA) is model
    patched_emb = model.get_input_embeddings()
    assert patched_emb is emb and isinstance(emb, NoisyEmbedding) and isinstance(emb, cls)
    assert emb.weight is weight and (model.get_output_embeddings().weight is weight) == tied
    assert list(model.state_dict()) == list(keys)
    assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, eval_logits)  # eval: no noise
    model.train()
    with no_noise():
        clean = model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(clean, eval_logits)
    loss = model(input_ids=ids, attention_mask=mask, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss) and weight.grad is not None

    patch_model(model, ALPHA)  # idempotent: one set of hooks, one class swap
    assert type(emb).__mro__.count(cls) == 1

    assert unpatch_model(model) is model
    assert type(emb) is cls and emb.weight is weight and not is_patched(model)
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())
    model.eval()
    assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, eval_logits)
    assert all(torch.equal(v, keys[k]) for k, v in model.state_dict().items())  # no optimizer step was taken


def _train_call(arch: str, generator_seed: int, **side):
    """Patch a fresh ``arch``, call it once in train mode with ``side`` inputs; return what its
    embedding output and a function giving spec v1's expected output for any side inputs."""
    model = build(arch)
    emb = model.get_input_embeddings()
    cls = type(emb)
    plain_forward = cls.forward.__get__(emb)
    ids = side.pop("input_ids")
    patch_model(model, ALPHA, generator=torch.Generator().manual_seed(generator_seed)).train()
    seen, handle = _capture(emb)
    model(input_ids=ids, **side)
    handle.remove()

    def expected(**spec_side):
        with no_noise():
            return _expected(plain_forward, cls, emb.weight, ids, _seed_of(generator_seed), **spec_side)

    return seen["out"], expected, emb


@pytest.mark.parametrize("arch", list(ARCHS))
def test_per_sequence_length_comes_from_the_models_attention_mask(arch):
    ids, mask = padded_batch()
    out, expected, emb = _train_call(arch, 7, input_ids=ids, attention_mask=mask)
    assert_bits_equal(out, expected(attention_mask=mask))
    if vars(emb)["_neft_original_class"] is nn.Embedding:  # plain: the masked tokens get no noise at all
        assert torch.equal(out[mask == 0], F.embedding(ids, emb.weight)[mask == 0].detach())


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "gemma3"])
def test_packed_rows_get_per_subsequence_length_from_position_ids(arch):
    ids, pos = packed_batch()
    out, expected, _ = _train_call(arch, 3, input_ids=ids, position_ids=pos)
    assert_bits_equal(out, expected(position_ids=pos))
    assert not torch.equal(out, expected())  # L = the whole row would differ (transformers #34659)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_packed_rows_get_per_subsequence_length_from_flash_attention_cu_seqlens(arch):
    """DataCollatorWithFlattening(return_flash_attn_kwargs=True) passes cu_seq_lens_q down the models'
    **kwargs: it alone gives each packed sequence its L, as the equivalent position_ids would."""
    ids, pos = packed_batch()
    cu = torch.tensor([0, 5, 14, 18], dtype=torch.int32)
    out, expected, _ = _train_call(arch, 3, input_ids=ids, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=9,
                                   max_length_k=9)
    assert_bits_equal(out, expected(cu_seqlens=cu))
    assert_bits_equal(out, expected(position_ids=pos))


def test_gemma_scaled_embedding_keeps_its_scale_and_noise_goes_after_it():
    model = build("gemma3")
    emb = model.get_input_embeddings()
    ids, mask = padded_batch()
    scaled = emb(ids).detach()
    assert not torch.equal(scaled, F.embedding(ids, emb.weight))  # the scale is really there
    patch_model(model, ALPHA, generator=torch.Generator().manual_seed(1)).train()
    noisy = emb(ids, attention_mask=mask).detach()
    noise = (noisy - scaled)[mask.bool()]
    bound = ALPHA / (3 * 32) ** 0.5  # the shortest row, L=3: noise is not multiplied by the scale
    assert 0 < noise.abs().max() <= bound * (1 + 1e-6)
    emb.eval()
    assert torch.equal(emb(ids), scaled)


def test_explicit_arguments_win_and_other_shapes_are_ignored():
    emb = NoisyEmbedding(10, 8, generator=torch.Generator().manual_seed(0))
    ids = torch.tensor([[1, 2, 3, 4]])
    mask = torch.tensor([[1, 1, 0, 0]])
    with emb.side_inputs(attention_mask=torch.ones(1, 6, dtype=torch.long)):  # a mask over past tokens too
        ignored = emb(ids)
    assert_bits_equal(ignored, noisy_embedding(ids, emb.weight, 5.0, seed=_seed_of(0), backend="torch"))
    emb.noise_options.generator.manual_seed(0)
    with emb.side_inputs(attention_mask=torch.ones_like(ids)):
        explicit = emb(ids, attention_mask=mask)
    assert_bits_equal(explicit, noisy_embedding(ids, emb.weight, 5.0, seed=_seed_of(0), attention_mask=mask,
                                                backend="torch"))


def test_no_noise_and_patched_context_managers():
    model = build("llama")
    ids, mask = padded_batch()
    model.train()
    clean = model(input_ids=ids, attention_mask=mask).logits
    with patched(model, ALPHA):
        assert is_patched(model)
        with no_noise():
            assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, clean)
        assert not torch.equal(model(input_ids=ids, attention_mask=mask).logits, clean)
    assert not is_patched(model) and type(model.get_input_embeddings()) is nn.Embedding
    with pytest.raises(RuntimeError, match="boom"):
        with patched(model, ALPHA):
            raise RuntimeError("boom")
    assert not is_patched(model)


def test_padded_mode_loss_equals_transformers_neftune_hook_with_the_same_noise(monkeypatch):
    """Hugging Face's hook (L = padded width, noise on every token) fed our noise gives our loss."""
    from transformers.integrations.neftune import neftune_post_forward_hook

    model = build("llama")
    ids, mask = padded_batch()
    patch_model(model, ALPHA, "padded", generator=torch.Generator().manual_seed(5)).train()
    ours = model(input_ids=ids, attention_mask=mask, labels=ids).loss
    unpatch_model(model)

    emb = model.get_input_embeddings()
    emb.neftune_noise_alpha = ALPHA
    e = neft_kernels.spec.noise(ids.numel(), emb.embedding_dim, int(_seed_of(5))).view(*ids.shape, -1)
    monkeypatch.setattr(torch.Tensor, "uniform_", lambda self, low, high: self.copy_(e * float(high)))
    handle = emb.register_forward_hook(neftune_post_forward_hook)
    theirs = model(input_ids=ids, attention_mask=mask, labels=ids).loss
    handle.remove()
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=0)
    monkeypatch.undo()
    assert not torch.equal(ours, model(input_ids=ids, attention_mask=mask, labels=ids).loss)


def test_save_pretrained_while_patched_loads_as_a_plain_model(tmp_path):
    model = build("llama_tied")
    patch_model(model, ALPHA)
    model.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path)
    emb = loaded.get_input_embeddings()
    assert type(emb) is nn.Embedding
    assert torch.equal(emb.weight, model.get_input_embeddings().weight)
    assert loaded.get_output_embeddings().weight is emb.weight


def test_refuses_models_without_input_embeddings():
    with pytest.raises(TypeError, match="get_input_embeddings"):
        patch_model(nn.Linear(2, 2))


def test_make_noisy_refuses_sparse_and_non_embeddings():
    with pytest.raises(ValueError, match="sparse"):
        neft_kernels.make_noisy(nn.Embedding(4, 2, sparse=True))
    with pytest.raises(TypeError, match="nn.Embedding"):
        neft_kernels.make_noisy(nn.Linear(2, 2))


@pytest.mark.parametrize("build_encdec", [hf_models.t5, hf_models.bart])
def test_encoder_decoder_noise_in_both_stacks_each_with_its_own_mask(build_encdec):
    """transformers 5 gives the encoder and decoder their own embedding modules tied to `shared`."""
    model = build_encdec()
    ids, mask = padded_batch()
    labels = torch.randint(2, hf_models.VOCAB, (3, 5), generator=torch.Generator().manual_seed(9))
    enc, dec = model.get_encoder().embed_tokens, model.get_decoder().embed_tokens
    assert enc is not dec and enc.weight is dec.weight
    cls = type(enc)
    plain = {name: cls.forward.__get__(m) for name, m in (("enc", enc), ("dec", dec))}
    patch_model(model, ALPHA, generator=torch.Generator().manual_seed(4)).train()
    seen = {}
    handles = [m.register_forward_hook(lambda m, a, out, k=k: seen.update({k: (a[0], out.detach())}))
               for k, m in (("enc", enc), ("dec", dec))]
    model(input_ids=ids, attention_mask=mask, labels=labels)
    for h in handles:
        h.remove()
    g = torch.Generator().manual_seed(4)
    seeds = [torch.randint(SEED_LOW, SEED_HIGH, (), dtype=torch.int64, generator=g) for _ in range(2)]
    with no_noise():
        want_enc = _expected(plain["enc"], cls, enc.weight, seen["enc"][0], seeds[0], attention_mask=mask)
        # The decoder was called without a mask: its own rows, not the encoder's padding.
        want_dec = _expected(plain["dec"], cls, dec.weight, seen["dec"][0], seeds[1])
    assert_bits_equal(seen["enc"][1], want_enc)
    assert_bits_equal(seen["dec"][1], want_dec)
    unpatch_model(model)
    assert type(enc) is cls and type(dec) is cls


def test_deepcopy_of_a_patched_model_feeds_and_unpatches_itself():
    model = patch_model(build("llama"), ALPHA)
    copy = __import__("copy").deepcopy(model)
    ids, mask = padded_batch()
    copy.train()
    emb, original = copy.get_input_embeddings(), model.get_input_embeddings()
    seen = {}
    emb.register_forward_pre_hook(lambda m, a: seen.update(frame=m._side_input_stack[-1]))
    copy(input_ids=ids, attention_mask=mask)
    assert seen["frame"][0] is mask and not original._side_input_stack
    unpatch_model(copy)
    assert type(copy.get_input_embeddings()) is nn.Embedding and not is_patched(copy) and is_patched(model)


def test_patched_restores_earlier_options():
    model = patch_model(build("llama"), ALPHA)
    with patched(model, 1.0, "padded"):
        assert model.get_input_embeddings().noise_alpha == 1.0
    emb = model.get_input_embeddings()
    assert (emb.noise_alpha, emb.noise_options.length_mode) == (ALPHA, "per_sequence") and is_patched(model)


def test_non_tensor_masks_are_ignored():
    """A dict of masks (Gemma 3, flex attention) is not a per-token mask: the noise is that of no mask
    (L = the row width), where a per-token mask of the same rows would give another."""
    model = patch_model(build("llama"), ALPHA, generator=torch.Generator().manual_seed(3))
    emb = model.get_input_embeddings().train()
    ids, mask = padded_batch()
    with emb.side_inputs(attention_mask={"full_attention": torch.ones(3, 1, 12, 12)}):
        out = emb(ids).detach()
    assert_bits_equal(out, noisy_embedding(ids, emb.weight, ALPHA, seed=_seed_of(3), backend="torch"))
    assert not torch.equal(out, noisy_embedding(ids, emb.weight, ALPHA, seed=_seed_of(3), attention_mask=mask,
                                                backend="torch"))


def test_frames_left_by_an_interrupted_call_are_dropped_by_the_next_call():
    model = patch_model(build("llama"), ALPHA).train()
    emb = model.get_input_embeddings()
    ids, mask = padded_batch()

    def interrupt(*_):
        raise KeyboardInterrupt  # skips torch's always_call hooks

    handle = model.model.layers[0].register_forward_pre_hook(interrupt)
    with pytest.raises(KeyboardInterrupt):
        model(input_ids=ids, attention_mask=mask)
    handle.remove()
    assert len(emb._side_input_stack) == 2  # LlamaForCausalLM's and LlamaModel's frames
    seen = {}
    emb.register_forward_pre_hook(lambda m, a: seen.update(depth=len(m._side_input_stack)))
    model(input_ids=ids)
    assert seen["depth"] == 2 and not emb._side_input_stack


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_noise_mask_from_side_inputs_reaches_a_patched_models_call(arch):
    """docs/huggingface.md: a mask other than the labels' is passed with ``side_inputs(noise_mask=...)``
    around the model's call; the model's hooks must neither drop it nor trip over it on exit."""
    ids, mask = padded_batch()
    noise_mask = torch.arange(ids.numel()).view(ids.shape) % 3 != 0
    model = build(arch)
    emb = model.get_input_embeddings()
    cls = type(emb)
    plain_forward = cls.forward.__get__(emb)
    patch_model(model, ALPHA, generator=torch.Generator().manual_seed(4)).train()
    seen, handle = _capture(emb)
    with emb.side_inputs(noise_mask=noise_mask):
        model(input_ids=ids, attention_mask=mask)
    handle.remove()
    assert not emb._side_input_stack
    with no_noise():
        want = _expected(plain_forward, cls, emb.weight, ids, _seed_of(4), attention_mask=mask, noise_mask=noise_mask)
    assert_bits_equal(seen["out"], want)

    def interrupt(*_):
        raise KeyboardInterrupt  # skips torch's always_call hooks: the model's frames stay behind

    handle = model.model.layers[0].register_forward_pre_hook(interrupt)
    with pytest.raises(KeyboardInterrupt), emb.side_inputs(noise_mask=noise_mask):
        model(input_ids=ids, attention_mask=mask)
    handle.remove()
    assert not emb._side_input_stack  # the block took its own frame and the interrupted call's above it
    emb.noise_options.generator.manual_seed(5)
    seen, handle = _capture(emb)
    model(input_ids=ids, attention_mask=mask)  # the block's mask not applied again
    handle.remove()
    assert not emb._side_input_stack
    with no_noise():
        want = _expected(plain_forward, cls, emb.weight, ids, _seed_of(5), attention_mask=mask)
    assert_bits_equal(seen["out"], want)


def test_lora_on_the_embedding_itself_noises_the_base_layer():
    import peft

    model = peft.get_peft_model(build("llama"), peft.LoraConfig(r=4, target_modules=["embed_tokens", "q_proj"]))
    base = [m for m in model.modules() if type(m) is nn.Embedding and m.weight.shape[0] == hf_models.VOCAB]
    assert len(base) == 1
    ids, mask = padded_batch()
    patch_model(model, ALPHA, generator=torch.Generator().manual_seed(6)).train()
    emb = base[0]
    assert isinstance(emb, NoisyEmbedding)
    seen, handle = _capture(emb)
    model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
    handle.remove()
    assert_bits_equal(seen["out"], noisy_embedding(ids, emb.weight, ALPHA, seed=_seed_of(6), attention_mask=mask,
                                                   backend="torch"))
    lora_grads = [p.grad for n, p in model.named_parameters() if "lora_embedding" in n]
    assert lora_grads and all(g is not None for g in lora_grads)


@pytest.mark.parametrize("bad", [dict(noise_alpha=-1.0), dict(noise_alpha=float("nan")),
                                 dict(length_mode="per-sequence"), dict(backend="gpu"),
                                 dict(generator="cpu")])
def test_a_refused_option_leaves_the_model_exactly_as_it_was(bad):
    """make_noisy, patch_model and patched validate every option before touching anything."""
    model = build("llama")
    emb = model.get_input_embeddings()
    hooks_before = [(len(m._forward_pre_hooks), len(m._forward_hooks)) for m in model.modules()]
    options = {"noise_alpha": 5.0, **bad}
    alpha = options.pop("noise_alpha")
    with pytest.raises((ValueError, TypeError)):
        neft_kernels.make_noisy(emb, alpha, **options)
    with pytest.raises((ValueError, TypeError)):
        patch_model(model, alpha, **options)
    with pytest.raises((ValueError, TypeError)):
        with neft_kernels.patched(model, alpha, **options):
            pass
    assert type(emb) is nn.Embedding and not is_patched(model)
    assert hooks_before == [(len(m._forward_pre_hooks), len(m._forward_hooks)) for m in model.modules()]
    ids, mask = padded_batch()
    with torch.no_grad():  # still works, exactly as an untouched model of the same weights
        logits = model.train()(input_ids=ids, attention_mask=mask).logits
        assert torch.equal(logits, build("llama").train()(input_ids=ids, attention_mask=mask).logits)


def test_misspelled_callback_option_is_refused_at_construction():
    from neft_kernels.integrations import NEFTuneCallback

    with pytest.raises(TypeError, match="noise_aplha"):
        NEFTuneCallback(noise_aplha=5.0)
    with pytest.raises(TypeError, match=r"\['shedule'\]; .*NEFTuneCallback also takes \['schedule', 'final_alpha'"):
        NEFTuneCallback(5.0, shedule="linear")
    with pytest.raises(ValueError, match="length_mode"):
        NEFTuneCallback(5.0, length_mode="per-sequence")
    assert repr(NEFTuneCallback(5.0, length_mode="padded")) == "NEFTuneCallback(noise_alpha=5.0, length_mode='padded')"
    # A decay's arguments too, all but the run's length (which train begin brings).
    with pytest.raises(ValueError, match="schedule must be one of"):
        NEFTuneCallback(5.0, schedule="linaer")
    with pytest.raises(ValueError, match="final_alpha must be finite"):
        NEFTuneCallback(5.0, schedule="cosine", final_alpha=-1.0)
    with pytest.raises(ValueError, match="warmup_steps"):
        NEFTuneCallback(5.0, schedule="linear", warmup_steps=-2)
    NEFTuneCallback(5.0, schedule="linear", final_alpha=1.0, warmup_steps=3)
    with pytest.raises(ValueError, match="callable schedule"):  # it would ignore the warm-up
        NEFTuneCallback(5.0, schedule=lambda step: 5.0, warmup_steps=3)
    NEFTuneCallback(5.0, schedule=lambda step: 5.0)


def test_from_embedding_keeps_a_subclass_forward():
    """Gemma's scaled embedding through from_embedding: the scale stays, in eval and under the noise."""
    source = build("gemma3").get_input_embeddings()
    ids, mask = padded_batch()
    scaled = source(ids).detach()
    noisy = NoisyEmbedding.from_embedding(source, 5.0, generator=torch.Generator().manual_seed(4))
    assert isinstance(noisy, type(source)) and noisy.weight is source.weight and noisy is not source
    assert type(source) is not type(noisy) and not isinstance(source, NoisyEmbedding)  # the source is untouched
    assert torch.equal(noisy.eval()(ids), scaled)
    out = noisy.train()(ids, attention_mask=mask).detach()
    noise = (out - scaled)[mask.bool()]
    assert 0 < noise.abs().max() <= 5.0 / (3 * 32) ** 0.5 * (1 + 1e-6)


def _assert_masked_noise_is_spec(model, ids, mask):
    """A train-mode call of a patched plain-embedding model: its embedding outputs spec v1 with the mask."""
    emb = model.get_input_embeddings()
    seen, handle = _capture(emb)
    torch.manual_seed(0)
    model(input_ids=ids, attention_mask=mask)
    handle.remove()
    torch.manual_seed(0)
    seed = int(torch.randint(-(1 << 63), (1 << 63) - 1, (), dtype=torch.int64))
    assert_bits_equal(seen["out"], noisy_embedding(ids, emb.weight, ALPHA, seed=seed, attention_mask=mask,
                                                   backend="torch"))


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_torch_save_of_a_patched_model_loads_back_patched_and_working(arch, tmp_path):
    model = patch_model(build(arch), ALPHA)
    torch.save(model, tmp_path / "m.pt")
    loaded = torch.load(tmp_path / "m.pt", weights_only=False)
    emb = loaded.get_input_embeddings()
    assert is_patched(loaded) and isinstance(emb, NoisyEmbedding) and type(emb).__name__ == type(
        model.get_input_embeddings()).__name__
    ids, mask = padded_batch()
    loaded.eval()
    eval_logits = loaded(input_ids=ids, attention_mask=mask).logits
    loaded.train()
    assert not torch.equal(loaded(input_ids=ids, attention_mask=mask).logits, eval_logits)
    if arch == "llama":  # the side inputs still reach the embedding through the unpickled hooks
        _assert_masked_noise_is_spec(loaded, ids, mask)
    unpatch_model(loaded)
    assert not is_patched(loaded) and not isinstance(loaded.get_input_embeddings(), NoisyEmbedding)


@pytest.mark.parametrize("how", ["resize_token_embeddings", "set_input_embeddings"])
def test_a_resized_or_replaced_input_embedding_keeps_the_noise(how):
    """transformers' resize keeps the module and swaps its weight; a module set anew (an older resize
    path, or the user's) is made noisy by the model's next call, with the patch's options."""
    model = patch_model(build("llama"), ALPHA)
    if how == "resize_token_embeddings":
        model.resize_token_embeddings(hf_models.VOCAB + 8)
    else:
        model.set_input_embeddings(nn.Embedding(hf_models.VOCAB + 8, 32))
        assert type(model.get_input_embeddings()) is nn.Embedding
    ids, mask = padded_batch()
    model.train()(input_ids=ids, attention_mask=mask)  # the next call makes a new embedding noisy
    emb = model.get_input_embeddings()
    assert isinstance(emb, NoisyEmbedding) and emb.num_embeddings == hf_models.VOCAB + 8
    _assert_masked_noise_is_spec(model, ids, mask)


def test_half_and_to_keep_a_patched_model_working():
    model = patch_model(build("llama"), ALPHA).half().to(torch.float32).to("cpu")
    ids, mask = padded_batch()
    assert torch.isfinite(model.train()(input_ids=ids, attention_mask=mask, labels=ids).loss)


def test_an_embedding_made_plain_by_hand_stays_plain():
    model = patch_model(build("llama"), ALPHA)
    emb = neft_kernels.make_plain(model.get_input_embeddings())
    ids, mask = padded_batch()
    model.train()(input_ids=ids, attention_mask=mask)
    assert type(model.get_input_embeddings()) is nn.Embedding
    unpatch_model(model)
    assert "_neft_made_plain" not in vars(emb)


def test_transformers_hook_on_a_peft_wrapper_is_found_and_refused():
    """transformers' activate_neftune hooks a PEFT model's get_input_embeddings(), a LoRA wrapper."""
    peft = pytest.importorskip("peft")
    from transformers.integrations.neftune import neftune_post_forward_hook

    from neft_kernels.integrations.hf import other_neftune, remove_other_neftune

    model = peft.get_peft_model(build("llama"), peft.LoraConfig(r=4, target_modules=["embed_tokens", "q_proj"]))
    wrapper = model.get_input_embeddings()
    assert not isinstance(wrapper, nn.Embedding)
    wrapper.neftune_noise_alpha = 5.0
    wrapper.register_forward_hook(neftune_post_forward_hook)
    assert len(other_neftune(model)) == 2
    with pytest.raises(RuntimeError, match="neftune_post_forward_hook"):
        patch_model(model, ALPHA)
    assert remove_other_neftune(model) == 2 and not other_neftune(model)
    patch_model(model, ALPHA)
    assert is_patched(model)


def test_a_call_with_inputs_embeds_only_is_untouched():
    """A model called with inputs_embeds (a multimodal front end, say) never calls its embedding:
    nothing to noise, as with transformers' hook; the patch must not get in the way."""
    model = build("llama")
    ids, mask = padded_batch()
    embeds = model.get_input_embeddings()(ids).detach()
    model.train()
    with torch.no_grad():
        plain = model(inputs_embeds=embeds, attention_mask=mask).logits
    patch_model(model, ALPHA)
    with torch.no_grad():
        assert torch.equal(model(inputs_embeds=embeds, attention_mask=mask).logits, plain)


def test_patching_says_once_what_it_patched(caplog):
    import logging

    model = build("llama")
    with caplog.at_level(logging.INFO, logger="neft_kernels"):
        patch_model(model, ALPHA)
        patch_model(model, 3.0)  # an update of the options: not said again
    said = [r.getMessage() for r in caplog.records if r.name == "neft_kernels"]
    assert len(said) == 1 and "model.embed_tokens" in said[0] and "noise_alpha=5.0" in said[0], said
    assert neft_kernels.is_patched(model) and "noise_alpha=3.0" in repr(model.get_input_embeddings())


def test_patched_restores_exactly_the_state_it_found():
    """A hand-built NoisyEmbedding keeps its options; a model made noisy by hand gets no leftover hooks;
    an embedding made plain by hand comes back plain (and stays plain)."""
    model = build("llama")
    model.set_input_embeddings(NoisyEmbedding.from_embedding(model.get_input_embeddings(), 1.0))
    with patched(model, 5.0):
        assert model.get_input_embeddings().noise_alpha == 5.0
    assert model.get_input_embeddings().noise_alpha == 1.0 and not is_patched(model)

    model = build("llama")
    neft_kernels.make_noisy(model.get_input_embeddings(), 2.0)
    with patched(model, 5.0):
        pass
    assert not any(m._forward_pre_hooks for m in model.modules())
    assert model.get_input_embeddings().noise_alpha == 2.0 and "_neft_patch_options" not in vars(model)

    model = patch_model(build("llama"), ALPHA)
    neft_kernels.make_plain(model.get_input_embeddings())
    with patched(model, 5.0):
        assert isinstance(model.get_input_embeddings(), NoisyEmbedding)
    assert type(model.get_input_embeddings()) is nn.Embedding
    ids, mask = padded_batch()
    model.train()(input_ids=ids, attention_mask=mask)
    assert type(model.get_input_embeddings()) is nn.Embedding  # still plain after a call


def test_from_embedding_of_a_patched_scaled_embedding_keeps_the_scale_and_drops_its_hooks():
    from transformers.integrations.neftune import neftune_post_forward_hook

    source = build("gemma3").get_input_embeddings()
    ids, _ = padded_batch()
    scaled = source(ids).detach()
    neft_kernels.make_noisy(source, 1.0)
    source.register_forward_hook(neftune_post_forward_hook)  # would add noise twice if copied
    copy_ = NoisyEmbedding.from_embedding(source, 5.0)
    assert torch.equal(copy_.eval()(ids), scaled) and not copy_._forward_hooks
    assert copy_.weight is source.weight and source.noise_alpha == 1.0

    class Mine(NoisyEmbedding):
        pass

    with pytest.raises(TypeError, match="NoisyEmbedding.from_embedding"):
        Mine.from_embedding(build("gemma3").get_input_embeddings())


@pytest.mark.parametrize("entry_alpha", [None, 2.0])
def test_patched_exit_takes_care_of_embeddings_made_noisy_inside_the_block(entry_alpha):
    """An input embedding replaced inside the block, and PEFT's modules_to_save copy, follow the
    restore: plain again when the block was entered plain, the entry options when entered patched."""
    peft = pytest.importorskip("peft")
    model = build("llama")
    if entry_alpha is not None:
        patch_model(model, entry_alpha, length_mode="padded")
    with patched(model, ALPHA):
        replaced = nn.Embedding(hf_models.VOCAB, 32)
        model.set_input_embeddings(replaced)
        ids, mask = padded_batch()
        model.train()(input_ids=ids, attention_mask=mask)  # the call makes the replacement noisy
        assert isinstance(replaced, NoisyEmbedding)
    if entry_alpha is None:
        assert type(replaced) is nn.Embedding and not is_patched(model)
    else:
        assert replaced.noise_alpha == entry_alpha and replaced.noise_options.length_mode == "padded"
    unpatch_model(model)
    with patched(model, ALPHA):
        lora = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj"],
                                                          modules_to_save=["embed_tokens"]))
        assert sum(isinstance(m, NoisyEmbedding) for m in lora.modules()) == 2
    assert not any(isinstance(m, NoisyEmbedding) for m in lora.modules()) and not is_patched(lora)


def test_unpatch_inside_a_block_entered_patched_is_undone_on_exit():
    model = patch_model(build("llama"), 2.0)
    with patched(model, ALPHA):
        unpatch_model(model)
    emb = model.get_input_embeddings()
    assert isinstance(emb, NoisyEmbedding) and emb.noise_alpha == 2.0 and is_patched(model)
    ids, mask = padded_batch()
    seen, hook = _capture(emb)
    model.train()(input_ids=ids, attention_mask=mask)
    hook.remove()
    noise = (seen["out"] - F.embedding(ids, emb.weight))[mask.bool()]
    assert 0 < noise.abs().max() <= 2.0 / (3 * 32) ** 0.5 * (1 + 1e-5)  # alpha 2; L = 3 in the shortest row


def test_labels_that_do_not_index_the_input_tokens_are_refused_for_response_noise():
    with pytest.raises(ValueError, match="encoder-decoder's labels"):
        patch_model(hf_models.t5(), ALPHA, noise_tokens="response")
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=hf_models.VOCAB, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                      num_labels=2, pad_token_id=0)
    model = patch_model(transformers.LlamaForSequenceClassification(config), ALPHA, noise_tokens="prompt").train()
    ids, mask = padded_batch()
    with pytest.raises(ValueError, match="labels of shape \\(3,\\), ids of shape \\(3, 12\\)"):
        model(input_ids=ids, attention_mask=mask, labels=torch.tensor([0, 1, 0]))


def test_a_deep_copy_draws_from_the_users_generator():
    """PEFT's modules_to_save copy and TRL's reference model are deep copies: NoiseOptions is
    immutable and keeps the generator object itself."""
    g = torch.Generator().manual_seed(2)
    model = patch_model(build("llama"), ALPHA, generator=g)
    copy = __import__("copy").deepcopy(model)
    assert copy.get_input_embeddings().noise_options.generator is g
