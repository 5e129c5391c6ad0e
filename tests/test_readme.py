"""The README's "In your own JAX code" blocks run exactly as written and keep their promise:
the binary ticket lands within a point of its target sparsity with accuracy >= 0.9."""
import json
import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT

SECTION = "### In your own JAX code"


def _blocks() -> list[str]:
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    section = text.split(SECTION, 1)[1].split("\n## ", 1)[0].split("\n### ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_the_section_holds_a_linen_and_an_nnx_block():
    blocks = _blocks()
    assert len(blocks) == 2
    assert "flax.linen" in blocks[0] and "from flax import nnx" in blocks[1]


@pytest.mark.parametrize("index", [0, 1], ids=["linen", "nnx"])
def test_readme_block_runs_as_written(index, tmp_path):
    script = tmp_path / "block.py"
    script.write_text(_blocks()[index])
    # As a user runs it: one CPU device (conftest gives this process 8), from a fresh directory.
    env = dict(os.environ, XLA_FLAGS="", PYTHONPATH=ROOT)
    p = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    result = json.loads(p.stdout.strip().splitlines()[-1])
    assert abs(result["sparsity"] - result["target_sparsity"]) <= 0.01, result
    assert result["accuracy"] >= 0.9, result
