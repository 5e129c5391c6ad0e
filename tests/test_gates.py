"""Each gate family's math: sampled P(open) against the closed form, reparameterisation gradients
(no straight-through), the penalty's gradient, the test gate and binary rule, purity, bad names;
gate trees shaped like the params (None leaves), every PRNG key kind, jit and vmap."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from slt_jax import gates
from slt_jax.masking import path_name

# (family, the threshold whose exceedance prob_open gives, parameter values, temperatures)
CASES = [
    ("gaussian", 0.0, [-0.6, -0.1, 0.0, 0.25, 0.5, 0.9], [0.1, 0.5, 1.0]),
    ("hard_concrete", 0.0, [-3.0, -1.0, 0.0, 0.5, 2.0], [0.3, 2.0 / 3.0, 1.0]),
    ("concrete", 0.5, [-2.0, -0.5, 0.0, 1.0, 3.0], [0.2, 0.5, 1.0, 2.0]),
]
FAMILIES = [c[0] for c in CASES]
# The two noise draws: Gaussian (normal) and hard concrete (uniform, which concrete draws too).
NOISES = ["gaussian", "hard_concrete"]
NUM_DRAWS = 100_000
IS_NONE = lambda x: x is None  # noqa: E731
# Jitted once per (tree, key kind, family): eager sampling compiles every op of the 20 rounds anew.
sample_jit = jax.jit(gates.sample_gates, static_argnames="family")


def _shapes(tree):
    """A gate_shapes-style template: a float32 ShapeDtypeStruct per leaf (None leaves stay None)."""
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, jnp.float32), tree, is_leaf=lambda x: isinstance(x, tuple))


def _nested(seed=0):
    """A params-shaped gate tree: two modules, a nested block, ungated (None) biases."""
    k = jax.random.split(jax.random.PRNGKey(seed), 3)
    return {
        "Dense_0": {"kernel": jax.random.uniform(k[0], (30, 20), minval=-0.5, maxval=1.5), "bias": None},
        "block": {"Conv_0": {"kernel": jax.random.uniform(k[1], (3, 3, 2, 4), minval=-0.5, maxval=1.5),
                             "bias": None}},
        "head": {"kernel": jax.random.uniform(k[2], (20, 5), minval=-0.5, maxval=1.5)},
    }


def _structure(tree):
    return jax.tree.structure(tree, is_leaf=IS_NONE)


def _assert_trees_equal(a, b):
    assert _structure(a) == _structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _typed_key_kinds(seed):
    return {"rbg": jax.random.key(seed, impl="rbg"), "unsafe_rbg": jax.random.key(seed, impl="unsafe_rbg")}


@pytest.mark.parametrize("family, threshold, values, temps", CASES)
def test_sampled_open_probability_matches_closed_form(family, threshold, values, temps):
    p = jnp.broadcast_to(jnp.asarray(values, jnp.float32), (NUM_DRAWS, len(values)))
    for i, temp in enumerate(temps):
        z = gates.sample_gates(jax.random.PRNGKey(i), {"g": p}, temp, family=family)["g"]
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
    # Two leaves of different sizes, nested, beside an ungated leaf: the mean is over gates, not leaves.
    tree = {"a": {"kernel": jnp.full((3, 4), 0.4), "bias": None}, "b": {"kernel": jnp.full((2,), -0.2)}}
    for family, _, _, temps in CASES:
        fam = gates.get_family(family)
        expected = (12 * fam.prob_open(jnp.float32(0.4), temps[0]) + 2 * fam.prob_open(jnp.float32(-0.2), temps[0])) / 14
        np.testing.assert_allclose(gates.expected_density(tree, temps[0], family=family), expected, rtol=1e-6)
    assert gates.gate_count(tree) == 14


@pytest.mark.parametrize("family", FAMILIES)
def test_deterministic_gate_and_binary_rule(family):
    p = jnp.linspace(-3.0, 3.0, 61)
    g = gates.deterministic_gates({"g": p}, family=family)["g"]
    m = gates.binary_mask({"g": p}, family=family)["g"]
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


@pytest.mark.parametrize("family", NOISES)
def test_every_gate_function_keeps_the_params_structure_and_its_none_leaves(family):
    logits = _nested()
    key = jax.random.PRNGKey(0)
    outputs = {
        "sample_gates": sample_jit(key, logits, 0.5, family=family),
        "deterministic_gates": gates.deterministic_gates(logits, family=family),
        "binary_mask": gates.binary_mask(logits, family=family),
        "init_gates": gates.init_gates(key, _shapes({"Dense_0": {"kernel": (30, 20), "bias": None},
                                                     "block": {"Conv_0": {"kernel": (3, 3, 2, 4), "bias": None}},
                                                     "head": {"kernel": (20, 5)}}), family=family),
    }
    for name, out in outputs.items():
        assert _structure(out) == _structure(logits), name
        assert out["Dense_0"]["bias"] is None and out["block"]["Conv_0"]["bias"] is None, name
        for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(logits)):
            assert a.shape == b.shape, name
    assert gates.gate_count(logits) == 30 * 20 + 3 * 3 * 2 * 4 + 20 * 5
    # Scalars over a tree with None leaves are finite and in [0, 1].
    for value in (gates.expected_density(logits, 0.5, family=family), gates.indecision(logits, family=family)):
        assert 0.0 <= float(value) <= 1.0


def test_gaussian_sample_gradient_is_one_inside_and_zero_where_clipped():
    mu = jax.random.uniform(jax.random.PRNGKey(0), (4000,), minval=-0.5, maxval=1.5)
    keys = {"raw threefry": jax.random.PRNGKey(1), "typed threefry": jax.random.key(1), **_typed_key_kinds(1)}
    for kind, key in keys.items():
        tree = {"layer": {"kernel": mu, "bias": None}}
        z = gates.sample_gates(key, tree, 0.5)["layer"]["kernel"]
        grad = jax.grad(lambda m: jnp.sum(gates.sample_gates(key, {"layer": {"kernel": m, "bias": None}}, 0.5)
                                          ["layer"]["kernel"]))(mu)
        inside = (z > 0) & (z < 1)
        assert 0.2 < float(inside.mean()) < 0.8, kind  # both regimes are exercised
        # Exactly the reparameterisation gradient: a straight-through estimator would give 1 everywhere.
        np.testing.assert_array_equal(grad, jnp.where(inside, 1.0, 0.0), err_msg=kind)


@pytest.mark.parametrize("family", FAMILIES)
def test_sample_gradient_equals_finite_difference_with_fixed_noise(family):
    p = jax.random.uniform(jax.random.PRNGKey(0), (2000,), minval=-2.0, maxval=2.0)
    key, temp, h = jax.random.PRNGKey(3), 0.7, 1e-2

    def sample(q):
        return gates.sample_gates(key, {"g": q}, temp, family=family)["g"]

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
    grad = jax.grad(lambda q: lam * gates.expected_density({"g": q}, temp, family=family))(jnp.asarray(p))
    expected = lam * _penalty_grad_closed_form(family, p.astype(np.float64), temp) / p.size  # the mean over gates
    np.testing.assert_allclose(grad, expected, rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("family", FAMILIES)
def test_sample_gates_is_pure_and_keys_leaves_independently(family):
    logits = gates.init_gates(jax.random.PRNGKey(0), _shapes({"a": {"kernel": (50, 20)}, "b": {"kernel": (50, 20)}}),
                              family=family)
    s1 = gates.sample_gates(jax.random.PRNGKey(7), logits, 0.5, family=family)
    s2 = gates.sample_gates(jax.random.PRNGKey(7), logits, 0.5, family=family)
    s3 = sample_jit(jax.random.PRNGKey(8), logits, 0.5, family=family)
    s_jit = jax.jit(lambda k, l: gates.sample_gates(k, l, 0.5, family=family))(jax.random.PRNGKey(7), logits)
    for name in logits:
        np.testing.assert_array_equal(s1[name]["kernel"], s2[name]["kernel"])
        # jit may fuse to an FMA
        np.testing.assert_allclose(s1[name]["kernel"], s_jit[name]["kernel"], rtol=1e-6, atol=1e-7)
        assert not np.array_equal(s1[name]["kernel"], s3[name]["kernel"])
    # Two leaves of the same shape and parameters draw different noise.
    same = {"a": {"kernel": logits["a"]["kernel"]}, "b": {"kernel": logits["a"]["kernel"]}}
    s = sample_jit(jax.random.PRNGKey(7), same, 0.5, family=family)
    assert not np.array_equal(s["a"]["kernel"], s["b"]["kernel"])
    # A leaf's noise does not depend on which other leaves exist.
    alone = gates.sample_gates(jax.random.PRNGKey(7), {"a": {"kernel": logits["a"]["kernel"]}}, 0.5, family=family)
    np.testing.assert_array_equal(alone["a"]["kernel"], s1["a"]["kernel"])


@pytest.mark.parametrize("family", NOISES)
def test_a_leafs_noise_is_keyed_by_its_flat_name_only(family):
    logits = _nested()
    key = jax.random.PRNGKey(11)
    base = sample_jit(key, logits, 0.5, family=family)
    # Adding leaves (a new module, a gate on a formerly ungated bias) leaves every other sample unchanged.
    grown = {**logits, "Dense_0": {"kernel": logits["Dense_0"]["kernel"], "bias": jnp.full((20,), 0.3)},
             "extra": {"kernel": jnp.full((7, 3), 0.5)}}
    more = sample_jit(key, grown, 0.5, family=family)
    np.testing.assert_array_equal(more["Dense_0"]["kernel"], base["Dense_0"]["kernel"])
    np.testing.assert_array_equal(more["block"]["Conv_0"]["kernel"], base["block"]["Conv_0"]["kernel"])
    np.testing.assert_array_equal(more["head"]["kernel"], base["head"]["kernel"])
    # Removing one leaf changes nothing either.
    fewer = sample_jit(key, {"head": logits["head"]}, 0.5, family=family)
    np.testing.assert_array_equal(fewer["head"]["kernel"], base["head"]["kernel"])
    # The name is the '/'-joined path: a flat dict keyed "block/Conv_0/kernel" draws the nested leaf's noise.
    flat = {path_name(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(logits)[0]}
    assert sorted(flat) == ["Dense_0/kernel", "block/Conv_0/kernel", "head/kernel"]
    flat_sample = sample_jit(key, flat, 0.5, family=family)
    np.testing.assert_array_equal(flat_sample["block/Conv_0/kernel"], base["block"]["Conv_0"]["kernel"])
    np.testing.assert_array_equal(flat_sample["Dense_0/kernel"], base["Dense_0"]["kernel"])


def test_threefry_keys_raw_and_typed_draw_exactly_jax_random_normal():
    # sigma a power of two: sigma * eps is exact, so an FMA under jit cannot round differently.
    logits = jax.tree.map(lambda x: jnp.full_like(x, 0.5), _nested())
    sigma = 0.0625
    for seed in (0, 3):
        raw, typed = jax.random.PRNGKey(seed), jax.random.key(seed)
        np.testing.assert_array_equal(jax.random.key_data(typed), raw)
        expected = jax.tree_util.tree_map_with_path(
            lambda path, mu: jnp.clip(mu + sigma * jax.random.normal(jax.random.fold_in(raw, gates._stable_hash(
                path_name(path))), mu.shape, jnp.float32), 0.0, 1.0), logits)
        for kind, key in (("raw", raw), ("typed", typed)):
            eager = gates.sample_gates(key, logits, sigma)
            jitted = sample_jit(key, logits, sigma)
            _assert_trees_equal(eager, expected)
            _assert_trees_equal(jitted, expected)
        inside = np.concatenate([np.ravel((z > 0) & (z < 1)) for z in jax.tree.leaves(expected)])
        assert inside.mean() > 0.99  # nothing clipped: the noise is compared over its whole range


@pytest.mark.parametrize("family", NOISES)
def test_raw_and_typed_threefry_keys_give_bit_identical_samples(family):
    logits = _nested()
    for seed in (0, 5):
        a = sample_jit(jax.random.PRNGKey(seed), logits, 0.5, family=family)
        b = sample_jit(jax.random.key(seed), logits, 0.5, family=family)
        c = sample_jit(jax.random.wrap_key_data(jax.random.PRNGKey(seed)), logits, 0.5, family=family)
        _assert_trees_equal(a, b)
        _assert_trees_equal(a, c)


@pytest.mark.parametrize("kind", ["rbg", "unsafe_rbg"])
@pytest.mark.parametrize("family", NOISES)
def test_rbg_keys_sample_deterministically_and_differ_between_keys(kind, family):
    logits = _nested()
    k0, k0_again, k1 = (jax.random.key(s, impl=kind) for s in (0, 0, 1))
    a = gates.sample_gates(k0, logits, 0.5, family=family)
    b = sample_jit(k0_again, logits, 0.5, family=family)
    c = sample_jit(k1, logits, 0.5, family=family)
    jitted = sample_jit(k0, logits, 0.5, family=family)
    assert _structure(a) == _structure(logits) and a["Dense_0"]["bias"] is None
    _assert_trees_equal(b, jitted)  # the same key, drawn anew: the same sample
    for x, y, z, p in zip(jax.tree.leaves(a), jax.tree.leaves(c), jax.tree.leaves(jitted), jax.tree.leaves(logits)):
        assert x.shape == p.shape and x.dtype == jnp.float32
        assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
        assert not np.array_equal(x, y)
        np.testing.assert_allclose(x, z, rtol=1e-6, atol=1e-7)  # eager and jitted: jit may fuse to an FMA
    # Not the threefry stream of the same seed.
    threefry = sample_jit(jax.random.key(0), logits, 0.5, family=family)
    assert not np.array_equal(a["head"]["kernel"], threefry["head"]["kernel"])


def test_raw_keys_of_the_default_rbg_implementation_work():
    logits = _nested()
    with jax.default_prng_impl("rbg"):
        raw = jax.random.PRNGKey(0)
        assert raw.shape == (4,)
        a = gates.sample_gates(raw, logits, 0.5)
        b = sample_jit(raw, logits, 0.5)
        c = sample_jit(jax.random.PRNGKey(1), logits, 0.5)
        typed = sample_jit(jax.random.wrap_key_data(raw), logits, 0.5)
    for x, y, z, t in zip(*(jax.tree.leaves(s) for s in (a, b, c, typed))):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)  # eager and jitted: jit may fuse to an FMA
        np.testing.assert_array_equal(y, t)  # the raw key and its typed wrapper: the same stream
        assert not np.array_equal(y, z)


THREEFRY_KEYS = {"raw threefry": lambda: jax.random.split(jax.random.PRNGKey(0), 3),
                 "typed threefry": lambda: jax.random.split(jax.random.key(0), 3)}


@pytest.mark.parametrize("kind", sorted(THREEFRY_KEYS))
@pytest.mark.parametrize("family", NOISES)
def test_vmap_over_threefry_keys_draws_each_keys_own_sample(kind, family):
    logits = _nested()
    keys = THREEFRY_KEYS[kind]()
    sample = jax.jit(lambda k: gates.sample_gates(k, logits, 0.5, family=family))
    batched = jax.jit(jax.vmap(sample))(keys)
    assert _structure(batched) == _structure(logits) and batched["Dense_0"]["bias"] is None
    for i in range(keys.shape[0]):
        one = sample(keys[i])
        for x, y in zip(jax.tree.leaves(batched), jax.tree.leaves(one)):
            np.testing.assert_allclose(x[i], y, rtol=1e-6, atol=1e-7)
    first = jax.tree.leaves(batched)[0]
    assert not np.array_equal(first[0], first[1])


@pytest.mark.parametrize("kind", ["rbg", "unsafe_rbg"])
def test_vmap_over_rbg_keys_is_jax_randoms_own_batched_draw(kind):
    # jax.random itself does not promise that a vmapped rbg draw equals each key's own draw (its
    # PRNG table: "exact jax.vmap over keys" only for threefry), so the promise here is that the
    # fallback is exactly jax.random's draw, batched: z = clip(mu + sigma * normal(fold_in(k, hash(name)))).
    logits = jax.tree.map(lambda x: jnp.full_like(x, 0.5), _nested())
    sigma = 0.0625
    keys = jax.random.split(jax.random.key(0, impl=kind), 3)

    def by_the_rule(k):
        return jax.tree_util.tree_map_with_path(
            lambda path, mu: jnp.clip(mu + sigma * jax.random.normal(
                jax.random.fold_in(k, gates._stable_hash(path_name(path))), mu.shape, jnp.float32), 0.0, 1.0), logits)

    batched = jax.jit(jax.vmap(lambda k: gates.sample_gates(k, logits, sigma)))(keys)
    again = jax.vmap(lambda k: sample_jit(k, logits, sigma))(keys)
    _assert_trees_equal(batched, jax.jit(jax.vmap(by_the_rule))(keys))
    _assert_trees_equal(batched, again)
    assert batched["Dense_0"]["bias"] is None
    for x in jax.tree.leaves(batched):
        assert x.shape[0] == 3 and float(x.min()) >= 0.0 and float(x.max()) <= 1.0
        assert not np.array_equal(x[0], x[1])


@pytest.mark.parametrize("call", [
    lambda f: gates.get_family(f),
    lambda f: gates.sample_gates(jax.random.PRNGKey(0), {"g": jnp.zeros(3)}, 0.5, family=f),
    lambda f: gates.expected_density({"g": jnp.zeros(3)}, 0.5, family=f),
    lambda f: gates.init_gates(jax.random.PRNGKey(0), {"g": jax.ShapeDtypeStruct((3,), jnp.float32)}, family=f),
    lambda f: gates.binary_mask({"g": jnp.zeros(3)}, family=f),
    lambda f: gates.deterministic_gates({"g": jnp.zeros(3)}, family=f),
    lambda f: gates.indecision({"g": jnp.zeros(3)}, family=f),
])
def test_unknown_family_names_the_allowed_ones(call):
    with pytest.raises(ValueError, match="gausian") as err:
        call("gausian")
    for name in FAMILIES:
        assert name in str(err.value)


@pytest.mark.parametrize("call", [
    lambda: gates.sample_gates(jax.random.PRNGKey(0), {"g": jnp.zeros(3)}, 0.5, "gaussian"),
    lambda: gates.expected_density({"g": jnp.zeros(3)}, 0.5, "gaussian"),
    lambda: gates.binary_mask({"g": jnp.zeros(3)}, "gaussian"),
])
def test_family_is_keyword_only(call):
    with pytest.raises(TypeError):
        call()


def test_straight_through_gaussian_samples_as_gaussian_and_passes_the_gradient_through_the_clip():
    mu = jnp.linspace(-2.0, 3.0, 101)
    key = jax.random.PRNGKey(3)
    plain, st = gates.get_family("gaussian"), gates.get_family("gaussian_st")
    np.testing.assert_array_equal(st.sample(key, mu, 0.5), plain.sample(key, mu, 0.5))
    z = np.asarray(plain.sample(key, mu, 0.5))
    grad_plain = np.asarray(jax.grad(lambda m: jnp.sum(plain.sample(key, m, 0.5)))(mu))
    grad_st = np.asarray(jax.grad(lambda m: jnp.sum(st.sample(key, m, 0.5)))(mu))
    clipped = (z == 0) | (z == 1)
    assert clipped.any() and (~clipped).any()
    assert (grad_plain[clipped] == 0).all() and (grad_st == 1).all()
    np.testing.assert_array_equal(st.prob_open(mu, 0.5), plain.prob_open(mu, 0.5))
    np.testing.assert_array_equal(st.test_gate(mu), plain.test_gate(mu))


def test_hard_gaussian_samples_the_thresholded_draw_and_passes_the_gradient_straight_through():
    mu = jnp.linspace(-1.0, 2.0, 101)
    key = jax.random.PRNGKey(4)
    plain, hard = gates.get_family("gaussian"), gates.get_family("gaussian_hard")
    z = np.asarray(hard.sample(key, mu, 0.5))
    # The same draw as the clipped gaussian, on the ticket's side of 1/2: binary, unscaled weights.
    np.testing.assert_array_equal(z, np.asarray(plain.sample(key, mu, 0.5)) > 0.5)
    assert (z == 0).any() and (z == 1).any()
    assert (np.asarray(jax.grad(lambda m: jnp.sum(hard.sample(key, m, 0.5)))(mu)) == 1).all()
    # With the noise gone the training sample is the ticket.
    tiny = np.asarray(hard.sample(key, mu, 1e-6))
    np.testing.assert_array_equal(tiny, np.asarray(gates.binary_mask({"g": mu}, family="gaussian_hard")["g"]))
    np.testing.assert_array_equal(hard.test_gate(mu), plain.test_gate(mu))
    # P(z > 0) = Phi((mu - 1/2) / sigma), against the sampled frequency.
    values = jnp.asarray([-0.6, 0.0, 0.4, 0.5, 0.6, 1.2])
    draws = jax.jit(hard.sample, static_argnums=2)(key, jnp.broadcast_to(values, (NUM_DRAWS, values.size)), 0.5)
    mc = np.mean(np.asarray(draws) > 0, axis=0)
    closed = np.asarray([0.5 * (1 + math.erf((float(v) - 0.5) / 0.5 / math.sqrt(2))) for v in values])
    np.testing.assert_allclose(hard.prob_open(values, 0.5), closed, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_less(np.abs(mc - closed), 5 * np.sqrt(closed * (1 - closed) / NUM_DRAWS) + 1e-3)
