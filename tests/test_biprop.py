"""biprop: edge-popup's masks over binarised weights sign(w0) * alpha, alpha the kept weights' mean
magnitude per leaf; a ticket whose frozen_params() are those weights, accepted by the verifier."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from slt_jax import load_ticket, masking
from slt_jax.frozen import binarized_weights
from slt_jax.methods import Biprop

from conftest import run_default_cli, verify_on_digits_test_split

PARAMS = {"Dense_0": {"kernel": jnp.array([[0.5, -2.0], [1.0, -0.25]]), "bias": jnp.array([0.3, -0.3])}}
MASKS = {"Dense_0": {"kernel": jnp.array([[True, False], [True, True]]), "bias": None}}


def test_binarized_weights_are_signs_times_the_kept_mean_magnitude():
    out = binarized_weights(PARAMS, MASKS)
    alpha = (0.5 + 1.0 + 0.25) / 3
    np.testing.assert_allclose(out["Dense_0"]["kernel"], np.sign(PARAMS["Dense_0"]["kernel"]) * alpha, rtol=1e-6)
    np.testing.assert_array_equal(out["Dense_0"]["bias"], PARAMS["Dense_0"]["bias"])  # not gated: unchanged


def test_masked_params_drop_the_pruned_weights_and_scores_get_gradient_through_alpha():
    method = Biprop(num_steps=1, sparsity=0.5)
    masked = method.masked_params(PARAMS, MASKS)
    expected = np.where(MASKS["Dense_0"]["kernel"], np.sign(PARAMS["Dense_0"]["kernel"]) * (1.75 / 3), 0.0)
    np.testing.assert_allclose(masked["Dense_0"]["kernel"], expected, rtol=1e-6)
    scores = {"Dense_0": {"kernel": jnp.array([[0.4, -0.1], [0.3, 0.2]]), "bias": None}}

    def loss(s):
        m = method.train_masks(s, None, 0)
        return jnp.sum(method.masked_params(PARAMS, m)["Dense_0"]["kernel"] * jnp.array([[1.0, 2.0], [3.0, 4.0]]))

    grad = jax.grad(loss)(scores)["Dense_0"]["kernel"]
    assert np.all(np.isfinite(grad)) and np.any(grad != 0)


@pytest.mark.slow  # the default run through run.py: minutes on 2 cores
def test_run_py_biprop_ticket_is_accepted_by_the_verifier(tmp_path):
    summary = run_default_cli(tmp_path, "--config.method=biprop", "--config.sparsity=0.8")
    assert summary["sparsity"] == pytest.approx(0.8, abs=1e-3) and summary["test_accuracy"] >= 0.9, summary
    ticket = load_ticket(str(tmp_path / "ticket"))
    assert ticket.meta["weights"] == "binarized"
    for name, w in masking.named_leaves(ticket.frozen_params()).items():
        assert np.unique(np.abs(w)).size == 1, name  # one magnitude per gated leaf: signs times a gain
    verified = verify_on_digits_test_split(tmp_path / "ticket")
    assert verified["accuracy"] == pytest.approx(summary["test_accuracy"])
