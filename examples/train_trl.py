"""NEFTune with TRL's ``SFTTrainer``, padded, packed or padding-free.

    python examples/train_trl.py --mode packing            # rows packed to max_length
    python examples/train_trl.py --mode padding_free       # no padding at all (needs max_length=None)
    python examples/train_trl.py --model /path/to/causal-lm --data pairs.jsonl --mode packing

Packed rows hold several sequences; TRL passes their ``position_ids`` to the model, and
neft_kernels gives each sequence its own L (a hook would use the whole row). Keep
``SFTConfig.neftune_noise_alpha`` unset: the callback refuses to add noise twice.
"""

import argparse

import datasets
import torch
import trl
from _common import add_arguments, instruction_pairs, model_and_tokenizer

from neft_kernels.integrations import NEFTuneCallback


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    parser.add_argument("--mode", default="packing", choices=["padded", "packing", "padding_free"])
    args = parser.parse_args(argv)

    pairs = instruction_pairs(args.data)
    model, tokenizer = model_and_tokenizer(args.model, pairs)
    data = datasets.Dataset.from_list([{"prompt": p["instruction"] + " :", "completion": " " + p["output"]}
                                       for p in pairs])
    config = trl.SFTConfig(
        output_dir=args.output_dir, max_steps=args.max_steps, per_device_train_batch_size=args.batch_size,
        learning_rate=1e-3, logging_steps=5, report_to=[], save_strategy="no",
        use_cpu=not torch.cuda.is_available(), bf16=torch.cuda.is_available(),
        packing=args.mode == "packing", padding_free=args.mode == "padding_free",
        # TRL 1.x: padding-free training truncates nothing, so it needs max_length=None.
        max_length=None if args.mode == "padding_free" else 128)
    trainer = trl.SFTTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer,
                             callbacks=[NEFTuneCallback(noise_alpha=args.alpha)])
    trainer.train()
    logs = [h for h in trainer.state.log_history if "neftune_alpha" in h]
    for h in logs:
        print(f"step {h['step']:>4}: loss {h['loss']:.3f}  mean L {h['neftune_mean_length']:.1f}  "
              f"noised {h['neftune_noised_fraction']:.2f}")
    return logs


if __name__ == "__main__":
    main()
