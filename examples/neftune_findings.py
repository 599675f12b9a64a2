"""Reproduce the NEFTune paper's measurable findings at a small scale.

For each noise level alpha (and noise distribution) and each seed, fine-tune a fresh copy of a causal LM
on instruction pairs with ``neft_kernels.patched(...)``, then measure what the paper measures:

- overfitting (paper, Fig. 5): the training loss without noise, and the loss on held-out pairs;
- greedy answers (repetition penalty 1.2) to training prompts: their length in characters and whitespace
  tokens, 2-gram repetition and log-diversity on a fixed-length chunk at the start of each answer (Tables
  4 and 6), and their ROUGE-L and BLEU-4 against the reference answers (Fig. 6).

    python examples/neftune_findings.py --model /path/to/hf/model --data pairs.jsonl --out results/

``--data`` is JSON or JSONL of ``{"instruction", "input"?, "output"}`` records, or ShareGPT records
(``{"conversations": [{"from": "human"|"gpt", "value": ...}, ...]}``, first human/gpt turn pair). The file
is streamed, so a huge or truncated ShareGPT dump works. Writes ``results.json``, ``table.md`` and
``findings.png`` under ``--out``.

Metric definitions (whitespace tokens throughout):
    rep-n          = 100 * (1 - |unique n-grams| / |n-grams|), on the first ``--div-chunk`` tokens of
                     each answer (shorter answers dropped), averaged over answers
    log-diversity  = log(prod_{n=2..4} (1 - rep-n / 100)), per answer, averaged (0 = no repetition)
    ROUGE-L        = F1 of the longest common subsequence of lowercased tokens, x100
    BLEU-4         = sentence BLEU of lowercased tokens, n = 1..4, brevity penalty, add-one smoothing of
                     the 2- to 4-gram precisions (Lin & Och 2004), x100, averaged over answers
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import itertools
import json
import logging
import math
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from tqdm import tqdm

import neft_kernels

LOG = logging.getLogger("neftune_findings")
METRICS = {  # results key -> label in the table and plot
    "train_loss": "train loss (no noise)",
    "heldout_loss": "held-out loss",
    "gen_chars": "answer length (chars)",
    "gen_words": "answer length (words)",
    "rep2": "2-gram repetition %",
    "log_diversity": "log-diversity",
    "rouge_l": "ROUGE-L F1",
    "bleu4": "BLEU-4",
}
HUMAN_ROLES = {"human", "user"}
BOT_ROLES = {"gpt", "assistant", "chatgpt"}
PLAIN_PROMPT = "### Instruction:\n{instruction}\n\n### Response:\n"


@dataclass(frozen=True)
class Example:
    output: str  # the reference answer
    prompt_ids: list[int]
    response_ids: list[int]  # ends with EOS

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.response_ids)


# ----------------------------------------------------------------------------------------- data

def stream_json_records(path: Path, chunk_chars: int = 1 << 20) -> Iterator[dict]:
    """Top-level objects of a JSON array or of JSONL, read a chunk at a time.

    A truncated file (a dump cut off mid-record) ends the stream at the last complete record."""
    decoder = json.JSONDecoder()
    buf, pos, eof = "", 0, False
    with path.open(encoding="utf-8") as f:
        while True:
            while pos < len(buf) and buf[pos] in " \t\r\n[],":
                pos += 1
            if pos < len(buf):
                try:
                    record, pos = decoder.raw_decode(buf, pos)
                except json.JSONDecodeError:
                    if eof:
                        LOG.warning("%s ends inside a record (truncated?): stopped there", path)
                        return
                else:
                    yield record
                    continue
            elif eof:
                return
            chunk = f.read(chunk_chars)
            eof = not chunk
            buf, pos = buf[pos:] + chunk, 0


def record_to_pair(record: object) -> tuple[str, str] | None:
    """(instruction, answer) of an instruction record or of a ShareGPT record's first human/gpt turn pair."""
    if not isinstance(record, dict):
        return None
    if "conversations" in record:
        turns = record["conversations"] or []
        for first, second in itertools.pairwise(turns):
            if first.get("from") in HUMAN_ROLES and second.get("from") in BOT_ROLES:
                return (first.get("value") or "").strip(), (second.get("value") or "").strip()
        return None
    instruction, extra = (record.get("instruction") or "").strip(), (record.get("input") or "").strip()
    return (f"{instruction}\n\n{extra}" if extra else instruction), (record.get("output") or "").strip()


def format_prompt(tokenizer: transformers.PreTrainedTokenizerBase, instruction: str) -> str:
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template([{"role": "user", "content": instruction}], tokenize=False,
                                             add_generation_prompt=True)
    return PLAIN_PROMPT.format(instruction=instruction)


def encode(tokenizer: transformers.PreTrainedTokenizerBase, instruction: str, output: str) -> Example:
    # A chat template writes its own BOS; the plain format gets the tokenizer's usual special tokens.
    prompt_ids = tokenizer(format_prompt(tokenizer, instruction),
                           add_special_tokens=not tokenizer.chat_template).input_ids
    response_ids = tokenizer(output, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    return Example(output, prompt_ids, response_ids)


def load_examples(path: Path, tokenizer: transformers.PreTrainedTokenizerBase, count: int,
                  max_length: int) -> list[Example]:
    """The first ``count`` usable pairs: both sides non-empty, at most ``max_length`` tokens in all."""
    examples: list[Example] = []
    seen = 0
    with tqdm(total=count, desc="pairs", disable=None) as bar:
        for record in stream_json_records(path):
            seen += 1
            pair = record_to_pair(record)
            if pair is None or not all(pair):
                continue
            example = encode(tokenizer, *pair)
            if example.length <= max_length:
                examples.append(example)
                bar.update()
            if len(examples) == count:
                break
    LOG.info("%d usable pairs from the first %d records of %s", len(examples), seen, path)
    return examples


# ------------------------------------------------------------------------------------- batching

def pad_id(tokenizer: transformers.PreTrainedTokenizerBase) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def training_batch(examples: Sequence[Example], pad: int) -> dict[str, torch.Tensor]:
    """Right-padded rows; labels only on the response (the prompt and the padding are -100)."""
    width = max(e.length for e in examples)
    ids = torch.full((len(examples), width), pad)
    labels = torch.full((len(examples), width), -100)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        tokens = torch.tensor(e.prompt_ids + e.response_ids)
        ids[row, :e.length] = tokens
        mask[row, :e.length] = 1
        labels[row, len(e.prompt_ids):e.length] = tokens[len(e.prompt_ids):]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def prompt_batch(examples: Sequence[Example], pad: int) -> dict[str, torch.Tensor]:
    """Left-padded prompts, so that every row's answer starts at the same column."""
    width = max(len(e.prompt_ids) for e in examples)
    ids = torch.full((len(examples), width), pad)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        ids[row, width - len(e.prompt_ids):] = torch.tensor(e.prompt_ids)
        mask[row, width - len(e.prompt_ids):] = 1
    return {"input_ids": ids, "attention_mask": mask}


def length_grouped_batches(lengths: Sequence[int], batch_size: int, generator: torch.Generator,
                           group: int = 16) -> list[list[int]]:
    """Shuffled batches of similar lengths (less padding, so less CPU time): shuffle, sort within
    windows of ``group`` batches, cut, shuffle the batches."""
    order = torch.randperm(len(lengths), generator=generator).tolist()
    window = group * batch_size
    order = [i for s in range(0, len(order), window) for i in sorted(order[s:s + window], key=lengths.__getitem__)]
    batches = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]


# ------------------------------------------------------------------------------ train and measure

def train(model: transformers.PreTrainedModel, examples: Sequence[Example], args: argparse.Namespace, pad: int,
          seed: int) -> float:
    """AdamW for ``args.epochs`` epochs; returns the mean (noisy) training loss of the last epoch."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    # Its own generator: the same seed gives the same batches at every alpha, only the noise differs.
    generator = torch.Generator().manual_seed(seed)
    lengths = [e.length for e in examples]
    model.train()
    losses: list[float] = []
    for epoch in range(args.epochs):
        losses = []
        batches = length_grouped_batches(lengths, args.batch_size, generator)
        for indices in tqdm(batches, desc=f"epoch {epoch + 1}", disable=None, leave=False):
            loss = model(**training_batch([examples[i] for i in indices], pad)).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
        LOG.info("  epoch %d: mean training loss %.4f", epoch + 1, statistics.fmean(losses))
    return statistics.fmean(losses)


@torch.no_grad()
def mean_loss(model: transformers.PreTrainedModel, examples: Sequence[Example], batch_size: int,
              pad: int) -> float:
    """Token-weighted cross-entropy on the responses, in eval mode (no noise)."""
    model.eval()
    ordered = sorted(examples, key=lambda e: e.length)
    total, tokens = 0.0, 0
    for start in range(0, len(ordered), batch_size):
        batch = training_batch(ordered[start:start + batch_size], pad)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"][:, 1:]
        total += torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(),
                                                   ignore_index=-100, reduction="sum").item()
        tokens += int((labels != -100).sum())
    return total / tokens


@torch.no_grad()
def generate(model: transformers.PreTrainedModel, tokenizer: transformers.PreTrainedTokenizerBase,
             examples: Sequence[Example], args: argparse.Namespace) -> list[str]:
    """Greedy answers with the paper's repetition penalty of 1.2, in the order of ``examples``."""
    model.eval()
    config = transformers.GenerationConfig(max_new_tokens=args.gen_tokens, do_sample=False, repetition_penalty=1.2,
                                           pad_token_id=pad_id(tokenizer), eos_token_id=tokenizer.eos_token_id)
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].prompt_ids))
    answers: dict[int, str] = {}
    for start in tqdm(range(0, len(order), args.gen_batch_size), desc="generate", disable=None, leave=False):
        indices = order[start:start + args.gen_batch_size]
        batch = prompt_batch([examples[i] for i in indices], pad_id(tokenizer))
        out = model.generate(**batch, generation_config=config)[:, batch["input_ids"].shape[1]:]
        for i, row in zip(indices, out, strict=True):
            answers[i] = tokenizer.decode(row, skip_special_tokens=True).strip()
    return [answers[i] for i in range(len(examples))]


# ---------------------------------------------------------------------------------------- metrics

def ngrams(tokens: Sequence[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


def rep_n(tokens: Sequence[str], n: int) -> float:
    """100 * (1 - unique / total) n-grams; needs at least n tokens."""
    grams = ngrams(tokens, n)
    return 100.0 * (1.0 - len(set(grams)) / len(grams))


def log_diversity(tokens: Sequence[str]) -> float:
    """log(prod_{n=2..4} (1 - rep-n / 100)): 0 without repetition, more negative with more."""
    return sum(math.log(1.0 - rep_n(tokens, n) / 100.0) for n in (2, 3, 4))


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(candidate: str, reference: str) -> float:
    """ROUGE-L F1 (x100) over lowercased whitespace tokens."""
    cand, ref = candidate.lower().split(), reference.lower().split()
    lcs = lcs_length(cand, ref)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(cand), lcs / len(ref)
    return 100.0 * 2 * precision * recall / (precision + recall)


def bleu4(candidate: str, reference: str) -> float:
    """Sentence BLEU-4 (x100) over lowercased whitespace tokens, one reference, add-one smoothing for n >= 2."""
    cand, ref = candidate.lower().split(), reference.lower().split()
    if not cand or not ref:
        return 0.0
    log_precision = 0.0
    for n in range(1, 5):
        cand_counts, ref_counts = Counter(ngrams(cand, n)), Counter(ngrams(ref, n))
        matches = sum(min(count, ref_counts[gram]) for gram, count in cand_counts.items())
        smooth = 0 if n == 1 else 1
        if matches + smooth == 0:
            return 0.0
        log_precision += math.log((matches + smooth) / (sum(cand_counts.values()) + smooth)) / 4
    brevity = min(0.0, 1.0 - len(ref) / len(cand))
    return 100.0 * math.exp(brevity + log_precision)


def generation_metrics(answers: Sequence[str], references: Sequence[str], chunk: int) -> dict[str, float]:
    """Length, repetition and diversity (on answers with at least ``chunk`` words), overlap with the references."""
    chunks = [a.split()[:chunk] for a in answers if len(a.split()) >= chunk]
    nan = float("nan")
    return {
        "gen_chars": statistics.fmean(len(a) for a in answers),
        "gen_words": statistics.fmean(len(a.split()) for a in answers),
        "rep2": statistics.fmean(rep_n(c, 2) for c in chunks) if chunks else nan,
        "log_diversity": statistics.fmean(log_diversity(c) for c in chunks) if chunks else nan,
        "rouge_l": statistics.fmean(rouge_l(a, r) for a, r in zip(answers, references, strict=True)),
        "bleu4": statistics.fmean(bleu4(a, r) for a, r in zip(answers, references, strict=True)),
        "div_answers": len(chunks),
    }


# ----------------------------------------------------------------------------------------- runs

def check_distributions(distributions: Sequence[str]) -> None:
    """Fail before the first run, not an hour in, if neft_kernels refuses a distribution."""
    for distribution in distributions:
        try:
            neft_kernels.make_noisy(torch.nn.Embedding(2, 2), 1.0, distribution=distribution)
        except (TypeError, ValueError) as error:
            raise SystemExit(f"neft_kernels refuses distribution={distribution!r}: {error}") from error


def grid(alphas: Sequence[float], distributions: Sequence[str], seeds: Sequence[int]) -> list[tuple]:
    """(alpha, distribution, seed) per run; alpha 0 once per seed, with no distribution."""
    settings = [(a, None) if a == 0 else (a, d) for a in alphas for d in distributions]
    return [(a, d, s) for a, d in dict.fromkeys(settings) for s in seeds]


def run_one(base: transformers.PreTrainedModel, tokenizer: transformers.PreTrainedTokenizerBase, data: dict,
            alpha: float, distribution: str | None, seed: int, args: argparse.Namespace) -> dict:
    start = time.perf_counter()
    torch.manual_seed(seed)  # the noise draws its seeds from torch's default generator
    model = copy.deepcopy(base)
    pad = pad_id(tokenizer)
    noise = neft_kernels.patched(model, noise_alpha=alpha, distribution=distribution) if alpha > 0 \
        else contextlib.nullcontext()
    with noise:
        fit_loss = train(model, data["train"], args, pad, seed)
    assert not neft_kernels.is_patched(model)
    result = {"alpha": alpha, "distribution": distribution, "seed": seed, "fit_loss": fit_loss,
              "train_loss": mean_loss(model, data["train"], args.batch_size, pad),
              "heldout_loss": mean_loss(model, data["heldout"], args.batch_size, pad)}
    torch.manual_seed(seed)
    answers = generate(model, tokenizer, data["gen"], args)
    result |= generation_metrics(answers, [e.output for e in data["gen"]], args.div_chunk)
    result["seconds"] = time.perf_counter() - start
    result["answers"] = answers[:args.keep_answers]
    return result


def summarize(runs: Sequence[dict]) -> list[dict]:
    """Mean and sample standard deviation over seeds per (alpha, distribution)."""
    groups: dict[tuple, list[dict]] = {}
    for run in runs:
        groups.setdefault((run["alpha"], run["distribution"]), []).append(run)
    rows = []
    for (alpha, distribution), group in groups.items():
        row = {"alpha": alpha, "distribution": distribution, "seeds": len(group)}
        for key in METRICS:
            values = [r[key] for r in group]
            row[key] = {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}
        rows.append(row)
    return rows


def format_table(rows: Sequence[dict], reference: dict[str, float]) -> str:
    header = ["alpha", "noise", "seeds"] + list(METRICS.values())
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [f"{row['alpha']:g}", row["distribution"] or "none", str(row["seeds"])]
        cells += [f"{row[k]['mean']:.3f} ± {row[k]['std']:.3f}" for k in METRICS]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append(f"\nReference answers of the generation prompts: {reference['gen_chars']:.1f} chars, "
                 f"{reference['gen_words']:.1f} words.")
    return "\n".join(lines) + "\n"


def plot(rows: Sequence[dict], distributions: Sequence[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, math.ceil(len(METRICS) / 2), figsize=(4 * math.ceil(len(METRICS) / 2), 7))
    baseline = [r for r in rows if r["alpha"] == 0]  # alpha 0 starts every distribution's line
    for ax, (key, label) in zip(axes.flat, METRICS.items(), strict=True):
        for distribution in distributions:
            line = baseline + [r for r in rows if r["distribution"] == distribution]
            ax.errorbar([r["alpha"] for r in line], [r[key]["mean"] for r in line],
                        yerr=[r[key]["std"] for r in line], marker="o", capsize=3, label=distribution)
        ax.set_title(label)
        ax.set_xlabel("alpha")
    axes.flat[0].legend()
    fig.suptitle("NEFTune findings: mean ± std over seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------------------- main

def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, required=True, help="a Hugging Face causal LM directory")
    p.add_argument("--data", type=Path, required=True, help="JSON/JSONL instruction pairs or ShareGPT records")
    p.add_argument("--out", type=Path, required=True, help="directory for results.json, table.md, findings.png")
    p.add_argument("--alphas", type=float, nargs="+", default=[0.0, 5.0, 10.0, 15.0])
    p.add_argument("--distributions", nargs="+", default=["uniform", "gaussian"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--train-size", type=int, default=256)
    p.add_argument("--heldout-size", type=int, default=64)
    p.add_argument("--max-length", type=int, default=256, help="longest prompt + answer kept, in tokens")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--gen-prompts", type=int, default=32, help="training prompts to answer")
    p.add_argument("--gen-tokens", type=int, default=96, help="max_new_tokens of each answer")
    p.add_argument("--gen-batch-size", type=int, default=8)
    p.add_argument("--div-chunk", type=int, default=32, help="words at the start of an answer for rep-n/diversity")
    p.add_argument("--keep-answers", type=int, default=3, help="answers per run saved in results.json")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    args = p.parse_args(argv)
    if args.gen_prompts > args.train_size:
        p.error("--gen-prompts answers training prompts: at most --train-size")
    if args.div_chunk < 4:
        p.error("--div-chunk must hold a 4-gram: at least 4")
    return args


def load_data(args: argparse.Namespace, tokenizer: transformers.PreTrainedTokenizerBase) -> dict:
    examples = load_examples(args.data, tokenizer, args.train_size + args.heldout_size, args.max_length)
    if len(examples) < args.train_size + args.heldout_size:
        raise SystemExit(f"{args.data}: only {len(examples)} usable pairs, "
                         f"{args.train_size + args.heldout_size} needed")
    train_set = examples[:args.train_size]
    return {"train": train_set, "heldout": examples[args.train_size:], "gen": train_set[:args.gen_prompts]}


def neft_kernels_commit() -> str | None:
    """The git commit neft_kernels was imported from (``+dirty`` with local changes), if it is a checkout."""
    root = Path(neft_kernels.__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "."], cwd=root, capture_output=True, text=True,
                               check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def describe(args: argparse.Namespace, data: dict) -> dict:
    """What the results depend on besides the arguments."""
    gen = data["gen"]
    return {
        "command": shlex.join([sys.executable, *sys.argv]),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "neft_kernels": neft_kernels.__version__,
                     "neft_kernels_commit": neft_kernels_commit()},
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "torch_threads": torch.get_num_threads()},
        "model": str(args.model.resolve()),
        "data": str(args.data.resolve()),
        "sizes": {name: len(part) for name, part in data.items()}
        | {"mean_train_tokens": statistics.fmean(e.length for e in data["train"])},
        "reference": {"gen_chars": statistics.fmean(len(e.output) for e in gen),
                      "gen_words": statistics.fmean(len(e.output.split()) for e in gen)},
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
    }


def main(argv: Sequence[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    args = parse_args(argv)
    check_distributions([d for d in args.distributions if any(a > 0 for a in args.alphas)])
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    tokenizer = transformers.AutoTokenizer.from_pretrained(args.model)
    base = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    data = load_data(args, tokenizer)
    report = describe(args, data) | {"runs": []}
    args.out.mkdir(parents=True, exist_ok=True)
    settings = grid(args.alphas, args.distributions, args.seeds)
    for number, (alpha, distribution, seed) in enumerate(settings, 1):
        LOG.info("run %d/%d: alpha=%g distribution=%s seed=%d", number, len(settings), alpha, distribution, seed)
        report["runs"].append(run_one(base, tokenizer, data, alpha, distribution, seed, args))
        LOG.info("  %s", {k: round(report["runs"][-1][k], 4) for k in [*METRICS, "seconds"]})
        report["wall_seconds"] = time.perf_counter() - started
        (args.out / "results.json").write_text(json.dumps(report, indent=1))  # partial results survive a kill
    report["summary"] = summarize(report["runs"])
    report["wall_seconds"] = time.perf_counter() - started
    (args.out / "results.json").write_text(json.dumps(report, indent=1))
    table = format_table(report["summary"], report["reference"])
    (args.out / "table.md").write_text(table)
    plot(report["summary"], [d for d in args.distributions if any(a > 0 for a in args.alphas)],
         args.out / "findings.png")
    print(table)
    LOG.info("wrote %s/{results.json,table.md,findings.png} in %.0f s", args.out, report["wall_seconds"])


if __name__ == "__main__":
    main()
