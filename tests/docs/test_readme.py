"""Every Python block of the README runs as written, in a fresh interpreter, and prints what it says."""

import os
import re
import subprocess
import sys

import pytest

from support import ROOT

BLOCKS = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)


def test_the_readme_has_python_blocks():
    assert len(BLOCKS) >= 2


@pytest.mark.slow  # each block in a fresh interpreter; one trains with the Trainer
@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_block_runs_as_written(index, tmp_path):
    if "transformers" in BLOCKS[index]:
        pytest.importorskip("transformers")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", BLOCKS[index]], capture_output=True, text=True, cwd=tmp_path, env=env,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    # A print whose comment is a list literal prints exactly that list (the Trainer block's alphas).
    for expected in re.findall(r"^print\(.*\)\s+# (\[.*\])$", BLOCKS[index], re.M):
        assert expected in res.stdout.splitlines(), (expected, res.stdout[-2000:])
