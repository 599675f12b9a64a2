"""Soak: a tiny Llama with a patched embedding trains for 2,000 steps (``NEFT_SOAK_STEPS`` for
more) through padded and packed batches: no NaN, no memory or object growth, no leftover state."""

import gc
import os

import pytest
import torch

from neft_kernels import patch_model

from support.hf_models import build, packed_batch, padded_batch

STEPS = int(os.environ.get("NEFT_SOAK_STEPS", "2000"))


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.slow
def test_two_thousand_steps_stay_finite_and_flat():
    torch.manual_seed(0)
    model = patch_model(build("llama"), noise_alpha=5.0).train()
    emb = model.get_input_embeddings()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batches = []
    for seed in range(4):  # padded batches of varied lengths and packed rows, in turn
        ids, mask = padded_batch(seed)
        batches.append(dict(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)))
        ids, pos = packed_batch(seed)
        batches.append(dict(input_ids=ids, position_ids=pos, labels=ids))
    baseline = None
    for step in range(STEPS):
        loss = model(**batches[step % len(batches)]).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        assert torch.isfinite(loss), f"loss {loss.item()} at step {step}"
        assert not emb._side_input_stack
        if step == STEPS // 10:  # after warm-up: allocator pools and optimizer state exist
            gc.collect()
            baseline = (_rss_bytes(), len(gc.get_objects()))
    gc.collect()
    rss, objects = _rss_bytes(), len(gc.get_objects())
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert rss - baseline[0] < 64 << 20, f"RSS grew {(rss - baseline[0]) >> 20} MiB"
    assert objects - baseline[1] < 1000, f"{objects - baseline[1]} more live Python objects"
