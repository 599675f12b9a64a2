"""Worker for tests/integrations/test_distributed.py, run under torchrun on CPU (gloo), with tests/ on
PYTHONPATH (for ``support``).

``python -m torch.distributed.run --nproc_per_node=N tests/integrations/dist_worker.py SCENARIO OUTDIR``: every
rank saves what it saw to ``OUTDIR/rank<r>.pt``; the test compares ranks and checks each against
spec v1 computed in one process.
"""

import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import RowwiseParallel, parallelize_module

from neft_kernels import NoisyEmbedding, patch_model, unpatch_model

from support.hf_models import build, padded_batch


def _capture(emb):
    """Record every call of ``emb``: its ids, its (full) output, the seed it drew, its (full) weight."""
    seen, draw = [], emb._draw_seed

    def record_seed(*args):
        seen.append({"seed": draw(*args)})
        return seen[-1]["seed"]

    def hook(module, args, out):
        ids = args[0].to_local() if isinstance(args[0], DTensor) else args[0]
        seen[-1].update(ids=ids.clone(), out=_full(out).detach().clone(), weight=_full(module.weight).detach().clone())

    emb._draw_seed = record_seed
    emb.register_forward_hook(hook)
    return seen


def _full(t):
    return t.full_tensor() if isinstance(t, DTensor) else t


def ddp(rank: int) -> dict:
    """Same seed, same batch on both ranks: the noise must differ, the gradients must agree."""
    torch.manual_seed(0)
    model = patch_model(build("llama"), noise_alpha=5.0).train()
    seen = _capture(model.get_input_embeddings())
    ddp_model = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp_model.parameters(), lr=0.1)
    ids, mask = padded_batch()
    loss = ddp_model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
    loss.backward()
    grad = model.get_input_embeddings().weight.grad.clone()
    opt.step()
    return dict(calls=seen, mask=mask, grad=grad, weight=model.get_input_embeddings().weight.detach().clone())


def fsdp2(rank: int) -> dict:
    """A patched tiny Llama under fully_shard (embedding sharded too) trains; unpatch keeps FSDP."""
    from torch.distributed.fsdp import FSDPModule, fully_shard

    torch.manual_seed(0)
    model = patch_model(build("llama"), noise_alpha=5.0).train()
    emb = model.get_input_embeddings()
    seen = _capture(emb)
    fully_shard(emb)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    assert isinstance(emb, NoisyEmbedding) and isinstance(emb, FSDPModule)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for step in range(3):
        ids, mask = padded_batch(step)
        loss = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    unpatch_model(model)
    assert type(emb).__name__ == "FSDPEmbedding" and isinstance(emb, FSDPModule), type(emb).__mro__
    return dict(calls=seen, mask=padded_batch(0)[1], losses=losses, final_weight=emb.weight.full_tensor().detach())


def _tp_embedding(mesh, tp_group=None, output_layouts=None, max_norm=None) -> NoisyEmbedding:
    """Replicated output (the default), or ``output_layouts`` (sequence parallel: Shard(1))."""
    output_layouts = Replicate() if output_layouts is None else output_layouts
    torch.manual_seed(0)
    emb = NoisyEmbedding(96, 32, noise_alpha=5.0, tp_group=tp_group, max_norm=max_norm)  # same init on every rank
    return parallelize_module(emb, mesh, RowwiseParallel(input_layouts=Replicate(), output_layouts=output_layouts))


def tp(rank: int) -> dict:
    """Vocab-parallel embedding: noise added once after the reduction, identical on both ranks."""
    mesh = init_device_mesh("cpu", (2,))
    emb = _tp_embedding(mesh)
    seen = _capture(emb)
    ids, mask = padded_batch()
    with emb.side_inputs(attention_mask=mask):
        out = emb(ids)
    (out.full_tensor() if isinstance(out, DTensor) else out).sum().backward()
    # Sequence parallel: each rank keeps its slice of the sequence dim of the same noisy rows.
    sp = _tp_embedding(mesh, output_layouts=Shard(1))
    sp_seen = _capture(sp)
    with sp.side_inputs(attention_mask=mask):
        sp(ids)
    # Refused: an id outside the table (the sharded lookup would give a zero row), max_norm (no
    # sharded renorm), a tp_group without this rank.
    refused = []
    bad = ids.clone()
    bad[0, 0] = 96
    for call in (lambda: emb(bad), lambda: _tp_embedding(mesh, max_norm=1.0)(ids),
                 lambda: NoisyEmbedding(96, 32, tp_group=dist.new_group([0])).train()(ids)):
        try:
            call()
            refused.append(None)
        except (IndexError, ValueError) as err:
            refused.append(f"{type(err).__name__}: {err}")
    return dict(calls=seen, mask=mask, grad=_full(emb.weight.grad).clone(), sp_calls=sp_seen, refused=refused)


def mesh4(rank: int) -> dict:
    """2 x 2 (dp, tp): noise shared within a TP group, different across DP groups."""
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    emb = _tp_embedding(mesh["tp"], tp_group=mesh.get_group("tp"))
    seen = _capture(emb)
    ids, mask = padded_batch()
    with emb.side_inputs(attention_mask=mask):
        emb(ids)
    return dict(calls=seen, mask=mask, tp_ranks=dist.get_process_group_ranks(mesh.get_group("tp")))


if __name__ == "__main__":
    scenario, outdir = sys.argv[1], sys.argv[2]
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    result = globals()[scenario](rank)
    torch.save(result, f"{outdir}/rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()
    open(f"{outdir}/rank{rank}.done", "w").close()  # all work done; what follows is interpreter exit
