"""Supermask: Bernoulli samples with a straight-through gradient to sigmoid(s), the deterministic
ticket s > 0, the multiplier that holds a requested sparsity, and a run.py ticket the independent
verifier accepts."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from slt_jax.methods import Supermask

from conftest import run_default_cli, verify_on_digits_test_split

SCORES = {"a": {"kernel": jnp.linspace(-3.0, 3.0, 13)}, "b": None}


def test_training_mask_is_binary_with_frequency_sigmoid_and_straight_through_gradient():
    method = Supermask(num_steps=1)
    s = jnp.broadcast_to(jnp.linspace(-3.0, 3.0, 13), (20_000, 13))
    m = method.train_masks({"k": s}, jax.random.PRNGKey(0), 0)["k"]
    assert set(np.unique(np.asarray(m))) <= {0.0, 1.0}
    p = np.asarray(jax.nn.sigmoid(s[0]))
    np.testing.assert_array_less(np.abs(np.asarray(m).mean(0) - p), 5 * np.sqrt(p * (1 - p) / 20_000) + 1e-3)
    grad = jax.grad(lambda t: jnp.sum(method.train_masks({"k": t}, jax.random.PRNGKey(1), 0)["k"] * 2.0))(s[0])
    np.testing.assert_allclose(grad, 2.0 * p * (1 - p), rtol=1e-6)


def test_ticket_keeps_positive_scores_and_tree_structure():
    method = Supermask(num_steps=1)
    mask = method.binary_masks(SCORES)
    assert mask["b"] is None
    np.testing.assert_array_equal(mask["a"]["kernel"], np.linspace(-3.0, 3.0, 13) > 0)
    shapes = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, jnp.float32), SCORES)
    scores = method.init(jax.random.PRNGKey(0), shapes)
    assert scores["b"] is None and not np.any(np.asarray(scores["a"]["kernel"]))  # the reference: every s = 0


def test_penalty_is_zero_without_sparsity_control_and_lambda_weighted_with_it():
    state = {"lambda": jnp.float32(2.0), "integral": jnp.float32(2.0)}
    free, aux = Supermask(num_steps=1, sparsity=0.8, sparsity_control="none").penalty(SCORES, state, 0)
    assert float(free) == 0.0 and float(aux["binary_density"]) == pytest.approx(6 / 13)
    dual, aux = Supermask(num_steps=1, sparsity=0.8).penalty(SCORES, state, 0)
    expected = 2.0 * (float(jnp.mean(jax.nn.sigmoid(SCORES["a"]["kernel"]))) - 0.2)
    assert float(dual) == pytest.approx(expected, rel=1e-6)
    # The binary density 6/13 exceeds the target 0.2: the multiplier grows; "none" leaves it.
    assert float(Supermask(num_steps=1, sparsity=0.8).update_state(state, aux)["lambda"]) > 2.0
    assert Supermask(num_steps=1, sparsity_control="none").update_state(state, aux) is state
    with pytest.raises(ValueError, match="'sometimes'.*dual, none"):
        Supermask(num_steps=1, sparsity_control="sometimes")


@pytest.mark.slow  # the default run through run.py: minutes on 2 cores
def test_run_py_supermask_lands_on_its_target_and_the_verifier_accepts_the_ticket(tmp_path):
    summary = run_default_cli(tmp_path, "--config.method=supermask", "--config.sparsity=0.8")
    assert summary["sparsity"] >= 0.79 and summary["test_accuracy"] >= 0.9, summary
    verified = verify_on_digits_test_split(tmp_path / "ticket")
    assert verified["accuracy"] == pytest.approx(summary["test_accuracy"])
    assert verified["sparsity"] == pytest.approx(summary["sparsity"])
