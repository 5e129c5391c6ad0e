"""Each gate family's math: sampled P(open) against the closed form, reparameterisation gradients
(no straight-through), the penalty's gradient, the test gate and binary rule, purity, bad names."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from slt_jax import gates

# (family, the threshold whose exceedance prob_open gives, parameter values, temperatures)
CASES = [
    ("gaussian", 0.0, [-0.6, -0.1, 0.0, 0.25, 0.5, 0.9], [0.1, 0.5, 1.0]),
    ("hard_concrete", 0.0, [-3.0, -1.0, 0.0, 0.5, 2.0], [0.3, 2.0 / 3.0, 1.0]),
    ("concrete", 0.5, [-2.0, -0.5, 0.0, 1.0, 3.0], [0.2, 0.5, 1.0, 2.0]),
]
FAMILIES = [c[0] for c in CASES]
NUM_DRAWS = 100_000


@pytest.mark.parametrize("family, threshold, values, temps", CASES)
def test_sampled_open_probability_matches_closed_form(family, threshold, values, temps):
    p = jnp.broadcast_to(jnp.asarray(values, jnp.float32), (NUM_DRAWS, len(values)))
    for i, temp in enumerate(temps):
        z = gates.sample_gates(jax.random.PRNGKey(i), {"g": p}, temp, family)["g"]
        assert float(z.min()) >= 0.0 and float(z.max()) <= 1.0
        mc = np.mean(np.asarray(z) > threshold, axis=0)
        closed = np.asarray(gates.get_family(family).prob_open(jnp.asarray(values, jnp.float32), temp))
        tol = 5 * np.sqrt(closed * (1 - closed) / NUM_DRAWS) + 1e-3
        np.testing.assert_array_less(np.abs(mc - closed), tol, err_msg=f"{family} temp={temp}")


def test_gaussian_closed_form_is_phi_of_mu_over_sigma():
    mu = jnp.asarray([-1.0, 0.0, 0.3, 2.0])
    for sigma in (0.2, 0.5):
        expected = [0.5 * (1 + math.erf(float(m) / sigma / math.sqrt(2))) for m in mu]
        np.testing.assert_allclose(gates.get_family("gaussian").prob_open(mu, sigma), expected, rtol=1e-5, atol=1e-7)


def test_expected_density_is_mean_over_all_gates():
    # Two leaves of different sizes: the mean is over gates, not over leaves.
    tree = {"a": jnp.full((3, 4), 0.4), "b": jnp.full((2,), -0.2)}
    for family, _, _, temps in CASES:
        fam = gates.get_family(family)
        expected = (12 * fam.prob_open(jnp.float32(0.4), temps[0]) + 2 * fam.prob_open(jnp.float32(-0.2), temps[0])) / 14
        np.testing.assert_allclose(gates.expected_density(tree, temps[0], family), expected, rtol=1e-6)
    assert gates.gate_count(tree) == 14


@pytest.mark.parametrize("family", FAMILIES)
def test_deterministic_gate_and_binary_rule(family):
    p = jnp.linspace(-3.0, 3.0, 61)
    g = gates.deterministic_gates({"g": p}, family)["g"]
    m = gates.binary_mask({"g": p}, family)["g"]
    assert m.dtype == jnp.bool_
    np.testing.assert_array_equal(m, g > 0.5)
    expected_gate = {
        "gaussian": np.clip(p, 0, 1),
        "hard_concrete": np.clip(jax.nn.sigmoid(p) * 1.2 - 0.1, 0, 1),
        "concrete": jax.nn.sigmoid(p),
    }[family]
    np.testing.assert_allclose(g, expected_gate, rtol=1e-6, atol=1e-7)
    # Every family keeps a gate exactly when its parameter is past the family's midpoint.
    midpoint = 0.5 if family == "gaussian" else 0.0
    np.testing.assert_array_equal(m, p > midpoint)


def test_gaussian_sample_gradient_is_one_inside_and_zero_where_clipped():
    mu = jax.random.uniform(jax.random.PRNGKey(0), (4000,), minval=-0.5, maxval=1.5)
    key = jax.random.PRNGKey(1)
    z = gates.sample_gates(key, {"g": mu}, 0.5)["g"]
    grad = jax.grad(lambda m: jnp.sum(gates.sample_gates(key, {"g": m}, 0.5)["g"]))(mu)
    inside = (z > 0) & (z < 1)
    assert 0.2 < float(inside.mean()) < 0.8  # both regimes are exercised
    # Exactly the reparameterisation gradient: a straight-through estimator would give 1 everywhere.
    np.testing.assert_array_equal(grad, jnp.where(inside, 1.0, 0.0))


@pytest.mark.parametrize("family", FAMILIES)
def test_sample_gradient_equals_finite_difference_with_fixed_noise(family):
    p = jax.random.uniform(jax.random.PRNGKey(0), (2000,), minval=-2.0, maxval=2.0)
    key, temp, h = jax.random.PRNGKey(3), 0.7, 1e-2

    def sample(q):
        return gates.sample_gates(key, {"g": q}, temp, family)["g"]

    weights = jax.random.normal(jax.random.PRNGKey(4), p.shape)
    grad = jax.grad(lambda q: jnp.sum(weights * sample(q)))(p)
    fd = weights * (sample(p + h) - sample(p - h)) / (2 * h)
    # Away from the clip points the finite difference is smooth enough to compare.
    z_lo, z_hi = sample(p - h), sample(p + h)
    smooth = ((z_lo > 0) & (z_hi < 1)) | (z_hi == 0) | (z_lo == 1)
    assert float(smooth.mean()) > 0.5
    assert float(jnp.abs(grad).sum()) > 0  # the gradient reaches the gate parameters
    np.testing.assert_allclose(grad[smooth], fd[smooth], rtol=2e-2, atol=2e-3)


def _penalty_grad_closed_form(family, p, temp):
    if family == "gaussian":
        return np.exp(-p**2 / (2 * temp**2)) / (temp * np.sqrt(2 * np.pi))
    shift = temp * np.log(0.1 / 1.1) if family == "hard_concrete" else 0.0
    s = 1 / (1 + np.exp(-(p - shift)))
    return s * (1 - s)


@pytest.mark.parametrize("family", FAMILIES)
def test_penalty_gradient_matches_closed_form(family):
    p = np.linspace(-1.5, 1.5, 31).astype(np.float32)
    lam, temp = 0.7, 0.4
    grad = jax.grad(lambda q: lam * gates.expected_density({"g": q}, temp, family))(jnp.asarray(p))
    expected = lam * _penalty_grad_closed_form(family, p.astype(np.float64), temp) / p.size  # the mean over gates
    np.testing.assert_allclose(grad, expected, rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("family", FAMILIES)
def test_sample_gates_is_pure_and_keys_leaves_independently(family):
    logits = gates.init_gates(jax.random.PRNGKey(0), {"a": (50, 20), "b": (50, 20)}, family)
    s1 = gates.sample_gates(jax.random.PRNGKey(7), logits, 0.5, family)
    s2 = gates.sample_gates(jax.random.PRNGKey(7), logits, 0.5, family)
    s3 = gates.sample_gates(jax.random.PRNGKey(8), logits, 0.5, family)
    s_jit = jax.jit(lambda k, l: gates.sample_gates(k, l, 0.5, family))(jax.random.PRNGKey(7), logits)
    for name in logits:
        np.testing.assert_array_equal(s1[name], s2[name])
        np.testing.assert_allclose(s1[name], s_jit[name], rtol=1e-6, atol=1e-7)  # jit may fuse to an FMA
        assert not np.array_equal(s1[name], s3[name])
    # Two leaves of the same shape and parameters draw different noise.
    same = {"a": logits["a"], "b": logits["a"]}
    s = gates.sample_gates(jax.random.PRNGKey(7), same, 0.5, family)
    assert not np.array_equal(s["a"], s["b"])
    # A leaf's noise does not depend on which other leaves exist.
    alone = gates.sample_gates(jax.random.PRNGKey(7), {"a": logits["a"]}, 0.5, family)
    np.testing.assert_array_equal(alone["a"], s1["a"])


@pytest.mark.parametrize("call", [
    lambda f: gates.get_family(f),
    lambda f: gates.sample_gates(jax.random.PRNGKey(0), {"g": jnp.zeros(3)}, 0.5, f),
    lambda f: gates.expected_density({"g": jnp.zeros(3)}, 0.5, f),
    lambda f: gates.init_gates(jax.random.PRNGKey(0), {"g": (3,)}, f),
    lambda f: gates.binary_mask({"g": jnp.zeros(3)}, f),
])
def test_unknown_family_names_the_allowed_ones(call):
    with pytest.raises(ValueError, match="gausian") as err:
        call("gausian")
    for name in FAMILIES:
        assert name in str(err.value)
