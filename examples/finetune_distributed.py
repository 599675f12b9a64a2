"""Fine-tune a causal LM with NEFTune noise under DDP or FSDP2, one process per GPU (or CPU).

    torchrun --nproc_per_node=2 examples/finetune_distributed.py            # DDP
    torchrun --nproc_per_node=2 examples/finetune_distributed.py --fsdp     # FSDP2 (fully_shard)
    torchrun --nproc_per_node=8 examples/finetune_distributed.py --model /path/to/hf/model

Without ``--model`` it builds a tiny Llama from a config (nothing is downloaded) and trains on
random token rows of varied lengths. Every rank seeds torch alike; neft_kernels folds the rank
into the noise stream, so ranks still draw different noise.
"""

import argparse
import os

import torch
import torch.distributed as dist
import transformers

import neft_kernels


def tiny_llama() -> transformers.PreTrainedModel:
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return transformers.LlamaForCausalLM(config)


def batch(step: int, rank: int, vocab: int, device: torch.device, size: int = 4, width: int = 64) -> dict:
    """Each rank its own rows (as a DistributedSampler would give), right-padded."""
    g = torch.Generator().manual_seed(step * 1000 + rank)
    ids = torch.randint(1, vocab, (size, width), generator=g)
    lengths = torch.randint(width // 4, width + 1, (size, 1), generator=g)
    mask = (torch.arange(width)[None] < lengths).long()
    ids = ids * mask
    return {k: v.to(device) for k, v in
            dict(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a Hugging Face model directory (default: a tiny Llama from a config)")
    parser.add_argument("--fsdp", action="store_true", help="FSDP2 fully_shard instead of DDP")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--noise-alpha", type=float, default=5.0)
    parser.add_argument("--lr", type=float, default=1e-3)
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank()
    try:
        train(args, cuda)
        # Every rank's collectives done (gloo's work threads idle) before the group is destroyed:
        # destroying it with work in flight can abort the process at exit.
        dist.barrier()
    finally:
        # After train() returned: the DDP reducer must be gone before its process group is.
        dist.destroy_process_group()
    print(f"rank {rank}: process group destroyed", flush=True)


def train(args: argparse.Namespace, cuda: bool) -> None:
    rank, local_rank = dist.get_rank(), int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    torch.manual_seed(0)  # the same on every rank: same initial weights, same noise seeds

    model = transformers.AutoModelForCausalLM.from_pretrained(args.model) if args.model else tiny_llama()
    model = neft_kernels.patch_model(model.to(device), noise_alpha=args.noise_alpha)  # before wrapping
    if args.fsdp:
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        wrapped = model
    else:
        wrapped = torch.nn.parallel.DistributedDataParallel(model, device_ids=[local_rank] if cuda else None)
    opt = torch.optim.AdamW(wrapped.parameters(), lr=args.lr)
    model.train()
    for step in range(1, args.steps + 1):
        loss = wrapped(**batch(step, rank, model.config.vocab_size, device)).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        print(f"rank {rank}: step {step} loss {loss.item():.4f}", flush=True)
    neft_kernels.unpatch_model(model)  # plain again: save_pretrained / state_dict as usual


if __name__ == "__main__":
    main()
