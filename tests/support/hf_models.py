"""Tiny Hugging Face models built from configs (no downloads), one per architecture family."""

import torch
import transformers

VOCAB = 96


def _llama_like(config_cls, model_cls, **extra):
    def build():
        config = config_cls(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, **extra)
        return model_cls(config)
    return build


def _gpt2():
    # No dropout: train-mode logits without noise must equal eval's, as for the other families.
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4,
                                                                n_positions=128, bos_token_id=1, eos_token_id=1,
                                                                resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))


def _gemma3():
    config = transformers.Gemma3TextConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                           max_position_embeddings=128, sliding_window=16)
    return transformers.Gemma3ForCausalLM(config)


def _encoder(config_cls, model_cls):
    """Encoder-only (BERT family): its embeddings module takes position_ids but not the mask."""
    def build():
        config = config_cls(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=128, hidden_dropout_prob=0.0,
                            attention_probs_dropout_prob=0.0, pad_token_id=0)
        return model_cls(config)
    return build


ARCHS = {
    "llama": _llama_like(transformers.LlamaConfig, transformers.LlamaForCausalLM),
    "llama_tied": _llama_like(transformers.LlamaConfig, transformers.LlamaForCausalLM, tie_word_embeddings=True),
    "qwen2": _llama_like(transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    "mistral": _llama_like(transformers.MistralConfig, transformers.MistralForCausalLM),
    "gpt2": _gpt2,
    "gemma3": _gemma3,
    "bert": _encoder(transformers.BertConfig, transformers.BertForMaskedLM),
    "roberta": _encoder(transformers.RobertaConfig, transformers.RobertaForMaskedLM),
}


def build(arch: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return ARCHS[arch]().float()


def padded_batch(seed: int = 0):
    """(ids, mask): three rows of real lengths 12, 7 and 3, right-padded to 12."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (3, 12), generator=g)
    mask = (torch.arange(12)[None] < torch.tensor([[12], [7], [3]])).long()
    return ids * mask, mask


def packed_batch(seed: int = 0):
    """(ids, position_ids): sequences of 5, 9 and 4 tokens packed into one row, as
    ``DataCollatorWithFlattening`` and TRL's padding-free collator lay them out."""
    g = torch.Generator().manual_seed(seed)
    lengths = [5, 9, 4]
    ids = torch.randint(2, VOCAB, (1, sum(lengths)), generator=g)
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    return ids, pos


def t5():
    torch.manual_seed(0)
    config = transformers.T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4,
                                   decoder_start_token_id=0, pad_token_id=0, dropout_rate=0.0)
    return transformers.T5ForConditionalGeneration(config)


def bart():
    torch.manual_seed(0)
    config = transformers.BartConfig(vocab_size=VOCAB, d_model=32, encoder_layers=1, decoder_layers=1,
                                     encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                                     decoder_ffn_dim=64, max_position_embeddings=64, dropout=0.0,
                                     pad_token_id=0, bos_token_id=1, eos_token_id=1, decoder_start_token_id=1,
                                     forced_eos_token_id=None)
    return transformers.BartForConditionalGeneration(config)
