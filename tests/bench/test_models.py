"""The model-shape table: its rows, its inputs and one tiny run end to end on the CPU."""

import torch

from neft_kernels.bench import models


def test_cases_time_every_pass_in_bf16_and_the_forward_in_fp32():
    cases = models.cases([torch.float32, torch.bfloat16], ["gemma-3-1b"])
    assert len(cases) == len(models.LAYOUTS) * 4
    assert {p for _, _, dt, p in cases if dt == torch.float32} == {"forward"}


def test_packed_rows_are_sequences_from_position_zero(monkeypatch):
    monkeypatch.setitem(models.LAYOUTS, "packed", (1, 9000, "position_ids"))
    ids, weight, side, grad = models.model_inputs(8, 50, "packed", torch.float32, torch.device("cpu"))
    pos = side["position_ids"][0]
    starts = (pos == 0).nonzero().flatten()
    assert starts[0] == 0 and len(starts) >= 2
    lengths = torch.diff(torch.cat([starts, torch.tensor([pos.numel()])]))
    assert (lengths[:-1] >= 64).all() and (lengths <= 4096).all()
    assert torch.equal(pos, torch.cat([torch.arange(int(n)) for n in lengths]))
    assert ids.shape == (1, 9000) and grad.shape == (1, 9000, 8) and weight.requires_grad


def test_a_tiny_table_runs(monkeypatch):
    monkeypatch.setattr(models, "MODEL_SHAPES", {"tiny": (12, 40)})
    monkeypatch.setattr(models, "LAYOUTS", {"padded": (2, 16, "attention_mask"), "packed": (1, 300, "position_ids")})
    records = models.run(torch.device("cpu"), [torch.float32], progress=False, reps=2, inner=1)
    assert {r["layout"] for r in records} == {"padded", "packed"}
    assert all(r["graph_ms"] is None and r["median_ms"] > 0 for r in records)
    assert any(r["impl"].startswith("neft[") for r in records)
    assert "tiny" in models.table(records)
