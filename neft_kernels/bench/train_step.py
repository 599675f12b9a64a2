"""Training steps of Llama-shaped models: no noise, transformers' NEFTune hook, and ``patch_model``.

What a training loop sees: the wall time of a whole step (forward, backward, AdamW) and its peak
memory, with the three variants interleaved round by round on one model (same weights, same
batch), in a rotating order, and compared within each round, so that drift hits all alike. Models
are built from configs with random weights (nothing is downloaded); batches are padded, with an
``attention_mask``, their pads one id (``impls.PAD_ID``) as collators pad.
"""

from __future__ import annotations

import statistics
import time

import torch

from ..integrations.hf import patch_model, unpatch_model
from . import measure
from .impls import padded_batch

# (hidden, intermediate, layers, heads, kv heads, vocab): real models' shapes, random weights.
MODELS = {
    "smollm2-135m": (576, 1536, 30, 9, 3, 49152),
    "llama-3.2-1b": (2048, 8192, 16, 32, 8, 128256),
    "tiny-llama": (256, 688, 2, 4, 2, 32000),  # what a 2-core CPU trains in a few seconds a step
}
VARIANTS = ("none", "hf_hook", "patch_model")
ALPHA = 5.0


def build(name: str, device: torch.device, dtype: torch.dtype):
    import transformers

    hidden, inter, layers, heads, kv, vocab = MODELS[name]
    config = transformers.LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                                      num_attention_heads=heads, num_key_value_heads=kv, vocab_size=vocab,
                                      max_position_embeddings=4096, tie_word_embeddings=name == "smollm2-135m")
    torch.manual_seed(0)
    # transformers' @wraps(nn.Module.to) hides the bound self from mypy.
    return transformers.LlamaForCausalLM(config).to(device=device, dtype=dtype).train()  # type: ignore[call-arg]


def _batch(vocab: int, batch: int, length: int, device: torch.device):
    ids, mask = padded_batch(batch, length, vocab, torch.Generator().manual_seed(0))
    labels = ids.masked_fill(mask == 0, -100)
    return ids.to(device), mask.to(device), labels.to(device)


class _Variant:
    """Switches one model between the variants: nothing, transformers' hook, or our patch."""

    def __init__(self, model):
        self.model, self.handle = model, None

    def set(self, variant: str) -> None:
        if self.handle is not None:
            self.handle.remove()
            self.handle = None
        unpatch_model(self.model)
        emb = self.model.get_input_embeddings()
        vars(emb).pop("neftune_noise_alpha", None)
        if variant == "hf_hook":
            from transformers.integrations.neftune import neftune_post_forward_hook

            emb.neftune_noise_alpha = ALPHA
            self.handle = emb.register_forward_hook(neftune_post_forward_hook)
        elif variant == "patch_model":
            patch_model(self.model, ALPHA)


def run(name: str, device: torch.device, dtype: torch.dtype, batch: int, length: int, steps: int,
        rounds: int) -> list[dict]:
    """``rounds`` x (one untimed and ``steps`` timed steps of each variant, in turn); median seconds per
    step and peak bytes."""
    model = build(name, device, dtype)
    ids, mask, labels = _batch(model.config.vocab_size, batch, length, device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6, foreach=True)
    switch = _Variant(model)
    sync = measure.syncer(device)

    def step():
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    peaks: dict[str, int] = {}
    for variant in VARIANTS:  # warm-up, and each variant's peak memory over one step
        switch.set(variant)
        step()
        peaks[variant] = measure.peak_bytes(step, device)
    for r in range(rounds):
        # Each round rotates the order, so that no variant always runs first (or after the same one).
        for variant in VARIANTS[r % len(VARIANTS):] + VARIANTS[:r % len(VARIANTS)]:
            switch.set(variant)
            step()  # untimed: the first step after a switch pays for it (new modules, their tensors)
            sync()
            t0 = time.perf_counter()
            for _ in range(steps):
                step()
            sync()
            times[variant].append((time.perf_counter() - t0) / steps)
    switch.set("none")
    records = []
    for variant in VARIANTS:
        # Paired within each round: drift between rounds (clocks, other load) cancels in the ratio.
        ratios = [t / base for t, base in zip(times[variant], times["none"], strict=True)]
        p20, p80 = measure.spread(ratios)
        records.append({"kind": "train_step", "model": name, "variant": variant, "device": device.type,
                        "dtype": str(dtype).removeprefix("torch."), "B": batch, "L": length,
                        "step_ms": statistics.median(times[variant]) * 1e3,
                        "min_ms": min(times[variant]) * 1e3, "max_ms": max(times[variant]) * 1e3,
                        "rounds": rounds, "steps_per_round": steps, "vs_no_noise": statistics.median(ratios),
                        "vs_no_noise_p20": p20, "vs_no_noise_p80": p80, "peak_bytes": peaks[variant]})
    return records


def table(records: list[dict]) -> str:
    """``x no noise``: the median over rounds of the variant's step time over the no-noise step time of
    the same round, with the 20th-80th percentile of those ratios."""
    lines = [f"{'model':<14} {'variant':<12} {'dtype':<9} {'B,L':<9} {'step ms':>9} {'min-max ms':>17} "
             f"{'x no noise':>10} {'p20-p80':>13} {'peak MiB':>9}"]
    for r in records:
        peak = f"{r['peak_bytes'] / 2**20:.0f}"
        ratio_spread = f"{r['vs_no_noise_p20']:.4f}-{r['vs_no_noise_p80']:.4f}"
        lines.append(f"{r['model']:<14} {r['variant']:<12} {r['dtype']:<9} {r['B']},{r['L']:<6} {r['step_ms']:>9.2f} "
                     f"{r['min_ms']:>8.2f}-{r['max_ms']:<8.2f} {r['vs_no_noise']:>10.4f} {ratio_spread:>13} "
                     f"{peak:>9}")
    return "\n".join(lines)
