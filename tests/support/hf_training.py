"""A Trainer's pieces for the integration tests: token rows, their collator, arguments for a short
CPU run, and a callback that records whether the embedding was noisy at each step."""

import torch
import transformers

from neft_kernels import NoisyEmbedding

from .hf_models import VOCAB

ALPHA = 5.0


class Rows(torch.utils.data.Dataset):
    """Token rows of varied lengths; the collator pads them."""

    def __init__(self, n: int = 16):
        g = torch.Generator().manual_seed(0)
        self.rows = [torch.randint(2, VOCAB, (int(torch.randint(4, 13, (), generator=g)),), generator=g)
                     for _ in range(n)]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return {"input_ids": self.rows[i]}


def collate(items):
    width = max(len(it["input_ids"]) for it in items)
    ids = torch.zeros(len(items), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, it in enumerate(items):
        ids[r, :len(it["input_ids"])] = it["input_ids"]
        mask[r, :len(it["input_ids"])] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def run_args(tmp_path, **kw):
    kw = {"max_steps": 3, "logging_steps": 1, **kw}
    return transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, learning_rate=1e-3,
        report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True, **kw)


class Probe(transformers.TrainerCallback):
    """Records, at every step, whether the embedding was noisy; raises at ``fail_at_step``."""

    def __init__(self, fail_at_step: int | None = None):
        self.patched_during, self.fail_at_step = [], fail_at_step

    def on_step_begin(self, args, state, control, model=None, **kw):
        emb = model.get_input_embeddings()
        self.patched_during.append(isinstance(emb, NoisyEmbedding))
        if state.global_step == self.fail_at_step:
            raise RuntimeError("training failed")
