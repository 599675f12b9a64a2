"""The recipes under examples/ (Trainer, TRL padded / packing / padding-free, LoRA) run as written, at
their default tiny size, in a fresh interpreter."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _run(script: str, *args: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, script, "--max-steps", "10", *args], capture_output=True, text=True,
                         cwd=EXAMPLES, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout


@pytest.mark.slow
def test_trainer_recipe_logs_the_noise_with_a_schedule():
    out = _run("train_trainer.py", "--noise-tokens", "response", "--schedule", "linear", "--distribution", "gaussian",
               "--output-dir", "/tmp/neft-recipe-trainer")
    lines = [line for line in out.splitlines() if line.startswith("step")]
    assert len(lines) == 2 and "alpha 3.00" in lines[0] and "alpha 0.50" in lines[1]  # 5 at step 0, 0 at step 10


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["padded", "packing", "padding_free"])
def test_trl_recipe(mode):
    pytest.importorskip("trl")
    out = _run("train_trl.py", "--mode", mode, "--output-dir", f"/tmp/neft-recipe-trl-{mode}")
    lengths = [float(line.split("mean L")[1].split()[0]) for line in out.splitlines() if line.startswith("step")]
    assert lengths and all(4 < length < 30 for length in lengths)  # per sequence, never a packed row's 128


@pytest.mark.slow
def test_lora_recipe(tmp_path):
    pytest.importorskip("peft")
    out = _run("train_lora.py", "--output-dir", str(tmp_path))
    assert "next alpha" in out and (tmp_path / "adapter_config.json").exists()
