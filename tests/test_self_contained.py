"""A clone of the repository alone runs every test, README command, config and benchmark default:
no tracked text file names a path that climbs out of the repository (to a folder beside it), in
either spelling a path takes in this code."""
import os
import re
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXT = (".py", ".md", ".toml", ".ipynb", ".sh", ".cfg", ".txt")
RELATIVE = re.compile(r"(?:\.\./)+[\w.-]+")  # ../name, ../../name, ...
JOINED = re.compile(r"""["']\.\.["']\s*,""")  # os.path.join(ROOT, "..", ...)


def _inside(base: str, relative: str) -> bool:
    return os.path.normpath(os.path.join(base, relative)).startswith(ROOT + os.sep)


def outside_paths(line: str, folder: str) -> list[str]:
    """The paths in ``line`` that leave the repository. A relative path leaves it when it does so both
    from the repository root (a command's working directory) and from ``folder``, the file's own
    (a link between docs pages)."""
    found = [m.group() for m in RELATIVE.finditer(line)
             if not _inside(ROOT, m.group()) and not _inside(folder, m.group())]
    return found + [m.group() for m in JOINED.finditer(line)]


def test_no_tracked_file_names_a_path_outside_the_repository():
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    this = os.path.relpath(__file__, ROOT)
    texts = [name for name in files if name != this and (name.endswith(TEXT) or name == ".ci/run")]
    hits = [f"{name}:{number}: {path}" for name in texts
            for number, line in enumerate(open(os.path.join(ROOT, name), errors="replace"), 1)
            for path in outside_paths(line, os.path.dirname(os.path.join(ROOT, name)))]
    assert not hits, f"paths outside the repository: {hits}"


def test_both_spellings_are_caught_and_links_between_docs_pages_are_not():
    docs = os.path.join(ROOT, "docs", "api")
    assert outside_paths('VERIFY = os.path.join(ROOT, "..", "tools", "verify.py")', ROOT)
    assert outside_paths("--dataset npz:../data/mnist.npz", ROOT)
    assert outside_paths("--dataset npz:../../../data/mnist.npz", docs)  # above the root from docs/api too
    assert not outside_paths("the [Linen guide](../guide-linen.md)", docs)
    assert not outside_paths('slt_jax.gated(Backbone(), CRBG, seed=1, name="data")', ROOT)
