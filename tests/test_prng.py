"""run.py under another default PRNG (rbg, common on TPUs): it trains, and its ticket is defined
on the same Threefry-drawn frozen weights as anywhere else, so it reloads under the default PRNG."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import slt_jax
from conftest import ROOT


@pytest.mark.slow  # run.py processes
def test_run_py_with_rbg_default_prng_gives_a_portable_ticket(tmp_path):
    env = dict(os.environ, JAX_DEFAULT_PRNG_IMPL="rbg", XLA_FLAGS="")
    p = subprocess.run([sys.executable, "run.py", "--workdir", str(tmp_path), "--config.num_epochs=0",
                        "--config.num_steps=40", "--config.progress=False", "--config.plots=False"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    summary = json.loads(p.stdout.strip().splitlines()[-1])
    assert summary["num_steps"] == 40 and 0.0 <= summary["sparsity"] <= 1.0

    config = json.loads((tmp_path / "config.json").read_text())
    ticket = slt_jax.load_ticket(str(tmp_path / "ticket"))  # this process: the default Threefry PRNG
    model = slt_jax.create_model(ticket.meta["model"])
    expected = jax.jit(lambda k: model.init(k, jnp.zeros((1, 8, 8, 1)), train=False))(
        jax.random.key(config["seed"], impl="threefry2x32"))["params"]
    for got, want in zip(jax.tree.leaves(ticket.frozen_params()), jax.tree.leaves(expected)):
        np.testing.assert_array_equal(np.asarray(got).view(np.uint32), np.asarray(want).view(np.uint32))
    # The mask the run measured is the one that reloads: same sparsity and validation accuracy inputs.
    kept = sum(int(np.sum(m)) for m in jax.tree.leaves(ticket.mask))
    total = sum(int(np.size(m)) for m in jax.tree.leaves(ticket.mask))
    assert abs((1 - kept / total) - summary["sparsity"]) < 1e-12
