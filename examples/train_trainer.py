"""NEFTune with the Hugging Face ``Trainer``: one callback, response-only loss, an alpha schedule.

    python examples/train_trainer.py                       # a tiny Llama on a toy task (CPU, seconds)
    python examples/train_trainer.py --model /path/to/causal-lm --data pairs.jsonl --max-steps 500

The callback patches the model at train begin (noise with the paper's per-sequence L, from the
attention_mask the collator builds) and unpatches it at train end, so the saved checkpoint is
plain. ``--noise-tokens response`` noises only the response (where labels != -100).
"""

import argparse

import torch
import transformers
from _common import add_arguments, instruction_pairs, model_and_tokenizer, tokenized

from neft_kernels.integrations import NEFTuneCallback


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    parser.add_argument("--schedule", default="constant", choices=["constant", "linear", "cosine"])
    parser.add_argument("--distribution", default="uniform", choices=["uniform", "gaussian"])
    parser.add_argument("--noise-tokens", default="all", choices=["all", "response", "prompt"])
    args = parser.parse_args(argv)

    pairs = instruction_pairs(args.data)
    model, tokenizer = model_and_tokenizer(args.model, pairs)
    collator = transformers.DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
    training = transformers.TrainingArguments(
        output_dir=args.output_dir, max_steps=args.max_steps, per_device_train_batch_size=args.batch_size,
        learning_rate=1e-3, logging_steps=5, report_to=[], save_strategy="no", use_cpu=not torch.cuda.is_available())
    callback = NEFTuneCallback(noise_alpha=args.alpha, schedule=args.schedule, distribution=args.distribution,
                               noise_tokens=args.noise_tokens)
    trainer = transformers.Trainer(model=model, args=training, train_dataset=tokenized(pairs, tokenizer),
                                   data_collator=collator, callbacks=[callback])
    trainer.train()
    logs = [h for h in trainer.state.log_history if "neftune_alpha" in h]
    for h in logs:
        print(f"step {h['step']:>4}: loss {h['loss']:.3f}  alpha {h['neftune_alpha']:.2f}  "
              f"noised {h['neftune_noised_fraction']:.2f}  mean L {h['neftune_mean_length']:.1f}  "
              f"noise/embedding {h['neftune_noise_ratio']:.3f}")
    return logs


if __name__ == "__main__":
    main()
