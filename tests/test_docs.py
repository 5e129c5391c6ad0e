"""The docs build warning-free and every python block in README.md and docs/ runs exactly as written.

A block that prints the ticket's JSON line (README's library block, the Linen and NNX guides) also
keeps its promise: the binary ticket lands within a point of its target sparsity with accuracy >= 0.9.
A block preceded by the line ``<!-- test: slow -->`` takes more than ~20 s and runs with ``-m slow``.
Identical blocks (README's and docs/index.md's) run once.
"""
import glob
import json
import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT

SLOW_MARK = "<!-- test: slow -->"
BLOCK = re.compile(r"^(<!-- test: slow -->\n)?```python\n(.*?)^```", flags=re.S | re.M)
TICKET_PAGES = ("README.md", "docs/index.md", "docs/guide-linen.md", "docs/guide-nnx.md")


def _doc_files() -> list[str]:
    pages = sorted(glob.glob("docs/**/*.md", root_dir=ROOT, recursive=True))
    return ["README.md", *pages]


def _blocks() -> dict[str, dict]:
    """Each distinct python block: its source, where it appears ('FILE#N', N counting from 1) and
    whether it is marked slow."""
    blocks: dict[str, dict] = {}
    for name in _doc_files():
        with open(os.path.join(ROOT, name)) as f:
            text = f.read()
        for n, m in enumerate(BLOCK.finditer(text), 1):
            entry = blocks.setdefault(m.group(2), {"where": [], "slow": False})
            entry["where"].append(f"{name}#{n}")
            entry["slow"] |= bool(m.group(1))
    return blocks


def _params():
    return [pytest.param(source, id=" = ".join(b["where"]), marks=[pytest.mark.slow] if b["slow"] else [])
            for source, b in _blocks().items()]


def test_every_python_fence_is_found():
    # A fence the regex misses (indented, "py", or with attributes) would silently go untested.
    fences = sum(len(re.findall(r"^ *```\s*(python|py|python3)\b", open(os.path.join(ROOT, n)).read(), flags=re.M))
                 for n in _doc_files())
    assert fences == sum(len(b["where"]) for b in _blocks().values())


def test_the_ticket_pages_hold_their_blocks():
    where: dict[str, str] = {}  # each page's blocks, joined: a page may hold more than its ticket block
    for source, b in _blocks().items():
        for page in {w.split("#")[0] for w in b["where"]}:
            where[page] = where.get(page, "") + source
    for page in TICKET_PAGES:
        assert '"target_sparsity"' in where.get(page, ""), f"{page} has no block printing the ticket's JSON"
    assert "flax.linen" in where["docs/guide-linen.md"]
    assert "from flax import nnx" in where["docs/guide-nnx.md"]


@pytest.mark.parametrize("source", _params())
def test_block_runs_as_written(source, tmp_path):
    script = tmp_path / "block.py"
    script.write_text(source)
    # As a user runs it: one CPU device (conftest gives this process 8), from a fresh directory.
    env = dict(os.environ, XLA_FLAGS="", PYTHONPATH=ROOT)
    p = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    if '"target_sparsity"' in source:
        result = json.loads(p.stdout.strip().splitlines()[-1])
        assert abs(result["sparsity"] - result["target_sparsity"]) <= 0.01, result
        assert result["accuracy"] >= 0.9, result


def test_docs_build_strict_with_every_public_name(tmp_path):
    site = tmp_path / "site"
    p = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file",
                        os.path.join(ROOT, "mkdocs.yml"), "--site-dir", str(site)],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    assert "WARNING" not in p.stderr, p.stderr[-3000:]
    import slt_jax

    html = "".join(open(f).read() for f in glob.glob(str(site / "api" / "**" / "*.html"), recursive=True))
    undocumented = [name for name in slt_jax.__all__ if not re.search(rf'id="slt_jax\.[\w.]*\.{name}"', html)]
    assert not undocumented, f"public names missing from the API reference: {undocumented}"
