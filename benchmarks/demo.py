"""Demo: the fused op against Hugging Face's NEFTune hook formula on one padded batch.

    python benchmarks/demo.py [--device cuda] [--dtype bfloat16]

Prints the time per call of each, and where each puts its noise: the hook noises padding and
scales every row by the padded width; the fused op follows the paper's per-sequence length.
"""

from __future__ import annotations

import argparse
import math

import torch
import torch.utils.benchmark as benchmark

from neft_kernels import SPEC_VERSION, noisy_embedding


def hf_hook(ids: torch.Tensor, weight: torch.Tensor, alpha: float) -> torch.Tensor:
    """transformers' neftune_post_forward_hook applied to a plain lookup."""
    out = torch.nn.functional.embedding(ids, weight)
    mag = alpha / torch.sqrt(torch.tensor(out.size(1) * out.size(2)))
    return out + torch.zeros_like(out).uniform_(-mag, mag)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--alpha", type=float, default=5.0)
    args = parser.parse_args()

    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    weight = torch.randn(args.vocab, args.dim, device=args.device).to(dtype)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), device=args.device)
    lengths = torch.linspace(args.seq // 8, args.seq, args.batch).long()
    mask = (torch.arange(args.seq)[None, :] < lengths[:, None]).long().to(args.device)

    fused = noisy_embedding(ids, weight, args.alpha, seed=1, attention_mask=mask)
    hook = hf_hook(ids, weight, args.alpha)
    clean = weight[ids].float()

    print(f"neft_kernels noise spec v{SPEC_VERSION}: B={args.batch} L={args.seq} d={args.dim} "
          f"V={args.vocab} {args.dtype} on {args.device}, alpha={args.alpha}")
    print(f"paper's per-sequence noise norm alpha/sqrt(3) = {args.alpha / math.sqrt(3):.3f}")
    print(f"{'row':>3} {'real tokens':>11} {'fused norm':>10} {'hook norm':>9} {'fused on pad':>12} {'hook on pad':>11}")
    for r in range(args.batch):
        n = int(lengths[r])
        fn = (fused[r].float() - clean[r]).norm(dim=-1)
        hn = (hook[r].float() - clean[r]).norm(dim=-1)
        print(f"{r:>3} {n:>11} {fn[:n].norm():>10.3f} {hn[:n].norm():>9.3f} "
              f"{fn[n:].norm():>12.3f} {hn[n:].norm():>11.3f}")

    timers = {
        "hook (lookup + zeros_like + uniform_ + add)": "hf_hook(ids, weight, alpha)",
        "fused noisy_embedding (backend='auto')": "noisy_embedding(ids, weight, alpha, seed=1, attention_mask=mask)",
        "plain F.embedding": "torch.nn.functional.embedding(ids, weight)",
    }
    env = dict(hf_hook=hf_hook, noisy_embedding=noisy_embedding, ids=ids, weight=weight, alpha=args.alpha,
               mask=mask, torch=torch)
    print(f"\n{'forward':<46} {'median ms':>9}")
    for label, stmt in timers.items():
        m = benchmark.Timer(stmt=stmt, globals=env).blocked_autorange(min_run_time=1.0)
        print(f"{label:<46} {m.median * 1e3:>9.3f}")


if __name__ == "__main__":
    main()
