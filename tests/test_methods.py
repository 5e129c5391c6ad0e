"""Edge-popup's exact top-k and straight-through gradient; CRBG's dual ascent, penalty and anneal;
a short run of each method on digits is well above chance."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from slt_jax import gates as gates_lib
from slt_jax import masking
from slt_jax.methods import create_method
from slt_jax.methods.crbg import CRBG
from slt_jax.methods.edgepopup import EdgePopup, kth_largest_threshold
from slt_jax.train import train_and_evaluate

# A digits MLP's kernels: the first and the last layer are the smallest and most lopsided.
SHAPES = {"Dense_0/kernel": (64, 256), "Dense_1/kernel": (256, 256), "Dense_2/kernel": (256, 10)}
SPARSITIES = [0.1, 0.5, 0.8, 0.93, 0.99]


def _scores(seed=0):
    keys = jax.random.split(jax.random.PRNGKey(seed), len(SHAPES))
    return {n: jax.random.normal(k, s) for k, (n, s) in zip(keys, SHAPES.items())}


def _separates(kept_abs, dropped_abs):
    return kept_abs.size == 0 or dropped_abs.size == 0 or kept_abs.min() >= dropped_abs.max()


@pytest.mark.parametrize("sparsity", SPARSITIES)
def test_edgepopup_keeps_exactly_the_requested_fraction_per_layer(sparsity):
    method = EdgePopup(num_steps=1, sparsity=sparsity, scope="layer")
    scores = _scores()
    masks = method.binary_masks(scores)
    soft = method.train_masks(scores, None, 0)
    for name, s in scores.items():
        m, a = np.asarray(masks[name]), np.abs(np.asarray(s))
        assert m.sum() == round((1 - sparsity) * s.size), name
        assert _separates(a[m], a[~m]), name  # the largest |s| are the ones kept
        np.testing.assert_array_equal(soft[name], m.astype(np.float32))  # the training forward: exactly 0 or 1


@pytest.mark.parametrize("sparsity", SPARSITIES)
def test_edgepopup_global_scope_keeps_the_fraction_over_all_layers(sparsity):
    method = EdgePopup(num_steps=1, sparsity=sparsity, scope="global")
    # Scale each layer differently so a global threshold keeps different fractions per layer.
    scores = {n: s * (i + 1) for i, (n, s) in enumerate(_scores(1).items())}
    masks = method.binary_masks(scores)
    total = sum(s.size for s in scores.values())
    kept = sum(int(np.sum(m)) for m in masks.values())
    assert kept == round((1 - sparsity) * total)
    a = np.concatenate([np.abs(np.asarray(s)).ravel() for s in scores.values()])
    m = np.concatenate([np.asarray(masks[n]).ravel() for n in scores])
    assert _separates(a[m], a[~m])
    per_layer = [float(np.mean(masks[n])) for n in scores]
    assert max(per_layer) - min(per_layer) > 0.01


def test_kth_largest_threshold_equals_the_sorted_kth_value():
    rng = np.random.default_rng(0)
    arrays = [
        rng.standard_normal(1000),
        rng.standard_normal(777) * 1e-38,  # subnormals
        rng.standard_normal(500) * 1e38,
        np.concatenate([np.zeros(50), -np.ones(20), rng.standard_normal(30) * 1e-3]),  # zeros and ties
        np.array([-3.0]),
    ]
    threshold = jax.jit(kth_largest_threshold)  # k traced: one compile per input shape
    for x in arrays:
        a = np.abs(x.astype(np.float32))
        desc = np.sort(a)[::-1]
        for k in sorted({1, 2, len(a) // 3, len(a) // 2, len(a) - 1, len(a)} & set(range(1, len(a) + 1))):
            t = threshold([jnp.abs(jnp.asarray(x, jnp.float32))], k)  # negative scores via abs
            assert np.float32(t) == desc[k - 1], (len(a), k)
    # Several arrays at once: the k-th largest of their union.
    parts = [np.abs(rng.standard_normal(n).astype(np.float32)) for n in (10, 300, 7)]
    desc = np.sort(np.concatenate(parts))[::-1]
    for k in (1, 5, 100, 317):
        assert np.float32(threshold([jnp.asarray(p) for p in parts], k)) == desc[k - 1]


def test_edgepopup_straight_through_gradient_matches_hand_computation():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((6, 5)).astype(np.float32)
    x = rng.standard_normal((4, 6)).astype(np.float32)
    c = rng.standard_normal((4, 5)).astype(np.float32)
    s = rng.standard_normal((6, 5)).astype(np.float32)  # negative scores too: the abs's sign matters
    method = EdgePopup(num_steps=1, sparsity=0.6)

    def loss(scores):
        params = masking.apply_masks({"d": {"kernel": jnp.asarray(w)}}, method.train_masks(scores, None, 0))
        return jnp.sum(c * (x @ params["d"]["kernel"]))

    grad = np.asarray(jax.grad(loss)({"d/kernel": jnp.asarray(s)})["d/kernel"])
    dl_dweff = x.T @ c  # L = sum(c * (x @ w_eff)), whatever the mask
    np.testing.assert_allclose(grad, dl_dweff * w * np.sign(s), rtol=1e-5, atol=1e-6)


def test_edgepopup_scores_start_kaiming_uniform():
    scores = EdgePopup(num_steps=1).init(jax.random.PRNGKey(0), SHAPES)
    for name, shape in SHAPES.items():
        bound = 1 / math.sqrt(shape[0])
        s = np.asarray(scores[name])
        assert s.shape == shape and np.abs(s).max() <= bound and np.abs(s).max() > 0.95 * bound
    assert not np.array_equal(scores["Dense_0/kernel"][:, :10], scores["Dense_2/kernel"][:64])


def _gates(mu):
    return {n: jnp.full(s, mu) for n, s in SHAPES.items()}


def test_crbg_dual_ascent_raises_lambda_while_too_dense_and_keeps_it_nonnegative():
    method = CRBG(num_steps=100, sparsity=0.9, dual_lr=0.1)
    penalty, update_state = jax.jit(method.penalty), jax.jit(method.update_state)
    state = method.init_state()
    assert float(state["lambda"]) == 0.0
    dense = _gates(0.9)  # every gate kept, expected density Phi(1.8) = 0.96: both far above 0.1
    lams = []
    for step in range(5):
        _, aux = penalty(dense, state, step)
        assert float(aux["expected_density"]) > 0.1
        state = update_state(state, aux)
        lams.append(float(state["lambda"]))
    steps = np.diff([0.0] + lams)
    assert np.all(steps > 0.1 * 0.8) and np.all(steps <= 0.1 * 0.9 + 1e-7)  # dual_lr * (density - 0.1)
    sparse = _gates(-3.0)  # expected density ~0 < 0.1: lambda falls, never below 0
    for step in range(50):
        _, aux = penalty(sparse, state, step)
        new = update_state(state, aux)
        assert float(new["lambda"]) <= float(state["lambda"]) and float(new["lambda"]) >= 0.0
        state = new
    assert float(state["lambda"]) == 0.0


def test_crbg_fixed_lambda_stays_and_its_penalty_gradient_is_the_closed_form():
    method = CRBG(num_steps=10, sparsity=0.5, lambda_mode="fixed", lam=0.3, temp_start=0.4, temp_end=0.4)
    state = method.init_state()
    rng = np.random.default_rng(0)
    mu = {n: jnp.asarray(rng.uniform(-1, 1, s), jnp.float32) for n, s in SHAPES.items()}
    penalty = jax.jit(method.penalty)
    for step in range(3):
        _, aux = penalty(mu, state, step)
        state = method.update_state(state, aux)
        assert float(state["lambda"]) == pytest.approx(0.3)
    grad = jax.jit(jax.grad(lambda g: method.penalty(g, state, 0)[0]))(mu)
    n = gates_lib.gate_count(mu)
    for name in mu:
        m = np.asarray(mu[name], np.float64)
        expected = 0.3 / (0.4 * np.sqrt(2 * np.pi)) * np.exp(-m**2 / (2 * 0.4**2)) / n
        np.testing.assert_allclose(grad[name], expected, rtol=1e-4, atol=1e-12)


def test_crbg_temperature_anneals_geometrically_between_the_endpoints():
    method = CRBG(num_steps=101, temp_start=0.5, temp_end=0.05)
    temps = np.asarray(jax.vmap(method.temp)(jnp.arange(101)))
    assert temps[0] == pytest.approx(0.5) and temps[-1] == pytest.approx(0.05)
    assert temps[50] == pytest.approx(math.sqrt(0.5 * 0.05))
    assert np.all(np.diff(temps) < 0)
    _, aux = method.penalty(_gates(0.5), method.init_state(), 100)
    assert float(aux["temp"]) == pytest.approx(0.05)


def test_bad_method_settings_name_the_allowed_values(tiny_config):
    tiny_config.method = "edge_popup"
    with pytest.raises(ValueError, match="edge_popup.*crbg, edgepopup"):
        create_method(tiny_config)
    with pytest.raises(ValueError, match="'row'.*layer, global"):
        EdgePopup(num_steps=1, scope="row")
    with pytest.raises(ValueError, match="'dynamic'.*dual, fixed"):
        CRBG(num_steps=1, lambda_mode="dynamic")


@pytest.mark.parametrize("method", ["crbg", "edgepopup"])
def test_a_short_run_of_each_method_is_well_above_chance(method, tiny_config, tmp_path):
    tiny_config.method = method
    summary = train_and_evaluate(tiny_config, str(tmp_path))
    assert summary["val_accuracy"] > 0.5  # chance is 0.1
    if method == "edgepopup":  # edge-popup's sparsity is exact by construction
        assert summary["sparsity"] == pytest.approx(tiny_config.sparsity, abs=1e-3)


def test_warmup_epochs_ramp_the_learning_rate_linearly(tiny_config, tmp_path):
    import json

    from slt_jax.methods.schedules import learning_rate_schedule
    from slt_jax.train import train_and_evaluate

    schedule = learning_rate_schedule("cosine", 0.1, num_steps=100, warmup_steps=10)
    assert float(schedule(0)) == 0.0 and abs(float(schedule(5)) - 0.05) < 1e-7 and abs(float(schedule(10)) - 0.1) < 1e-7
    tiny_config.warmup_epochs = 1.0
    tiny_config.num_steps = 2
    train_and_evaluate(tiny_config, str(tmp_path))
    # digits: about 1,290 training images at batch 64 -> 20 steps per epoch
    assert json.load(open(tmp_path / "config.json"))["warmup_steps"] == 20
