"""What the recipes share: the model and tokenizer (a local Hugging Face path, or a tiny Llama built
from a config with a word-level tokenizer, so nothing is downloaded) and instruction pairs (a
JSON/JSONL file of ``{"instruction", "output"}`` records, or a small built-in task)."""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import transformers


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="a local Hugging Face causal LM (default: a tiny Llama from a config)")
    parser.add_argument("--data", type=Path, help='JSON or JSONL of {"instruction", "output"} (default: a toy task)')
    parser.add_argument("--alpha", type=float, default=5.0, help="NEFTune's noise_alpha")
    parser.add_argument("--max-steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--output-dir", default="/tmp/neft-example")


def _toy_pairs(n: int = 64, seed: int = 0) -> list[dict]:
    """Repeat the words after the colon: learnable by a tiny model in a few steps."""
    rng = random.Random(seed)
    words = [f"w{i}" for i in range(40)]
    pairs = []
    for _ in range(n):
        said = rng.sample(words, rng.randint(2, 8))
        pairs.append({"instruction": "repeat : " + " ".join(said), "output": " ".join(said)})
    return pairs


def instruction_pairs(path: Path | None) -> list[dict]:
    if path is None:
        return _toy_pairs()
    text = path.read_text()
    records = json.loads(text) if text.lstrip().startswith("[") else [json.loads(line) for line in text.splitlines()
                                                                     if line.strip()]
    return [{"instruction": r["instruction"] + (("\n" + r["input"]) if r.get("input") else ""), "output": r["output"]}
            for r in records]


def _tiny_tokenizer(pairs: list[dict]) -> transformers.PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = sorted({w for p in pairs for w in (p["instruction"] + " " + p["output"]).split()})
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                                unk_token="<unk>")


def model_and_tokenizer(path: str | None, pairs: list[dict]):
    if path is not None:
        tokenizer = transformers.AutoTokenizer.from_pretrained(path)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        return transformers.AutoModelForCausalLM.from_pretrained(path), tokenizer
    tokenizer = _tiny_tokenizer(pairs)
    config = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=256, pad_token_id=tokenizer.pad_token_id,
                                      eos_token_id=tokenizer.eos_token_id)
    return transformers.LlamaForCausalLM(config), tokenizer


def tokenized(pairs: list[dict], tokenizer) -> list[dict]:
    """``input_ids`` of prompt + response + eos, with ``labels`` -100 on the prompt (response-only loss)."""
    rows = []
    for p in pairs:
        prompt = tokenizer(p["instruction"] + " :", add_special_tokens=False)["input_ids"]
        response = tokenizer(" " + p["output"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append({"input_ids": prompt + response, "labels": [-100] * len(prompt) + response})
    return rows
