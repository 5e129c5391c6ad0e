"""The library misused from one's own code: every mistake is a one-line error, never a silent no-op.

Each case here once passed silently (nothing trained, an inverted mask, a dropped weight) or
failed with an unrelated traceback (ZeroDivisionError, AttributeError, KeyError).
"""
import math
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import slt_jax
from slt_jax import gates as gates_lib
from slt_jax import masking
from slt_jax.compaction import compact_ticket
from slt_jax.frozen import FrozenWeightsError, load_params_file, save_params_file
from slt_jax.models import create_model

from conftest import ROOT

LOGITS = {"Dense_0": {"kernel": jnp.array([[1.5, -1.5, 0.2]])}, "Dense_1": {"kernel": jnp.array([[0.8], [-0.3]])}}


def _one_line(e: pytest.ExceptionInfo) -> str:
    message = str(e.value)
    assert message and "\n" not in message, message
    return message


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Dense(4)(x))
        return nn.Dense(3)(h)


# gates_only: the tree it is given must be a variables dict with a "gates" collection.

@pytest.mark.parametrize("tree, named", [
    ({"Dense_0": {"kernel": jnp.ones((2, 3))}}, "'Dense_0'"),  # the gates subtree itself
    ({"params": {"kernel": jnp.ones(3)}}, "'params'"),
    ((jnp.ones(3), jnp.ones(2)), "tuple"),
])
def test_gates_only_refuses_a_tree_without_a_gates_collection(tree, named):
    tx = slt_jax.gates_only(optax.sgd(0.1))
    with pytest.raises(ValueError) as e:
        tx.init(tree)  # before: every update -0.0 (dict), or AttributeError (tuple)
    message = _one_line(e)
    assert "gates_only" in message and named in message and "'gates'" in message, message


def test_gates_only_checks_the_updates_too():
    variables = {"frozen": {"kernel": jnp.ones(3)}, "gates": {"kernel": jnp.zeros(3)}}
    tx = slt_jax.gates_only(optax.sgd(0.1))
    state = tx.init(variables)
    updates, _ = tx.update({"frozen": {"kernel": jnp.ones(3)}, "gates": {"kernel": jnp.ones(3)}}, state, variables)
    np.testing.assert_allclose(updates["gates"]["kernel"], -0.1 * np.ones(3))
    with pytest.raises(ValueError, match="gates_only"):
        tx.update(variables["gates"], state, variables["gates"])


# Gate functions: temperatures > 0 and finite, a tree with at least one float array.

@pytest.mark.parametrize("temp", [-0.5, 0.0, float("nan"), float("inf"), np.float32(-1.0), jnp.array(-0.5)])
def test_gate_functions_refuse_a_temperature_that_is_not_a_positive_finite_number(temp):
    key = jax.random.key(0)
    for family in ("gaussian", "hard_concrete", "concrete"):
        with pytest.raises(ValueError) as e:  # before: 1 - p, and samples inverted
            gates_lib.expected_density(LOGITS, temp, family=family)
        assert "temp=" in _one_line(e) and "allowed: a finite number > 0" in str(e.value), str(e.value)
        with pytest.raises(ValueError, match="temp="):
            slt_jax.sample_gates(key, LOGITS, temp, family=family)


@pytest.mark.parametrize("temps", [(float("inf"), 0.5), (0.5, float("nan")), (-0.5, 0.5)])
def test_crbg_refuses_a_temperature_schedule_that_is_not_positive_and_finite(temps):
    with pytest.raises(ValueError, match="temperatures must be finite and > 0"):
        slt_jax.CRBG(num_steps=10, temp_start=temps[0], temp_end=temps[1])


def test_a_negative_temperature_used_to_invert_the_density():
    # Why the check exists: Phi(mu / -sigma) = 1 - Phi(mu / sigma).
    family = gates_lib.get_family("gaussian")
    p = jnp.array([1.5, -0.3, 0.2])
    np.testing.assert_allclose(family.prob_open(p, -0.5), 1 - family.prob_open(p, 0.5), atol=1e-6)
    assert float(slt_jax.expected_density({"a": p}, 0.5)) == pytest.approx(float(jnp.mean(family.prob_open(p, 0.5))))


def test_a_traced_temperature_is_computed_with_not_checked():
    # Inside jit the temperature has no value to check; CRBG checks its schedule when it is built.
    density = jax.jit(lambda t: slt_jax.expected_density(LOGITS, t))(0.5)
    assert float(density) == pytest.approx(float(slt_jax.expected_density(LOGITS, 0.5)))
    sample = jax.jit(lambda t: slt_jax.sample_gates(jax.random.key(0), LOGITS, t))(jnp.float32(0.5))
    assert jax.tree.structure(sample) == jax.tree.structure(LOGITS)


@pytest.mark.parametrize("fn", ["expected_density", "sample_gates", "binary_mask", "indecision", "deterministic_gates"])
def test_gate_functions_refuse_an_empty_tree(fn):
    call = {"expected_density": lambda t: gates_lib.expected_density(t, 0.5),
            "sample_gates": lambda t: gates_lib.sample_gates(jax.random.key(0), t, 0.5)}.get(
        fn, getattr(gates_lib, fn))
    for empty in ({}, {"Dense_0": {"kernel": None}}):
        with pytest.raises(ValueError) as e:  # before: ZeroDivisionError, or an empty result
            call(empty)
        assert "no gate" in _one_line(e), str(e.value)


@pytest.mark.parametrize("leaf, kind", [(0.3, "a float"), ([0.1, 0.2], "a float"), (np.array([1, 2]), "int64"),
                                        (jnp.array([True]), "bool"), (np.array([1j]), "complex128")])
def test_gate_functions_refuse_a_leaf_that_is_not_a_float_array(leaf, kind):
    tree = {"Dense_0": {"kernel": jnp.ones(2)}, "Dense_1": {"kernel": leaf}}
    calls = (lambda: slt_jax.expected_density(tree, 0.5), lambda: slt_jax.sample_gates(jax.random.key(0), tree, 0.5),
             lambda: slt_jax.binary_mask(tree), lambda: gates_lib.indecision(tree))
    for call in calls:
        with pytest.raises(TypeError) as e:  # before: AttributeError, or a value computed on ints
            call()
        message = _one_line(e)
        assert "'Dense_1/kernel" in message and kind in message and "allowed" in message, message


# gated(): a module with nothing to gate.

def test_gated_module_without_parameters_is_refused():
    class NoParams(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.relu(x)

    g = slt_jax.gated(NoParams(), slt_jax.CRBG(num_steps=10))
    with pytest.raises(ValueError) as e:  # before: KeyError 'params'
        g.init(jax.random.key(0), jnp.ones((1, 3)))
    assert "NoParams" in _one_line(e) and "no parameters" in str(e.value), str(e.value)


# Structured gating with a policy that also matches biases: the bias closes with its unit.

def _mlp_params():
    return jax.jit(MLP().init)(jax.random.key(0), jnp.ones((1, 5)))["params"]


def test_structured_bias_closes_with_its_units_gate():
    params = jax.tree.map(lambda w: w + 1.0, _mlp_params())  # Dense biases start at 0: make them visible
    shapes = masking.gate_shapes(params, r"(kernel|bias)$", structured=True)
    # Before: each bias got gates of its own, so a closed unit kept its bias.
    assert shapes["Dense_0"]["bias"] is None and shapes["Dense_1"]["bias"] is None
    assert shapes["Dense_0"]["kernel"].shape == (1, 4) and shapes["Dense_1"]["kernel"].shape == (1, 3)
    masks = {"Dense_0": {"kernel": jnp.array([[True, False, True, False]]), "bias": None},
             "Dense_1": {"kernel": jnp.array([[True, True, False]]), "bias": None}}
    masked = masking.apply_masks(params, masks)
    np.testing.assert_array_equal(masked["Dense_0"]["bias"] == 0, [False, True, False, True])
    np.testing.assert_array_equal(masked["Dense_1"]["bias"] == 0, [False, False, True])
    # Both densities count each closed bias: of 5*4 + 4 + 4*3 + 3 = 39 gated weights, units 0 and 2
    # of Dense_0 keep 2 * (5 + 1), units 0 and 1 of Dense_1 keep 2 * (4 + 1): 22.
    assert sum(int(np.count_nonzero(w)) for w in jax.tree.leaves(masked)) == 22
    report = masking.sparsity_report(params, masks)
    assert report["gated_weights"] == 39 and report["sparsity"] == pytest.approx(1 - 22 / 39)
    method = slt_jax.CRBG(num_steps=10, param_shapes=params)
    assert float(method.density(masks)) == pytest.approx(22 / 39)


def test_structured_bias_of_a_per_weight_kernel_keeps_its_own_gate():
    # The classifier's kernel keeps a gate per weight (structured_policy): its bias has no unit to follow.
    shapes = masking.gate_shapes(_mlp_params(), r"(kernel|bias)$", structured=True, structured_policy=r"^Dense_0/")
    assert shapes["Dense_0"]["bias"] is None and shapes["Dense_0"]["kernel"].shape == (1, 4)
    assert shapes["Dense_1"]["bias"].shape == (3,) and shapes["Dense_1"]["kernel"].shape == (4, 3)


def test_gated_structured_with_bias_policy_removes_whole_units():
    method = slt_jax.CRBG(num_steps=10)
    g = slt_jax.gated(MLP(), method, policy=r"(kernel|bias)$", structured=True)
    variables = g.init(jax.random.key(0), jnp.ones((1, 5)))
    assert variables["gates"]["Dense_0"]["bias"] is None
    gates = jax.tree.map(lambda p: jnp.where(jnp.arange(p.shape[-1]) % 2 == 0, 1.0, -1.0) * jnp.ones(p.shape),
                         variables["gates"])
    masked = masking.apply_masks(jax.tree.map(jnp.ones_like, variables["frozen"]), method.binary_masks(gates))
    assert np.all(np.asarray(masked["Dense_0"]["bias"])[1::2] == 0)
    assert np.all(np.asarray(masked["Dense_0"]["kernel"])[:, 1::2] == 0)


# frozen_from: a params file with exactly the model's leaves, as finite floats.

@pytest.fixture
def template():
    return _mlp_params()


@pytest.mark.parametrize("change, named", [
    (lambda p: {**p, "Dense_9/kernel": np.ones((2, 2), np.float32)}, ["'Dense_9/kernel'", "not a parameter"]),
    (lambda p: {**p, "Dense_0/kernel": p["Dense_0/kernel"].astype(np.int32)}, ["'Dense_0/kernel'", "int32"]),
    (lambda p: {**p, "Dense_1/bias": p["Dense_1/bias"] > 0}, ["'Dense_1/bias'", "bool"]),
    (lambda p: {**p, "Dense_1/kernel": p["Dense_1/kernel"] + 1j}, ["'Dense_1/kernel'", "complex64"]),
    (lambda p: {**p, "Dense_1/kernel": np.where(p["Dense_1/kernel"] > 0, np.nan, p["Dense_1/kernel"])},
     ["'Dense_1/kernel'", "NaN"]),
    (lambda p: {**p, "Dense_0/bias": np.full(4, 1e39)}, ["'Dense_0/bias'", "float32"]),  # inf once float32
])
def test_params_file_with_other_leaves_or_dtypes_is_refused(tmp_path, template, change, named):
    flat = {name: np.asarray(w) for name, w in masking.named_leaves(template).items()}
    path = str(tmp_path / "w.npz")
    np.savez(path, **change(flat))
    with pytest.raises(FrozenWeightsError) as e:  # before: dropped, or cast (complex lost its imaginary part)
        load_params_file(path, template)
    message = _one_line(e)
    for text in named + ["frozen_from=", "allowed"]:
        assert text in message, message


def test_params_file_of_float64_weights_loads_as_float32(tmp_path, template):
    path = str(tmp_path / "w.npz")
    save_params_file(path, jax.tree.map(lambda w: np.asarray(w, np.float64), template))
    loaded = load_params_file(path, template)
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(template)):
        assert a.dtype == np.float32
        np.testing.assert_array_equal(a, b)


# Compaction: ``multiple`` is a positive integer.

@pytest.fixture(scope="module")
def structured_ticket(tmp_path_factory):
    """A structured digits_mlp ticket with units closed in each hidden layer, in WORKDIR/ticket."""
    spec = {"name": "digits_mlp", "num_classes": 10}
    params = jax.eval_shape(create_model(spec).init, jax.random.key(0), jnp.zeros((1, 8, 8, 1)))["params"]
    shapes = masking.gate_shapes(params, structured=True)
    masks = jax.tree.map(lambda s: np.arange(math.prod(s.shape)).reshape(s.shape) % 3 != 0, shapes)
    workdir = tmp_path_factory.mktemp("workdir")
    slt_jax.save_ticket(str(workdir / "ticket"), {"seed": 0, "input_shape": [8, 8, 1], "model": spec,
                                                  "structured": True}, masks, method="crbg")
    return workdir


@pytest.mark.parametrize("multiple", [-8, 0, 2.5, True, "8"])
def test_compaction_refuses_a_multiple_that_is_not_a_positive_integer(structured_ticket, multiple):
    ticket = slt_jax.load_ticket(str(structured_ticket / "ticket"))
    with pytest.raises(ValueError) as e:  # before: -8 kept 254 of 256 units; 0 ZeroDivisionError; 2.5 TypeError
        compact_ticket(ticket, multiple)
    assert f"multiple={multiple!r}" in _one_line(e) and "positive integer" in str(e.value), str(e.value)


def test_compaction_benchmark_takes_a_workdir_and_names_a_path_without_a_ticket(structured_ticket, tmp_path):
    def bench(path):
        return subprocess.run([sys.executable, "benchmarks/compaction.py", str(path), "--batch", "2", "--reps", "1",
                               "--json"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                              env={**os.environ, "PYTHONPATH": ROOT})

    p = bench(structured_ticket)  # the workdir, not its ticket/: its ticket is used
    assert p.returncode == 0, p.stderr[-2000:]
    assert '"compact_macs"' in p.stdout.strip().splitlines()[-1]
    p = bench(tmp_path)  # before: a FileNotFoundError traceback
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), p.stderr
    assert str(tmp_path) in lines[0] and "ticket.json" in lines[0], lines[0]
