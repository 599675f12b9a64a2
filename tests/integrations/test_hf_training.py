"""NEFTuneCallback with transformers' Trainer and TRL's SFTTrainer; PEFT models; end to end. The tests
that train (a Trainer's or TRL's train()) are marked slow."""

import pytest
import torch
from torch import nn

# Optional dependencies (the `hf` extra): a missing one skips this file, or (TRL and datasets, which
# the GPU image lacks) only the tests that use them; none breaks collection.
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from neft_kernels import NoisyEmbedding, no_noise, noisy_embedding, patch_model, unpatch_model  # noqa: E402
from neft_kernels.integrations import NEFTuneCallback  # noqa: E402
from neft_kernels.integrations.hf import is_patched  # noqa: E402

from support.asserts import assert_bits_equal  # noqa: E402
from support.hf_models import VOCAB, build, padded_batch  # noqa: E402
from support.hf_training import ALPHA, Probe, Rows, collate, run_args  # noqa: E402


@pytest.mark.slow
def test_trainer_with_callback_trains_noisy_and_leaves_a_plain_model(tmp_path):
    model = build("llama_tied")
    weight = model.get_input_embeddings().weight
    before = weight.detach().clone()
    probe = Probe()
    trainer = transformers.Trainer(model=model, args=run_args(tmp_path), train_dataset=Rows(), data_collator=collate,
                                   callbacks=[NEFTuneCallback(noise_alpha=ALPHA), probe])
    result = trainer.train()
    assert probe.patched_during == [True, True, True]
    assert torch.isfinite(torch.tensor(result.training_loss))
    emb = model.get_input_embeddings()
    assert type(emb) is nn.Embedding and emb.weight is weight and not is_patched(model)
    assert not torch.equal(weight.detach(), before)  # it trained
    assert model.get_output_embeddings().weight is weight

    trainer.save_model(str(tmp_path / "final"))
    loaded = type(model).from_pretrained(str(tmp_path / "final"))
    assert type(loaded.get_input_embeddings()) is nn.Embedding
    assert torch.equal(loaded.get_input_embeddings().weight, weight.detach())


@pytest.mark.slow
def test_callback_unpatches_when_training_raises(tmp_path):
    model = build("llama")
    probe = Probe(fail_at_step=1)
    trainer = transformers.Trainer(model=model, args=run_args(tmp_path), train_dataset=Rows(), data_collator=collate,
                                   callbacks=[NEFTuneCallback(noise_alpha=ALPHA), probe])
    with pytest.raises(RuntimeError, match="training failed"):
        trainer.train()
    assert probe.patched_during == [True, True]
    assert type(model.get_input_embeddings()) is nn.Embedding and not is_patched(model)


def test_callback_refuses_transformers_own_neftune(tmp_path):
    with pytest.raises(ValueError, match="neftune_noise_alpha.*|NEFTuneCallback") as info:
        transformers.Trainer(model=build("llama"), args=run_args(tmp_path, neftune_noise_alpha=5.0),
                             train_dataset=Rows(), data_collator=collate, callbacks=[NEFTuneCallback(ALPHA)])
    assert "NEFTuneCallback" in str(info.value) and "neftune_noise_alpha" in str(info.value)


@pytest.mark.slow
def test_callback_added_late_next_to_the_flag_refuses_and_leaves_no_hook(tmp_path):
    """add_callback after construction: the refusal comes at train(), after transformers attached its
    hook; the callback takes that hook off again, so a retry without the flag trains with ours only."""
    model = build("llama")
    trainer = transformers.Trainer(model=model, args=run_args(tmp_path, neftune_noise_alpha=5.0), train_dataset=Rows(),
                                   data_collator=collate)
    trainer.add_callback(NEFTuneCallback(ALPHA))
    with pytest.raises(ValueError, match="neftune_noise_alpha"):
        trainer.train()
    emb = model.get_input_embeddings()
    assert not emb._forward_hooks and not hasattr(emb, "neftune_noise_alpha") and not is_patched(model)
    probe = Probe()
    transformers.Trainer(model=model, args=run_args(tmp_path), train_dataset=Rows(), data_collator=collate,
                         callbacks=[NEFTuneCallback(ALPHA), probe]).train()
    assert probe.patched_during == [True] * 3


def test_patch_model_refuses_next_to_another_neftune_hook():
    from transformers.integrations.neftune import neftune_post_forward_hook

    from neft_kernels.integrations.hf import remove_other_neftune

    model = build("llama")
    emb = model.get_input_embeddings()
    emb.neftune_noise_alpha = 5.0
    emb.register_forward_hook(neftune_post_forward_hook)
    with pytest.raises(RuntimeError, match="neftune_post_forward_hook.*remove_other_neftune"):
        patch_model(model, ALPHA)
    assert type(emb) is nn.Embedding and not is_patched(model)
    assert remove_other_neftune(model) == 2
    patch_model(model, ALPHA)
    ids, mask = padded_batch()
    clean = nn.functional.embedding(ids, emb.weight).detach()
    noise = (emb.train()(ids, attention_mask=mask).detach() - clean)[mask.bool()]
    assert noise.abs().max() <= ALPHA / (3 * 32) ** 0.5 * (1 + 1e-6)  # one noise, within its bound


@pytest.mark.slow
def test_callback_keeps_a_patch_the_user_applied_before_training(tmp_path):
    model = patch_model(build("llama"), 3.0, length_mode="padded")
    transformers.Trainer(model=model, args=run_args(tmp_path), train_dataset=Rows(), data_collator=collate,
                         callbacks=[NEFTuneCallback(ALPHA)]).train()
    emb = model.get_input_embeddings()
    assert is_patched(model) and emb.noise_alpha == 3.0 and emb.noise_options.length_mode == "padded"


@pytest.mark.parametrize("modules_to_save", [None, ["embed_tokens"]])
def test_peft_lora_model_is_patched_and_trains(modules_to_save):
    model = build("llama")
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                      modules_to_save=modules_to_save))
    ids, mask = padded_batch()
    lora.eval()
    eval_logits = lora(input_ids=ids, attention_mask=mask).logits
    patch_model(lora, ALPHA, generator=torch.Generator().manual_seed(2)).train()
    active = [m for m in lora.modules() if isinstance(m, NoisyEmbedding)]
    assert len(active) == (1 if modules_to_save is None else 2)  # the original and the trainable copy
    captured = {}
    hooks = [m.register_forward_hook(lambda m, a, out: captured.update(emb=m, ids=a[0], out=out.detach()))
             for m in active]
    loss = lora(input_ids=ids, attention_mask=mask, labels=ids).loss
    loss.backward()
    for h in hooks:
        h.remove()
    seed = torch.randint(-(1 << 63), (1 << 63) - 1, (), dtype=torch.int64, generator=torch.Generator().manual_seed(2))
    assert_bits_equal(captured["out"], noisy_embedding(ids, captured["emb"].weight, ALPHA, seed=seed,
                                                       attention_mask=mask, backend="torch"))
    lora_grads = [p.grad for n, p in lora.named_parameters() if "lora_" in n]
    assert lora_grads and all(g is not None for g in lora_grads)
    trainable_embedding = captured["emb"].weight
    assert (trainable_embedding.grad is not None) == (modules_to_save is not None)
    unpatch_model(lora)
    lora.eval()
    assert torch.equal(lora(input_ids=ids, attention_mask=mask).logits, eval_logits)
    assert not any(isinstance(m, NoisyEmbedding) for m in lora.modules())


def _tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"t{i}": i for i in range(VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="t0", eos_token="t1", unk_token="t0")


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["packing", "padding_free"])
def test_trl_sft_trainer_packed_rows_get_per_subsequence_noise(tmp_path, mode):
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(2, VOCAB, (int(torch.randint(3, 10, (), generator=g)),), generator=g).tolist()
            for _ in range(24)]
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    data = datasets.Dataset.from_dict({"input_ids": rows})
    config = trl.SFTConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, report_to=[],
                           use_cpu=True, save_strategy="no", disable_tqdm=True,
                           max_length=32 if mode == "packing" else None, packing=mode == "packing",
                           padding_free=mode == "padding_free")
    model = build("llama")
    seen, batches = [], []  # what the embedding returned; the position_ids the collator produced

    def record(emb, args, out):
        seen.append((args[0], out.detach(), emb.weight.detach().clone()))

    class _Hook(transformers.TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kw):
            emb = model.get_input_embeddings()
            if not getattr(emb, "_probe", None):
                emb._probe = emb.register_forward_hook(record)
                model.register_forward_pre_hook(lambda m, a, k: batches.append(k.get("position_ids")),
                                                with_kwargs=True)
                seeds, draw = [], emb._draw_seed
                emb._draw_seed = lambda *a: seeds.append(draw(*a)) or seeds[-1]
                emb._seeds = seeds

    trainer = trl.SFTTrainer(model=model, args=config, train_dataset=data, processing_class=_tiny_tokenizer(),
                             callbacks=[NEFTuneCallback(ALPHA), _Hook()])
    trainer.train()
    assert type(model.get_input_embeddings()) is nn.Embedding
    emb_seeds = model.get_input_embeddings().__dict__["_seeds"]
    assert len(seen) == len(batches) == 2
    for (ids, out, weight), pos, seed in zip(seen, batches, emb_seeds, strict=True):  # one seed per call
        assert pos is not None and ids.shape[0] == 1 and int((pos == 0).sum()) > 1  # several sequences per row
        with no_noise():
            want = noisy_embedding(ids, weight, ALPHA, seed=seed, position_ids=pos, backend="torch")
            whole_row = noisy_embedding(ids, weight, ALPHA, seed=seed, backend="torch")
        assert_bits_equal(out, want)
        assert not torch.equal(out, whole_row)


class _Losses(transformers.TrainerCallback):
    def __init__(self):
        self.losses = []

    def on_log(self, args, state, control, logs=None, **kw):
        if logs and "loss" in logs:
            self.losses.append(logs["loss"])


def _loss_curve(tmp_path, seed: int, flag: bool, steps: int, alpha: float = ALPHA * 3) -> list[float]:
    """A tiny Llama fine-tuned for ``steps`` steps with transformers' NEFTune flag or our callback in
    padded mode (the same law of noise: L = padded width, every token noised); ``seed`` drives the
    weights, the data order and the noise alike."""
    torch.manual_seed(seed)
    model = build("llama", seed=0)  # the same initial weights in every run
    losses = _Losses()
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=8, learning_rate=2e-2, report_to=[],
        use_cpu=True, save_strategy="no", logging_steps=1, disable_tqdm=True, seed=seed,
        neftune_noise_alpha=alpha if flag else None)
    callbacks = [losses] if flag else [NEFTuneCallback(alpha, length_mode="padded"), losses]
    transformers.Trainer(model=model, args=args, train_dataset=_Counting(), data_collator=collate,
                         callbacks=callbacks).train()
    return losses.losses


class _Counting(Rows):
    """Learnable rows: counting upwards from a random token, of varied lengths (so padded batches)."""

    def __init__(self, n: int = 64):
        super().__init__(n)
        self.rows = [2 + (r[0] + torch.arange(len(r))) % (VOCAB - 2) for r in self.rows]


def _curves_agree(ours: torch.Tensor, theirs: torch.Tensor) -> bool:
    """(seeds, steps) loss curves: per step, the means differ by at most 3 standard errors (plus a
    little) at 90% of the steps, and so do the last ten steps' means by 3 seed-to-seed deviations."""
    gap = (ours.mean(0) - theirs.mean(0)).abs()  # per step, across seeds
    spread = torch.maximum(ours.std(0), theirs.std(0)) / ours.shape[0] ** 0.5  # standard error of a mean
    return bool((gap <= 3 * spread + 0.02).float().mean() >= 0.9
                and abs(ours[:, -10:].mean() - theirs[:, -10:].mean()) <= 3 * ours[:, -10:].mean(1).std() + 0.02)


@pytest.mark.slow
def test_loss_curves_agree_with_transformers_own_neftune_within_the_seed_spread(tmp_path):
    """Convergence evidence: the two implementations give loss curves that differ by no more than
    runs of one implementation differ among themselves (only the random stream differs); the same
    check tells half or twice the alpha apart."""
    steps, seeds = 40, range(4)
    ours = torch.tensor([_loss_curve(tmp_path, s, flag=False, steps=steps) for s in seeds])
    theirs = torch.tensor([_loss_curve(tmp_path, s, flag=True, steps=steps) for s in seeds])
    assert ours.shape == theirs.shape == (len(seeds), steps)
    assert ours[:, -5:].mean() < ours[:, :5].mean() - 0.5  # it learns
    assert _curves_agree(ours, theirs)
    for factor in (0.5, 2.0):
        other = torch.tensor([_loss_curve(tmp_path, s, flag=False, steps=steps, alpha=ALPHA * 3 * factor)
                              for s in seeds])
        assert not _curves_agree(other, theirs), factor


@pytest.mark.slow
def test_trl_dpo_reference_pass_is_clean_and_policy_pass_noised(tmp_path):
    """TRL's DPO computes reference log-probs from the same PEFT model, adapter disabled, under
    no_grad and in train mode: that pass gets no noise; the policy pass does."""
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    g = torch.Generator().manual_seed(0)

    def text(n):
        return " ".join(f"t{int(t)}" for t in torch.randint(2, VOCAB, (n,), generator=g))

    data = datasets.Dataset.from_dict({"prompt": [text(5) for _ in range(8)], "chosen": [text(4) for _ in range(8)],
                                       "rejected": [text(3) for _ in range(8)]})
    model = peft.get_peft_model(build("llama"), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    calls = []

    class _Record(transformers.TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kw):
            for emb in (m for m in model.modules() if isinstance(m, NoisyEmbedding)):
                emb.register_forward_hook(lambda m, a, out: calls.append(
                    (torch.is_grad_enabled(), torch.equal(out, nn.functional.embedding(a[0], m.weight)))))

    config = trl.DPOConfig(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=4, report_to=[],
                           use_cpu=True, save_strategy="no", disable_tqdm=True, max_length=32)
    trl.DPOTrainer(model=model, args=config, train_dataset=data, processing_class=_tiny_tokenizer(),
                   callbacks=[NEFTuneCallback(ALPHA), _Record()]).train()
    reference = [clean for grad, clean in calls if not grad]
    policy = [clean for grad, clean in calls if grad]
    assert reference and all(reference)  # the reference pass: plain embeddings
    assert policy and not any(policy)  # the policy pass: noised


@pytest.mark.slow
def test_callback_reused_across_trainers_restores_after_a_failed_run(tmp_path):
    """One callback, several Trainers: each is wrapped (by object, not id), and a run that raised is
    restored by then; the model ends plain."""
    model = build("llama")
    callback = NEFTuneCallback(ALPHA)
    for fail in (True, False, True):
        trainer = transformers.Trainer(model=model, args=run_args(tmp_path), train_dataset=Rows(),
                                       data_collator=collate, callbacks=[callback, Probe(1 if fail else None)])
        if fail:
            with pytest.raises(RuntimeError, match="training failed"):
                trainer.train()
        else:
            trainer.train()
        assert not is_patched(model)
        del trainer


class _AlphaProbe(transformers.TrainerCallback):
    """The alpha every forward of each step used, and whether statistics were being recorded."""

    def __init__(self):
        self.alphas, self.recording = [], []

    def on_step_end(self, args, state, control, model=None, **kw):
        emb = model.get_input_embeddings()
        self.alphas.append(emb.noise_alpha)
        self.recording.append(emb._noise_stats is not None)


@pytest.mark.slow
def test_callback_schedule_sets_alpha_per_step_and_logs_the_noise(tmp_path):
    model = build("llama")
    probe = _AlphaProbe()
    trainer = transformers.Trainer(
        model=model, args=run_args(tmp_path, max_steps=5, logging_steps=2), train_dataset=Rows(32),
        data_collator=collate,
        callbacks=[NEFTuneCallback(noise_alpha=8.0, schedule="linear", final_alpha=0.0, warmup_steps=1), probe])
    trainer.train()
    assert probe.alphas == pytest.approx([0.0, 8.0, 6.0, 4.0, 2.0])  # HF convention: final alpha at max_steps
    # recorded on the logging steps (2 and 4) only; read, and so stopped, when the Trainer logged
    assert probe.recording == [False, True, False, True, False]
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["step"] for h in logs] == [2, 4]
    assert [h["neftune_alpha"] for h in logs] == pytest.approx([8.0, 4.0])
    for h in logs:
        assert 0 < h["neftune_noised_fraction"] <= 1 and 4 <= h["neftune_mean_length"] <= 12
        assert h["neftune_noise_ratio"] > 0
    callback = next(c for c in trainer.callback_handler.callbacks if isinstance(c, NEFTuneCallback))
    assert repr(callback) == "NEFTuneCallback(noise_alpha=8.0, schedule='linear', final_alpha=0.0, warmup_steps=1)"


@pytest.mark.slow
def test_callback_response_only_noise_from_the_labels(tmp_path):
    model = build("llama")
    probe = Probe()
    seen = []
    emb = model.get_input_embeddings()

    def collate_with_prompt(items):
        batch = collate(items)
        batch["labels"][:, :3] = -100  # the prompt
        seen.append(batch)
        return batch

    trainer = transformers.Trainer(model=model, args=run_args(tmp_path, max_steps=1, logging_steps=1),
                                   train_dataset=Rows(), data_collator=collate_with_prompt,
                                   callbacks=[NEFTuneCallback(noise_alpha=ALPHA, noise_tokens="response"), probe])
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h][0]
    batch = seen[0]  # the step's batch (the loader may collate ahead)
    response = ((batch["labels"] != -100) & (batch["attention_mask"] != 0)).sum() / batch["input_ids"].numel()
    assert logs["neftune_noised_fraction"] == pytest.approx(response.item())
    assert type(emb) is nn.Embedding


class _Recording(transformers.TrainerCallback):
    """Per step, which noisy embeddings were recording statistics as it ended."""

    def __init__(self):
        self.steps = []

    def on_step_end(self, args, state, control, model=None, **kw):
        self.steps.append([m._noise_stats is not None for m in model.modules() if isinstance(m, NoisyEmbedding)])


@pytest.mark.slow
def test_callback_logs_the_statistics_of_every_stack_and_stops_each_recording(tmp_path):
    """An encoder-decoder has two noisy embeddings that are called: the log counts the noised tokens
    of both (the encoder's L = 10, the decoder's 4), and neither records past a logging step."""
    from support import hf_models

    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": torch.randint(2, VOCAB, (10,), generator=g),
             "labels": torch.randint(2, VOCAB, (4,), generator=g)} for _ in range(16)]
    recording = _Recording()
    trainer = transformers.Trainer(model=hf_models.bart(), args=run_args(tmp_path, max_steps=3, logging_steps=2),
                                   train_dataset=rows, callbacks=[NEFTuneCallback(noise_alpha=ALPHA), recording])
    trainer.train()
    assert [any(step) for step in recording.steps] == [False, True, False]
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert logs[0]["neftune_noised_fraction"] == 1.0
    assert logs[0]["neftune_mean_length"] == pytest.approx((10 * 10 + 4 * 4) / 14)
