"""A clone of the repository alone runs every test, README command, config and benchmark default:
no tracked file names the sibling folder the developers' data sits in (``../shared``), in either
spelling a path takes in this code."""
import os
import re
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# "../shared" in a string or a command, or os.path.join(..., "..", "shared", ...).
OUTSIDE = re.compile(r"""\.\./shared|["']\.\.["']\s*,\s*["']shared["']""")
TEXT = (".py", ".md", ".toml", ".ipynb", ".sh", ".cfg", ".txt")


def test_no_tracked_file_names_a_folder_beside_the_repository():
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    this = os.path.relpath(__file__, ROOT)
    texts = [name for name in files if name != this and (name.endswith(TEXT) or name == ".ci/run")]
    hits = [f"{name}:{number}" for name in texts
            for number, line in enumerate(open(os.path.join(ROOT, name), errors="replace"), 1) if OUTSIDE.search(line)]
    assert not hits, f"paths outside the repository: {hits}"


def test_the_pattern_catches_both_spellings():
    assert OUTSIDE.search('VERIFY = os.path.join(ROOT, "..", "shared", "tools", "verify_ticket.py")')
    assert OUTSIDE.search("--dataset npz:../shared/data/mnist_train.npz")
    assert not OUTSIDE.search('g = slt_jax.gated(Backbone(), CRBG, seed=1, name="shared")')
