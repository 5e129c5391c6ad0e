"""Gate families: stochastic relaxations of a binary keep/drop decision per gate.

Every family is the same four pure functions over a gate-parameter array ``p``:

* ``sample(key, p, temp)``: a differentiable training sample ``z`` in [0, 1]; gradients reach ``p``
  by reparameterisation (``gaussian_st``: and straight through the clip).
* ``prob_open(p, temp)``: P(z > 0), the expected L0 norm contribution of one gate.
* ``test_gate(p)``: the deterministic gate in [0, 1] once noise is dropped.
* the binary rule, shared by all families: keep a weight iff ``test_gate(p) > 0.5``.

Families
--------
``gaussian`` (Yamada et al. 2020, the paper's gate; ``temp`` is sigma)::

    z = clip(mu + sigma * eps, 0, 1),  eps ~ N(0, 1)
    P(z > 0) = Phi(mu / sigma),        test gate = clip(mu, 0, 1)

``gaussian_st``: ``gaussian`` whose clip passes the gradient straight through (dz/dmu = 1
everywhere, as edge-popup's top-k passes it to pruned weights), so the data loss still reaches a
gate whose sample is 0; the forward pass, P(z > 0) and the test gate are ``gaussian``'s.

``gaussian_hard``: the same Gaussian draw, thresholded: the training sample is the binary gate
the ticket rule would give that draw, with the gradient passed straight through::

    s = mu + sigma * eps,  z = [s > 1/2]  (forward),  dz/dmu = 1  (backward)
    P(z > 0) = Phi((mu - 1/2) / sigma),  test gate = clip(mu, 0, 1)

Training then computes with the frozen weights unscaled, as the binary ticket does: with the
clipped families a closed gate near mu = 0 still passes E[z] ~ 0.2 sigma / 0.5 of its weight and
an open one a fraction, so the trained network is not the ticket (on Conv4 at 90% the expected
density was 0.55 against the ticket's 0.10); as sigma -> 0 the sample *is* the ticket.

``hard_concrete`` (Louizos et al. 2018; ``temp`` is beta, gamma = -0.1, zeta = 1.1)::

    s = sigmoid((log u - log(1 - u) + log_alpha) / beta),  u ~ U(0, 1)
    z = clip(s * (zeta - gamma) + gamma, 0, 1)
    P(z > 0) = sigmoid(log_alpha - beta * log(-gamma / zeta))
    test gate = clip(sigmoid(log_alpha) * (zeta - gamma) + gamma, 0, 1)

``concrete`` (binary Concrete, Maddison et al. / Jang et al. 2017; ``temp`` is tau)::

    z = sigmoid((l + log u - log(1 - u)) / tau)
    z is never exactly 0, so the penalty is P(z > 1/2) = sigmoid(l), for every tau
    test gate = sigmoid(l)

The penalty the methods use is the *mean* of ``prob_open`` over gates (the expected density),
so its scale does not depend on the network's size.

The public functions refuse, with one line: a gate tree with no gate, a leaf that is not a float
array (named by its path), and a temperature that is not a finite number > 0 (a negative sigma
gives Phi(-mu / sigma) = 1 - P(z > 0) and inverted samples). A temperature traced under ``jit``
has no value to check: it is the caller's to keep positive (``CRBG`` checks its schedule when
it is built). The families' own four functions check nothing.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from slt_jax import threefry
from slt_jax.masking import path_name

Array = jax.Array
GateTree = Any  # a params-shaped tree: an array per gated leaf, None elsewhere

HC_GAMMA, HC_ZETA = -0.1, 1.1
BINARY_THRESHOLD = 0.5


@dataclasses.dataclass(frozen=True)
class GateFamily:
    """The four functions that define a gate family (see the module docstring)."""

    name: str
    init: Callable[[Array, tuple[int, ...]], Array]
    sample: Callable[[Array, Array, float], Array]
    prob_open: Callable[[Array, float], Array]
    test_gate: Callable[[Array], Array]


def _clip01(x: Array) -> Array:
    # lax.clamp's derivative is one select (1 inside (0, 1), else 0); jnp.clip's splits ties at the
    # bounds with divisions that XLA:CPU computes in passes of their own.
    return jax.lax.clamp(jnp.zeros((), x.dtype), x, jnp.ones((), x.dtype))


def _clip01_straight_through(x: Array) -> Array:
    return x + jax.lax.stop_gradient(_clip01(x) - x)


def _uniform(key: Array, shape: tuple[int, ...]) -> Array:
    # Keep u away from 0 and 1 so log u and log(1 - u) stay finite.
    return threefry.uniform(key, shape, minval=1e-6, maxval=1.0 - 1e-6)


def _gaussian() -> GateFamily:
    return GateFamily(
        name="gaussian",
        # The STG reference: gates start at mean 0.5 with a little symmetry-breaking noise.
        init=lambda key, shape: 0.5 + 0.01 * jax.random.normal(key, shape),
        sample=lambda key, mu, sigma: _clip01(mu + sigma * threefry.normal(key, mu.shape)),
        # Phi(x) as (1 + erf(x / sqrt 2)) / 2: within 1e-7 of ndtr, whose tail-accurate erfc costs
        # XLA:CPU several times as much; a mean of probabilities needs no tail accuracy.
        prob_open=lambda mu, sigma: 0.5 + 0.5 * jax.lax.erf(mu / (sigma * np.sqrt(2))),
        test_gate=_clip01,
    )


def _gaussian_straight_through() -> GateFamily:
    gaussian = _gaussian()
    return dataclasses.replace(
        gaussian, name="gaussian_st",
        sample=lambda key, mu, sigma: _clip01_straight_through(mu + sigma * threefry.normal(key, mu.shape)))


def _gaussian_hard() -> GateFamily:
    def sample(key, mu, sigma):
        s = mu + sigma * threefry.normal(key, mu.shape)
        return s + jax.lax.stop_gradient((s > BINARY_THRESHOLD).astype(s.dtype) - s)

    gaussian = _gaussian()
    return dataclasses.replace(  # z > 0 iff the draw passes 1/2: the clipped gate's P(z > 0) at mu - 1/2
        gaussian, name="gaussian_hard", sample=sample,
        prob_open=lambda mu, sigma: gaussian.prob_open(mu - BINARY_THRESHOLD, sigma))


def _hard_concrete() -> GateFamily:
    def sample(key, log_alpha, beta):
        u = _uniform(key, log_alpha.shape)
        s = jax.nn.sigmoid((jnp.log(u) - jnp.log1p(-u) + log_alpha) / beta)
        return _clip01(s * (HC_ZETA - HC_GAMMA) + HC_GAMMA)

    return GateFamily(
        name="hard_concrete",
        # log_alpha ~ N(0, 0.01), as Louizos et al.; test gate starts at 0.5.
        init=lambda key, shape: 0.01 * jax.random.normal(key, shape),
        sample=sample,
        prob_open=lambda log_alpha, beta: jax.nn.sigmoid(log_alpha - beta * jnp.log(-HC_GAMMA / HC_ZETA)),
        test_gate=lambda log_alpha: _clip01(jax.nn.sigmoid(log_alpha) * (HC_ZETA - HC_GAMMA) + HC_GAMMA),
    )


def _concrete() -> GateFamily:
    def sample(key, logits, tau):
        u = _uniform(key, logits.shape)
        return jax.nn.sigmoid((logits + jnp.log(u) - jnp.log1p(-u)) / tau)

    return GateFamily(
        name="concrete",
        init=lambda key, shape: 0.01 * jax.random.normal(key, shape),
        sample=sample,
        prob_open=lambda logits, tau: jax.nn.sigmoid(logits),
        test_gate=jax.nn.sigmoid,
    )


FAMILIES: dict[str, GateFamily] = {f.name: f for f in (_gaussian(), _gaussian_straight_through(), _gaussian_hard(),
                                                         _hard_concrete(), _concrete())}


def _check_temperature(temp: float | Array) -> None:
    """Raises ValueError unless ``temp`` is a finite number > 0 (each element of an array). A traced
    value (inside ``jit``) has none to check and passes: keeping it positive is the caller's part."""
    if isinstance(temp, jax.core.Tracer):
        return
    value = np.asarray(temp)
    numeric = value.dtype != np.bool_ and (np.issubdtype(value.dtype, np.integer)
                                          or np.issubdtype(value.dtype, np.floating))
    if not numeric or value.size == 0 or not np.all(np.isfinite(value) & (value > 0)):
        raise ValueError(f"temp={temp!r}; allowed: a finite number > 0")


def _check_gate_tree(tree: GateTree) -> None:
    """Raises ValueError for a tree with no gate, TypeError naming the first leaf that is not a float
    array (a Python float, an int or bool array). Looks at shapes and dtypes only: jit-safe."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    if not leaves:
        raise ValueError(f"the gate tree (a {type(tree).__name__}) holds no gate; allowed: a tree with a float array "
                         "per gated leaf, None elsewhere (slt_jax.masking.gate_shapes)")
    for path, leaf in leaves:
        dtype = getattr(leaf, "dtype", None)
        if dtype is None or not hasattr(leaf, "shape") or not jnp.issubdtype(dtype, jnp.floating):
            got = f"a {type(leaf).__name__}" if dtype is None else f"an array of {dtype}"
            raise TypeError(f"gate leaf {path_name(path)!r} is {got}; allowed: a float array (jax or numpy) per "
                            "gated leaf, None elsewhere")


def get_family(name: str) -> GateFamily:
    """Returns the gate family called ``name``; raises ValueError naming the allowed ones."""
    if name not in FAMILIES:
        raise ValueError(f"unknown gate family {name!r}; allowed: {', '.join(sorted(FAMILIES))}")
    return FAMILIES[name]


def leaf_keys(key: Array, tree: GateTree) -> GateTree:
    """One key per leaf of ``tree``, ``fold_in(key, hash(path name))``: an independent stream per
    gate leaf, chosen by its name, so adding or removing another leaf never changes this one's noise."""
    return jax.tree_util.tree_map_with_path(lambda path, _: jax.random.fold_in(key, _stable_hash(path_name(path))), tree)


def _stable_hash(name: str) -> int:
    h = 2166136261
    for byte in name.encode():
        h = ((h ^ byte) * 16777619) & 0x7FFFFFFF
    return h


def init_gates(key: Array, shapes: Any, *, family: str = "gaussian") -> GateTree:
    """Initial gate parameters: a tree shaped like ``shapes`` (``slt_jax.masking.gate_shapes``: a
    ``jax.ShapeDtypeStruct`` per gated leaf, None elsewhere), one array of each leaf's shape."""
    fam = get_family(family)
    return jax.tree.map(lambda k, s: fam.init(k, tuple(s.shape)), leaf_keys(key, shapes), shapes)


def sample_gates(key: Array, logits: GateTree, temp: float | Array, *, family: str = "gaussian") -> GateTree:
    """One training sample z per gate, a tree shaped like ``logits`` (None leaves stay None).

    Pure: the same key gives the same sample. ``key`` may be a raw or typed key of any PRNG
    implementation (threefry, rbg, unsafe_rbg); each leaf draws from ``fold_in(key, hash(path))``.
    Under ``vmap`` over keys, a Threefry key gives each key's own sample; rbg keys give what
    ``jax.random`` gives for batched rbg keys, which is not each key's own sample.
    """
    fam = get_family(family)
    _check_gate_tree(logits)
    _check_temperature(temp)
    return jax.tree.map(lambda k, p: fam.sample(k, p, temp), leaf_keys(key, logits), logits)


def gate_mean(per_gate: GateTree) -> Array:
    """The mean of per-gate values over every gate of the tree (for bool gates: the fraction open).
    Counting weights instead of gates: ``slt_jax.masking.kept_fraction``."""
    values = jax.tree.leaves(per_gate)
    if not values:
        raise ValueError("the gate tree holds no gate; allowed: a tree with an array per gated leaf, None elsewhere")
    return sum(jnp.sum(v) for v in values) / sum(v.size for v in values)


def expected_density(logits: GateTree, temp: float | Array, *, family: str = "gaussian") -> Array:
    """Mean of P(z > 0) over gates: the expected L0 norm of the gates divided by their number."""
    fam = get_family(family)
    _check_gate_tree(logits)
    _check_temperature(temp)
    return gate_mean(jax.tree.map(lambda p: fam.prob_open(p, temp), logits))


def deterministic_gates(logits: GateTree, *, family: str = "gaussian") -> GateTree:
    """The deterministic gates in [0, 1] with the noise dropped."""
    _check_gate_tree(logits)
    return jax.tree.map(get_family(family).test_gate, logits)


def binary_mask(logits: GateTree, *, family: str = "gaussian") -> GateTree:
    """The ticket's rule: keep a weight iff its test gate exceeds 1/2 (bool arrays)."""
    return jax.tree.map(lambda g: g > BINARY_THRESHOLD, deterministic_gates(logits, family=family))


def indecision(logits: GateTree, *, family: str = "gaussian") -> Array:
    """Mean of g (1 - g) over test gates g: zero iff every gate is exactly 0 or 1.

    Penalising it drives gates to the two extremes, so the binary ticket and the network
    trained with soft gates compute the same function.
    """
    gates = jax.tree.leaves(deterministic_gates(logits, family=family))
    return sum(jnp.sum(g * (1.0 - g)) for g in gates) / gate_count(logits)


def gate_count(tree: GateTree) -> int:
    """Number of gates (scalars) in a gate tree."""
    return sum(int(p.size) for p in jax.tree.leaves(tree))
