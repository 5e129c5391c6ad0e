"""The method inside Optax (``slt_jax.with_penalty``): the penalty's gradient added to the data
loss's, the multiplier carried in the optimiser state, and the same ticket as the explicit
``penalty`` / ``update_state`` loop."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from sklearn.datasets import load_digits

import slt_jax
from slt_jax import masking
from slt_jax.penalty_optax import PenaltyState, penalty_state


def _gates(method, key=0):
    params = {"a": {"kernel": jnp.ones((6, 5)), "bias": jnp.ones(5)}, "b": {"kernel": jnp.ones((5, 3))}}
    return method.init(jax.random.key(key), masking.gate_shapes(params))


def test_one_update_adds_the_penalty_gradient_and_steps_the_multiplier():
    # The multiplier alone: no shift after sgd, so the update is exactly -(data + penalty gradient).
    method = slt_jax.CRBG(num_steps=10, sparsity=0.7, lam=0.3, shift_onto_target=False, target_ramp=0.0)
    gates = _gates(method)
    grads = jax.tree.map(lambda g: jnp.full_like(g, 0.01), gates)  # a data gradient
    tx = slt_jax.with_penalty(method, optax.sgd(1.0))
    state = tx.init(gates)
    updates, state = tx.update(grads, state, gates)

    lam_state = method.init_state(gates)
    (_, aux), penalty_grads = jax.value_and_grad(method.penalty, has_aux=True)(gates, lam_state, 0)
    expected = jax.tree.map(lambda g, p: -(g + p), grads, penalty_grads)
    for u, e in zip(jax.tree.leaves(updates), jax.tree.leaves(expected)):
        np.testing.assert_array_equal(u, e)
    assert any(bool(jnp.any(p != 0)) for p in jax.tree.leaves(penalty_grads))  # lambda > 0: a real term
    assert int(state.step) == 1
    for k, v in method.update_state(lam_state, aux).items():
        np.testing.assert_array_equal(state.method_state[k], v)
    np.testing.assert_array_equal(state.aux["binary_density"], aux["binary_density"])
    assert updates["a"]["bias"] is None  # ungated leaves stay None


def test_a_method_without_a_penalty_passes_the_gradient_through():
    method = slt_jax.EdgePopup(num_steps=10)
    gates = _gates(method)
    grads = jax.tree.map(jnp.ones_like, gates)
    inner = optax.sgd(0.5)
    tx = slt_jax.with_penalty(method, inner)
    updates, state = tx.update(grads, tx.init(gates), gates)
    plain, _ = inner.update(grads, inner.init(gates), gates)
    jax.tree.map(np.testing.assert_array_equal, updates, plain)
    assert state.method_state == {}


def test_default_inner_optimiser_is_the_methods_recipe():
    method = slt_jax.CRBG(num_steps=10, lam=0.0, lambda_mode="fixed", decision_weight=0.0)  # the penalty is 0
    gates = _gates(method)
    grads = jax.tree.map(jnp.ones_like, gates)
    updates, _ = slt_jax.with_penalty(method).update(grads, slt_jax.with_penalty(method).init(gates), gates)
    recipe = method.optimizer()
    plain, _ = recipe.update(grads, recipe.init(gates), gates)
    jax.tree.map(np.testing.assert_array_equal, updates, plain)


def test_iterand_is_refused_in_one_line():
    method = slt_jax.IteRand(num_steps=10)
    with pytest.raises(ValueError, match="iterand") as e:
        slt_jax.with_penalty(method, optax.sgd(0.1))
    assert "\n" not in str(e.value)


def test_update_without_params_is_refused_in_one_line():
    method = slt_jax.CRBG(num_steps=10)
    gates = _gates(method)
    tx = slt_jax.with_penalty(method, optax.sgd(0.1))
    with pytest.raises(ValueError, match="params") as e:
        tx.update(gates, tx.init(gates))
    assert "\n" not in str(e.value)


def test_inside_gates_only_on_a_variables_tree():
    # gates_only hands the inner transformation the whole variables tree, the frozen part masked:
    # the penalty is taken on "gates" and the frozen weights still never move.
    method = slt_jax.CRBG(num_steps=10, lam=0.5)
    gates = _gates(method)
    variables = {"frozen": {"a": {"kernel": jnp.ones((6, 5)), "bias": jnp.ones(5)}, "b": {"kernel": jnp.ones((5, 3))}},
                 "gates": gates}
    grads = jax.tree.map(jnp.zeros_like, variables)
    tx = slt_jax.gates_only(slt_jax.with_penalty(method, optax.sgd(1.0)))
    updates, opt_state = tx.update(grads, tx.init(variables), variables)
    alone = slt_jax.with_penalty(method, optax.sgd(1.0))
    expected, _ = alone.update(grads["gates"], alone.init(gates), gates)
    jax.tree.map(np.testing.assert_array_equal, updates["gates"], expected)
    assert all(bool(jnp.all(u == 0)) for u in jax.tree.leaves(updates["frozen"]))
    assert int(penalty_state(opt_state).step) == 1


def test_penalty_state_finds_the_state_in_a_chain_and_says_when_there_is_none():
    method = slt_jax.CRBG(num_steps=10)
    gates = _gates(method)
    chained = optax.chain(optax.clip_by_global_norm(1.0), slt_jax.with_penalty(method, optax.adam(0.1)))
    assert isinstance(penalty_state(chained.init(gates)), PenaltyState)
    assert penalty_state(optax.adam(0.1).init(gates)) is None


class _MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(64, use_bias=False)(x))
        return nn.Dense(10, use_bias=False)(x)


def _digits_tickets(steps=150):
    x, y = load_digits(return_X_y=True)
    x = (x / 16).astype(np.float32)[:1024]
    y = y[:1024]
    model = _MLP()
    frozen = slt_jax.init_variables(model, (64,), seed=0)["params"]
    method = slt_jax.CRBG(num_steps=steps, sparsity=0.8)
    gates0 = method.init(jax.random.key(1), slt_jax.gate_shapes(frozen))
    key = jax.random.key(2)
    batches = [np.random.default_rng(t).choice(len(x), 64, replace=False) for t in range(steps)]

    def ce(gates, step, k, xb, yb):
        params = masking.apply_masks(frozen, method.train_masks(gates, k, step))
        return optax.softmax_cross_entropy_with_integer_labels(model.apply({"params": params}, xb), yb).mean()

    # The explicit form: penalty in the loss, the multiplier stepped by hand.
    tx = method.optimizer()

    @jax.jit
    def explicit_step(gates, opt_state, lam_state, step, k, xb, yb):
        def loss(g):
            penalty, aux = method.penalty(g, lam_state, step)
            return ce(g, step, k, xb, yb) + penalty, aux

        grads, aux = jax.grad(loss, has_aux=True)(gates)
        updates, opt_state = tx.update(grads, opt_state, gates)
        return optax.apply_updates(gates, updates), opt_state, method.update_state(lam_state, aux)

    # The Optax form: the data loss alone.
    ptx = slt_jax.with_penalty(method, method.optimizer())

    @jax.jit
    def optax_step(gates, opt_state, step, k, xb, yb):
        grads = jax.grad(ce)(gates, step, k, xb, yb)
        updates, opt_state = ptx.update(grads, opt_state, gates)
        return optax.apply_updates(gates, updates), opt_state

    g1, s1, lam = gates0, tx.init(gates0), method.init_state(gates0)
    g2, s2 = gates0, ptx.init(gates0)
    for t, idx in enumerate(batches):
        k = jax.random.fold_in(key, t)
        g1, s1, lam = explicit_step(g1, s1, lam, t, k, x[idx], y[idx])
        g2, s2 = optax_step(g2, s2, t, k, x[idx], y[idx])
    return method, (g1, lam), (g2, s2)


def test_the_optax_form_and_the_explicit_form_give_the_same_ticket():
    method, (g1, lam), (g2, s2) = _digits_tickets()
    m1, m2 = method.binary_masks(g1), method.binary_masks(g2)
    for a, b in zip(jax.tree.leaves(m1), jax.tree.leaves(m2)):
        np.testing.assert_array_equal(a, b)
    kept = np.mean(np.concatenate([np.ravel(m) for m in jax.tree.leaves(m1)]))
    assert 0.1 < kept < 0.4  # the multiplier did its work: near the 0.2 target, not the dense start
    np.testing.assert_allclose(penalty_state(s2).method_state["lambda"], lam["lambda"], rtol=1e-5, atol=1e-7)
    assert int(penalty_state(s2).step) == method.num_steps
