"""examples/neftune_findings.py: its metrics on hand-computed cases, its data reading, and an end-to-end run
on a tiny random Llama with a tokenizer built offline."""

import importlib.util
import json
import math
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import neft_kernels

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _load_script():
    spec = importlib.util.spec_from_file_location("neftune_findings", EXAMPLES / "neftune_findings.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


nf = _load_script()


def _gaussian_available() -> bool:
    try:
        neft_kernels.make_noisy(torch.nn.Embedding(2, 2), 1.0, distribution="gaussian")
    except (TypeError, ValueError):
        return False
    return True


# ---------------------------------------------------------------------------------------- metrics

def test_rep_n_and_log_diversity():
    tokens = ["a", "b"] * 3
    # 2-grams: ab ba ab ba ab (2 unique of 5); 3-grams: 2 of 4; 4-grams: 2 of 3.
    assert nf.rep_n(tokens, 2) == pytest.approx(60.0)
    assert nf.rep_n(tokens, 3) == pytest.approx(50.0)
    assert nf.rep_n(tokens, 4) == pytest.approx(100 / 3)
    assert nf.log_diversity(tokens) == pytest.approx(math.log(0.4 * 0.5 * (2 / 3)))
    assert nf.rep_n(["one", "two", "three", "four"], 2) == 0.0
    assert nf.log_diversity(["one", "two", "three", "four"]) == 0.0


def test_rouge_l():
    # LCS "the cat on the mat" = 5 of 6 on both sides.
    assert nf.rouge_l("the cat sat on the mat", "the cat is on the mat") == pytest.approx(500 / 6)
    # Lowercased; LCS "b d": P = 2/4, R = 2/3, F1 = 4/7.
    assert nf.rouge_l("A B C D", "b d e") == pytest.approx(400 / 7)
    assert nf.rouge_l("x y", "z") == 0.0
    assert nf.lcs_length("abcbdab", "bdcaba") == 4


def test_bleu4():
    # p1 = 5/6; p2 = (3+1)/(5+1); p3 = (1+1)/(4+1); p4 = (0+1)/(3+1); equal lengths, no brevity penalty.
    assert nf.bleu4("the cat sat on the mat", "the cat is on the mat") == pytest.approx(100 * (1 / 18) ** 0.25)
    # Every n-gram matches (the empty 3- and 4-gram sets count 1/1): the brevity penalty exp(1 - 6/2) alone.
    assert nf.bleu4("The cat", "the cat sat on the mat") == pytest.approx(100 * math.exp(-2))
    assert nf.bleu4("the cat sat on the mat", "the cat sat on the mat") == pytest.approx(100.0)
    assert nf.bleu4("dog", "the cat") == 0.0
    assert nf.bleu4("", "the cat") == 0.0


def test_generation_metrics_drop_short_answers_from_diversity():
    answers = ["a b a b a b extra words", "too short"]
    metrics = nf.generation_metrics(answers, ["a b", "too short"], chunk=6)
    assert metrics["div_answers"] == 1
    assert metrics["rep2"] == pytest.approx(60.0)  # the first 6 words of the long answer only
    assert metrics["gen_words"] == pytest.approx((8 + 2) / 2)
    assert metrics["gen_chars"] == pytest.approx((len(answers[0]) + len(answers[1])) / 2)
    assert metrics["rouge_l"] == pytest.approx((100 * 2 * (2 / 8) * 1 / (2 / 8 + 1) + 100) / 2)


# ------------------------------------------------------------------------------------------ data

def test_stream_reads_a_truncated_array_and_jsonl(tmp_path):
    records = [{"i": i, "text": "x" * i} for i in range(20)]
    whole = json.dumps(records, indent=2)
    truncated = tmp_path / "cut.json"
    truncated.write_text(whole[:whole.index('"i": 12')])  # cut inside record 12
    assert list(nf.stream_json_records(truncated, chunk_chars=7)) == records[:12]
    lines = tmp_path / "all.jsonl"
    lines.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    assert list(nf.stream_json_records(lines, chunk_chars=5)) == records


def test_record_to_pair():
    assert nf.record_to_pair({"instruction": "Add", "input": "1 2", "output": " 3 "}) == ("Add\n\n1 2", "3")
    assert nf.record_to_pair({"instruction": "Say hi", "input": None, "output": "hi"}) == ("Say hi", "hi")
    conversation = [{"from": "system", "value": "s"}, {"from": "human", "value": "q1"},
                    {"from": "gpt", "value": "a1"}, {"from": "human", "value": "q2"}, {"from": "gpt", "value": "a2"}]
    assert nf.record_to_pair({"conversations": conversation}) == ("q1", "a1")
    assert nf.record_to_pair({"conversations": [{"from": "gpt", "value": "a"}]}) is None


def test_grid_runs_alpha_zero_once_per_seed():
    assert nf.grid([0, 5], ["uniform", "gaussian"], [0, 1]) == [
        (0, None, 0), (0, None, 1), (5, "uniform", 0), (5, "uniform", 1), (5, "gaussian", 0), (5, "gaussian", 1)]


def test_training_batch_labels_only_the_response():
    example = nf.Example("a", prompt_ids=[5, 6, 7], response_ids=[8, 9])
    short = nf.Example("a", prompt_ids=[5], response_ids=[9])
    batch = nf.training_batch([example, short], pad=0)
    assert batch["labels"].tolist() == [[-100, -100, -100, 8, 9], [-100, 9, -100, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    prompts = nf.prompt_batch([example, short], pad=0)
    assert prompts["input_ids"].tolist() == [[5, 6, 7], [0, 0, 5]]


def test_length_grouped_batches_cover_every_index_once():
    batches = nf.length_grouped_batches(list(range(50, 0, -1)), 4, torch.Generator().manual_seed(0), group=3)
    assert sorted(i for b in batches for i in b) == list(range(50))
    assert sorted(len(b) for b in batches) == [2] + [4] * 12  # one short batch (50 = 12 * 4 + 2), wherever shuffled


# ------------------------------------------------------------------------------------ end to end

WORDS = ["red", "green", "blue", "cat", "dog", "bird", "runs", "sleeps", "eats", "fish", "seeds", "quickly",
         "slowly", "big", "small", "the", "a"]
PLAIN_WORDS = ["###", "Instruction", ":", "Response", "describe", "animal"]


def _sentence(rng: random.Random, length: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(length))


def _assets(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A tiny random Llama with a WordLevel tokenizer over the data's words, a JSONL and a truncated ShareGPT file."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    rng = random.Random(0)
    pairs = [(f"describe the {_sentence(rng, 3)}", _sentence(rng, rng.randint(10, 16))) for _ in range(12)]
    jsonl = tmp_path / "pairs.jsonl"
    jsonl.write_text("\n".join(json.dumps({"instruction": q, "input": "", "output": a}) for q, a in pairs) + "\n")
    conversations = [{"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]} for q, a in pairs]
    conversations.insert(1, {"conversations": [{"from": "gpt", "value": "no question"}]})  # unusable
    text = json.dumps(conversations, indent=1)
    sharegpt = tmp_path / "sharegpt.json"
    sharegpt.write_text(text[:len(text) - 40])  # truncated inside the last record

    special = ["[UNK]", "[PAD]", "[BOS]", "[EOS]"]
    backend = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.train_from_iterator([" ".join(WORDS + PLAIN_WORDS)], trainers.WordLevelTrainer(special_tokens=special))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]",
                                        bos_token="[BOS]", eos_token="[EOS]")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    model_dir = tmp_path / "model"
    LlamaForCausalLM(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    return model_dir, jsonl, sharegpt


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return _assets(tmp_path_factory.mktemp("findings"))


DISTRIBUTIONS = ["uniform", "gaussian"] if _gaussian_available() else ["uniform"]


@pytest.fixture(scope="module")
def outputs(assets, tmp_path_factory) -> dict[str, tuple[str, Path]]:
    """The script's stdout and output directory, run once on each data file."""
    model_dir, jsonl, sharegpt = assets
    done = {}
    for name, data in [("jsonl", jsonl), ("sharegpt", sharegpt)]:
        out = tmp_path_factory.mktemp(name)
        command = [sys.executable, str(EXAMPLES / "neftune_findings.py"), "--model", str(model_dir),
                   "--data", str(data), "--out", str(out), "--alphas", "0", "5", "--distributions", *DISTRIBUTIONS,
                   "--seeds", "0", "--train-size", "6", "--heldout-size", "3", "--max-length", "64", "--epochs", "1",
                   "--batch-size", "2", "--lr", "1e-4", "--gen-prompts", "4", "--gen-tokens", "12", "--div-chunk", "4",
                   "--threads", "1"]
        run = subprocess.run(command, check=False, capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stderr[-3000:]
        done[name] = run.stdout, out
    return done


@pytest.mark.parametrize("data", ["jsonl", "sharegpt"])
def test_end_to_end(outputs, data):
    stdout, out = outputs[data]
    assert "| alpha | noise | seeds |" in stdout
    assert (out / "table.md").read_text() in stdout
    assert (out / "findings.png").stat().st_size > 0
    results = json.loads((out / "results.json").read_text())
    assert len(results["runs"]) == 1 + len(DISTRIBUTIONS)
    settings = [(r["alpha"], r["distribution"]) for r in results["summary"]]
    assert settings == [(0, None)] + [(5, d) for d in DISTRIBUTIONS]
    for row in results["summary"]:
        for key in nf.METRICS:
            assert math.isfinite(row[key]["mean"]) and math.isfinite(row[key]["std"]), (row, key)
    assert {k: results["sizes"][k] for k in ("train", "heldout", "gen")} == {"train": 6, "heldout": 3, "gen": 4}


def test_same_pairs_give_the_same_results(outputs):
    """The ShareGPT file holds the JSONL's pairs (plus an unusable record and a truncated tail): runs on either
    match exactly, so the results depend on the seeds only."""
    def metrics(name: str) -> list[dict]:
        runs = json.loads((outputs[name][1] / "results.json").read_text())["runs"]
        return [{k: v for k, v in run.items() if k != "seconds"} for run in runs]

    assert metrics("jsonl") == metrics("sharegpt")
