"""The gate-dynamics notebook runs top to bottom, and is committed without outputs."""
import os

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "notebooks", "gate_dynamics.ipynb")


def _kernel_env() -> dict[str, str]:
    # The notebook runs as a user runs it, on the one CPU device JAX sees by default, not on the
    # 8 simulated devices conftest sets for this process.
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join(flags)
    env.pop("MPLBACKEND", None)  # let ipykernel choose its inline backend: figures land in the outputs
    return env


@pytest.mark.slow  # a Jupyter kernel runs the whole notebook
def test_notebook_executes():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(nb, kernel_name="python3", timeout=300,
                            resources={"metadata": {"path": os.path.dirname(NOTEBOOK)}})
    client.execute(env=_kernel_env())  # raises CellExecutionError, naming the cell, on any error
    plotting = [c for c in nb.cells if c.cell_type == "code" and "plt.subplots" in c.source]
    blank = [c.source.splitlines()[0] for c in plotting
             if not any("image/png" in o.get("data", {}) for o in c.outputs)]
    assert plotting and not blank, f"plotting cells without a figure: {blank}"


def test_committed_notebook_has_no_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    dirty = [i for i, c in enumerate(nb.cells)
             if c.cell_type == "code" and (c.outputs or c.execution_count is not None)]
    assert not dirty, f"cells {dirty} hold outputs; clear all outputs before committing"
