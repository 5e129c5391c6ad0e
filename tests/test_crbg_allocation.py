"""CRBG's density_constraint: the per-leaf targets (ERK, global edge-popup's fan-in prior) and the
per-leaf multipliers that bring every layer to its own target."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from slt_jax import gates as gates_lib
from slt_jax.methods.crbg import CRBG, erk_densities, fan_in_densities
from slt_jax.methods.edgepopup import top_k_masks

LENET = [(784, 300), (300, 100), (100, 10)]
MLP = {"Dense_0": (64, 256), "Dense_1": (256, 256), "Dense_2": (256, 10)}
STEPS = 1000


def _counts(shapes):
    return [math.prod(s) for s in shapes]


@pytest.mark.parametrize("density", [0.05, 0.1, 0.3])
def test_erk_meets_the_budget_and_scales_with_sum_over_product_of_dims(density):
    t = erk_densities(LENET, _counts(LENET), density)
    assert np.dot(t, _counts(LENET)) == pytest.approx(density * sum(_counts(LENET)))
    assert np.all((t > 0) & (t <= 1))
    free = t < 1
    ratio = t[free] / np.array([sum(s) / math.prod(s) for s in LENET])[free]
    np.testing.assert_allclose(ratio, ratio[0])  # one eps for every leaf below the cap


def test_erk_keeps_lenets_classifier_dense_at_ninety_percent():
    t = erk_densities(LENET, _counts(LENET), 0.1)
    assert t[2] == 1.0 and t[0] < t[1] < 1.0


@pytest.mark.parametrize("density", [0.05, 0.1])
def test_fan_in_targets_are_what_a_global_top_k_of_edgepopups_initial_scores_keeps(density):
    # Edge-popup draws scores U(-1/sqrt(fan_in), 1/sqrt(fan_in)); a global top-k of |s| keeps, per
    # leaf, the fraction the closed form gives.
    keys = jax.random.split(jax.random.PRNGKey(0), len(LENET))
    scores = [jax.random.uniform(k, s, minval=-1, maxval=1) / math.sqrt(s[0]) for k, s in zip(keys, LENET)]
    kept = [float(jnp.mean(m)) for m in top_k_masks(scores, density, "global")]
    t = fan_in_densities(LENET, _counts(LENET), density)
    np.testing.assert_allclose(kept, t, atol=0.02)
    assert np.dot(t, _counts(LENET)) == pytest.approx(density * sum(_counts(LENET)), rel=1e-6)


def test_fan_in_empties_the_wide_middle_layer_of_an_eight_by_eight_lenet():
    # Global edge-popup's collapse on the 8x8 digits: the 300-input layer gets no weights.
    shapes = [(64, 300), (300, 100), (100, 10)]
    t = fan_in_densities(shapes, _counts(shapes), 0.1)
    assert t[1] == 0.0 and t[0] > 0.1


def _gates(seed=0):
    """All gates open, mu ~ U(0.5, 1.5)."""
    rng = np.random.default_rng(seed)
    return {name: {"kernel": jnp.asarray(rng.uniform(0.5, 1.5, shape), jnp.float32)} for name, shape in MLP.items()}


def _descend(method, gates, steps):
    """Adam on ``penalty - sum_l mean_l(g)`` (a stand-in for the data loss that wants every gate
    open; g = test gate), the multipliers stepped as in training; the gates and the last aux."""
    tx = method.optimizer()

    def objective(gates, state, t):
        penalty, aux = method.penalty(gates, state, t)
        return penalty - sum(jnp.mean(g) for g in jax.tree.leaves(gates_lib.deterministic_gates(gates))), aux

    @jax.jit
    def step(gates, opt_state, state, t):
        (_, aux), grads = jax.value_and_grad(objective, has_aux=True)(gates, state, t)
        updates, opt_state = tx.update(grads, opt_state, gates)
        return jax.tree.map(jnp.add, gates, updates), opt_state, method.update_state(state, aux), aux

    opt_state, state = tx.init(gates), method.init_state(gates)
    for t in range(steps):
        gates, opt_state, state, aux = step(gates, opt_state, state, t)
    return gates, aux


def _leaf_densities(method, gates):
    return {name + "/kernel": float(jnp.mean(m["kernel"])) for name, m in method.binary_masks(gates).items()}


@pytest.mark.parametrize("rule", ["per_layer", "erk", "fan_in"])
def test_per_leaf_multipliers_bring_every_layer_to_its_own_target(rule):
    # The multipliers alone: the default shift would put each leaf on its target whatever they do.
    method = CRBG(num_steps=STEPS, sparsity=0.8, density_constraint=rule, learning_rate=0.01, decision_weight=0.0,
                  shift_onto_target=False, target_ramp=0.0)
    gates, _ = _descend(method, _gates(), STEPS)
    names, _, targets = method.leaf_budget(gates)
    density = _leaf_densities(method, gates)
    assert (np.ptp(targets) == 0) == (rule == "per_layer")
    for name, target in zip(names, targets):
        assert density[name] == pytest.approx(target, abs=0.02), name


def test_the_global_constraint_leaves_the_split_to_the_gates():
    # The same descent under the one global constraint: a gate of a small leaf weighs more in the
    # stand-in loss, so the leaves end far apart (the per-leaf test above is not passed by chance).
    method = CRBG(num_steps=STEPS, sparsity=0.8, learning_rate=0.01, decision_weight=0.0,
                  shift_onto_target=False, target_ramp=0.0)
    gates, aux = _descend(method, _gates(), STEPS)
    assert float(aux["binary_density"]) < 0.25
    density = _leaf_densities(method, gates)
    assert density["Dense_2/kernel"] == 1.0 and density["Dense_1/kernel"] < 0.1 < 0.5 < density["Dense_0/kernel"]


def test_bad_density_constraints_are_refused_with_the_allowed_values():
    with pytest.raises(ValueError, match="'layer'.*allowed: global, per_layer, erk, fan_in"):
        CRBG(num_steps=1, density_constraint="layer")
    with pytest.raises(ValueError, match="'per_layer' needs binary_rule 'threshold'"):
        CRBG(num_steps=1, density_constraint="per_layer", binary_rule="rank")
    with pytest.raises(ValueError, match="call init_state\\(gates\\)"):
        CRBG(num_steps=1, density_constraint="erk").init_state()


def test_gate_margin_keeps_every_gate_within_reach_of_the_noise():
    # The penalty alone drives closed gates down without end; the projection stops them at -m.
    gates = {"Dense_0": {"kernel": jnp.full((8, 8), 0.2)}}
    for margin, low in ((0.0, -1.0), (0.5, -0.5)):
        method = CRBG(num_steps=400, sparsity=0.9, lambda_mode="fixed", lam=1.0, learning_rate=0.05,
                      decision_weight=0.0, gate_margin=margin, shift_onto_target=False)
        tx = method.optimizer()
        g, opt_state = gates, tx.init(gates)
        grad = jax.jit(jax.grad(lambda g: method.penalty(g, method.init_state(), 0)[0]))
        for _ in range(400):
            updates, opt_state = tx.update(grad(g), opt_state, g)
            g = jax.tree.map(jnp.add, g, updates)
        mu = np.asarray(g["Dense_0"]["kernel"])
        assert (mu.min() >= low - 1e-6) if margin else (mu.max() < low)
    with pytest.raises(ValueError, match="gate_margin.*'hard_concrete'"):
        CRBG(num_steps=1, family="hard_concrete", gate_margin=0.5, shift_onto_target=False)
