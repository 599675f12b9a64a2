"""NEFTune on a PEFT LoRA model, in a plain PyTorch loop with an alpha schedule.

    python examples/train_lora.py
    python examples/train_lora.py --model /path/to/causal-lm --data pairs.jsonl --max-steps 500

``patch_model`` works on the ``PeftModel`` as it is: the frozen base embedding gets the noise (the
noise needs no gradient), the LoRA adapters train. ``unpatch_model`` leaves a plain model to save.
"""

import argparse

import peft
import torch
import transformers
from _common import add_arguments, instruction_pairs, model_and_tokenizer, tokenized

import neft_kernels


def main(argv=None) -> list[float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    parser.add_argument("--rank", type=int, default=8)
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    pairs = instruction_pairs(args.data)
    model, tokenizer = model_and_tokenizer(args.model, pairs)
    model = peft.get_peft_model(model, peft.LoraConfig(r=args.rank, lora_alpha=2 * args.rank,
                                                       target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    neft_kernels.patch_model(model, noise_alpha=args.alpha)
    scheduler = neft_kernels.AlphaScheduler(model, args.alpha, "cosine", final_alpha=0.0, total_steps=args.max_steps)
    collator = transformers.DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
    rows = tokenized(pairs, tokenizer)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    losses = []
    for step in range(args.max_steps):
        start = step * args.batch_size % len(rows)
        batch = collator(rows[start:start + args.batch_size])
        loss = model(**batch).loss  # the embedding takes L per row from batch["attention_mask"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
        losses.append(loss.item())
        if step % 5 == 0:
            print(f"step {step:>4}: loss {loss.item():.3f}  next alpha {scheduler.alpha:.2f}")
    neft_kernels.unpatch_model(model)
    model.save_pretrained(args.output_dir)  # plain adapters: nothing of neft_kernels in them
    return losses


if __name__ == "__main__":
    main()
