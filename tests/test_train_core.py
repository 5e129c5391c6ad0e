"""The harness's promises: frozen weights never move, seeds fix the ticket, the optimiser sees only
gates, the summary reports what the binary ticket is; and the model zoo matches edge-popup's."""
import math

import jax
import numpy as np
import pytest

from configs import default
from slt_jax import load_ticket, masking, run_config, sharding
from slt_jax.frozen import init_variables
from slt_jax.methods import METHODS, method_hyperparameters
from slt_jax.models import create_model
from slt_jax.models.inits import weight_init
from slt_jax.run_config import model_spec
from slt_jax.ticket import ZOO_INIT_KWARGS
from slt_jax.train import Run, train_and_evaluate

from conftest import short_digits_config


def _init_params(spec, input_shape, seed):
    """The zoo model's weights from the seed, as every run and ticket draws them."""
    return init_variables(create_model(spec), input_shape, seed, ZOO_INIT_KWARGS)["params"]


def _gate_shapes(run):
    return [s.shape for s in masking.named_leaves(run.shapes).values()]


def _train(run, steps):
    state = sharding.replicate(run.initial_state(), run.mesh)
    step_fn = run.train_step()
    for i in range(steps):
        x, y = run.dataset.train_batch(run.config.seed, i, run.config.batch_size)
        state, _ = step_fn(state, run.frozen, *sharding.shard_batch((x, y), run.mesh))
    return state


@pytest.mark.parametrize("method", ["crbg", "edgepopup", "supermask", "iterand"])
def test_frozen_weights_are_bit_identical_and_only_gates_have_optimiser_state(method, tmp_path):
    # Structured gates have a shape no weight has, so a weight-shaped leaf in the state is easy to spot.
    config = short_digits_config(method=method, structured=method == "crbg", use_bias=True)
    run = Run(config, str(tmp_path))
    initial = _init_params(run.spec, run.dataset.input_shape, config.seed)
    state = _train(run, 10)
    assert int(state.step) == 10 and bool(state.finite)
    frozen = jax.device_get(run.frozen)
    for name, w in masking.named_leaves(initial).items():
        got = np.asarray(masking.named_leaves(frozen)[name])
        np.testing.assert_array_equal(got.view(np.uint32), np.asarray(w).view(np.uint32), err_msg=name)

    gate_shapes = set(_gate_shapes(run))
    weight_shapes = {np.shape(w) for w in masking.named_leaves(initial).values()}
    assert not gate_shapes & weight_shapes if config.structured else gate_shapes <= weight_shapes
    for tree in (state.opt_state, state.gates):
        for leaf in jax.tree.leaves(tree):
            assert np.ndim(leaf) == 0 or np.shape(leaf) in gate_shapes, np.shape(leaf)
    num_gates = sum(math.prod(s) for s in _gate_shapes(run))
    state_size = sum(np.size(leaf) for leaf in jax.tree.leaves(state.opt_state) if np.ndim(leaf))
    # Adam: mu, nu; SGD with momentum (edge-popup): one; plain SGD (supermask): none.
    assert state_size == {"crbg": 2, "edgepopup": 1, "supermask": 0, "iterand": 1}[method] * num_gates


@pytest.fixture(scope="module")
def tickets(short_run, tmp_path_factory):
    """Three short CRBG runs on digits: seed 0 twice (the shared short_run and one more), seed 1
    once (that one counted in epochs, with warm-up and the method's default learning rate, so the
    harness has steps to resolve). Each entry: (summary, ticket, config.to_dict() before the run, after it)."""
    out = {"a": (short_run.summary, load_ticket(f"{short_run.workdir}/ticket"), short_run.config_before,
                 short_run.config_after)}
    for label, overrides in (("b", {"seed": 0}),
                             ("c", {"seed": 1, "num_steps": 0, "num_epochs": 1, "warmup_epochs": 0.2})):
        workdir = str(tmp_path_factory.mktemp(f"run_{label}"))
        config = short_digits_config(**overrides)
        before = config.to_dict()
        summary = train_and_evaluate(config, workdir)
        out[label] = (summary, load_ticket(f"{workdir}/ticket"), before, config.to_dict())
    return out


def _gates(ticket):
    return {n: np.asarray(m) for n, m in masking.named_leaves(ticket.gate_masks).items()}


def test_same_seed_same_ticket_different_seed_different_ticket(tickets):
    (sa, ta, *_), (sb, tb, *_), (_, tc, *_) = tickets["a"], tickets["b"], tickets["c"]
    ga, gb, gc = _gates(ta), _gates(tb), _gates(tc)
    assert ga.keys() == gb.keys() == gc.keys()
    for name in ga:
        np.testing.assert_array_equal(ga[name], gb[name])
    assert sa["val_accuracy"] == sb["val_accuracy"] and sa["sparsity"] == sb["sparsity"]
    assert any(not np.array_equal(ga[n], gc[n]) for n in ga)
    # A different seed also draws different frozen weights.
    assert not np.array_equal(ta.frozen_params()["Dense_0"]["kernel"], tc.frozen_params()["Dense_0"]["kernel"])


def test_ticket_uses_only_initial_weights_or_zeros(tickets):
    summary, ticket, *_ = tickets["a"]
    config = short_digits_config()
    fresh = masking.named_leaves(_init_params(model_spec(config, 10), (8, 8, 1), config.seed))
    frozen = masking.named_leaves(ticket.frozen_params())
    masked = masking.named_leaves(ticket.masked_params())
    assert fresh.keys() == frozen.keys() == masked.keys()
    for name, w in fresh.items():
        w = np.asarray(w)
        np.testing.assert_array_equal(np.asarray(frozen[name]), w)
        m = np.asarray(masked[name])
        assert np.all((m == w) | (m == 0)), name
        assert np.any(m == 0) and np.any((m == w) & (w != 0)), name  # really a sub-network


def test_summary_reports_per_layer_sparsity_and_binary_gap(tickets):
    summary, ticket, *_ = tickets["a"]
    gates = _gates(ticket)
    sizes = {n: m.size for n, m in gates.items()}
    zeros = {n: int((~m).sum()) for n, m in gates.items()}
    assert set(summary["layer_sparsity"]) == set(sizes) == {"Dense_0/kernel", "Dense_1/kernel", "Dense_2/kernel"}
    for name, s in summary["layer_sparsity"].items():
        assert s == pytest.approx(zeros[name] / sizes[name])
    assert summary["gated_weights"] == sum(sizes.values())
    assert summary["sparsity"] == pytest.approx(sum(zeros.values()) / sum(sizes.values()))
    assert summary["binary_gap"] == pytest.approx(summary["stochastic_val_accuracy"] - summary["val_accuracy"])
    assert 0.0 <= summary["stochastic_val_accuracy"] <= 1.0


def test_train_and_evaluate_leaves_the_config_unchanged(tickets):
    for label, (summary, _, before, after) in tickets.items():
        assert after == before, label
    # The epoch-counted run really resolved its steps (as an argument, not into the config).
    summary, _, before, _ = tickets["c"]
    assert before["num_steps"] == 0 and summary["num_steps"] > 0
    assert before["learning_rate"] is None and before["lr_schedule"] is None


def test_every_config_key_has_a_validation_rule():
    config = default.get_config()
    top = set(config) - set(METHODS)
    assert set(METHODS) <= set(config)  # each method's hyperparameters are a sub-config
    assert top == set(run_config.RULES), (sorted(top - set(run_config.RULES)), sorted(set(run_config.RULES) - top))
    run_config.validate_config(config)  # every default is allowed by its rule
    for key, rule in run_config.RULES.items():
        assert rule(object()) is not None, key  # each rule really checks something
    for name in METHODS:
        # Nested keys are checked by building the method's dataclass: each must be one of its fields.
        assert set(config[name]) == set(method_hyperparameters(name)), name
        bad = default.get_config()
        bad[name].unlock()
        bad[name].no_such_hyperparameter = 1
        with pytest.raises(run_config.ConfigError, match=f"{name}:.*no_such_hyperparameter"):
            run_config.validate_config(bad)


def _conv_weights(depth, widths, image=32, channels=3, classes=10):
    count, c_in, side = 0, channels, image
    for w in widths:
        count += 9 * c_in * w + 9 * w * w
        c_in, side = w, side // 2
    return count + side * side * c_in * 256 + 256 * 256 + 256 * classes


@pytest.mark.parametrize("name, input_shape, expected, published_millions", [
    ("lenet300", (28, 28, 1), 784 * 300 + 300 * 100 + 100 * 10, None),
    ("digits_mlp", (8, 8, 1), 64 * 256 + 256 * 256 + 256 * 10, None),
    ("conv2", (32, 32, 3), _conv_weights(2, (64,)), 4.30),
    ("conv4", (32, 32, 3), _conv_weights(4, (64, 128)), 2.43),
    ("conv6", (32, 32, 3), _conv_weights(6, (64, 128, 256)), 2.26),
    ("conv8", (32, 32, 3), _conv_weights(8, (64, 128, 256, 512)), 5.28),
])
def test_model_parameter_counts_match_edgepopup(name, input_shape, expected, published_millions):
    model = create_model({"name": name, "num_classes": 10})
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), np.zeros((1, *input_shape), np.float32))["params"]
    leaves = masking.named_leaves(shapes)
    assert all(n.endswith("kernel") for n in leaves)  # no biases by default
    assert sum(math.prod(leaf.shape) for leaf in leaves.values()) == expected
    if published_millions is not None:
        assert round(expected / 1e6, 2) == published_millions
    assert model.apply({"params": jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)},
                       np.zeros((2, *input_shape), np.float32)).shape == (2, 10)


def test_biases_only_when_asked():
    shapes = jax.eval_shape(create_model({"name": "conv2", "num_classes": 10, "use_bias": True}).init,
                            jax.random.PRNGKey(0), np.zeros((1, 32, 32, 3), np.float32))["params"]
    assert sorted(masking.named_leaves(shapes)) == sorted(
        f"{layer}/{p}" for layer in ("Conv_0", "Conv_1", "Dense_0", "Dense_1", "Dense_2") for p in ("kernel", "bias"))


CONV_SHAPE, DENSE_SHAPE = (3, 3, 64, 128), (1024, 512)  # fan_in 576 and 1024


@pytest.mark.parametrize("shape", [CONV_SHAPE, DENSE_SHAPE])
def test_signed_kaiming_is_exactly_plus_minus_sqrt_2_over_fan_in(shape):
    w = np.asarray(weight_init("signed_kaiming")(jax.random.PRNGKey(0), shape))
    c = np.float32(math.sqrt(2.0 / math.prod(shape[:-1])))
    assert w.dtype == np.float32 and np.all(np.abs(w) == c)
    assert abs(np.mean(w > 0) - 0.5) < 0.01


@pytest.mark.parametrize("shape", [CONV_SHAPE, DENSE_SHAPE])
def test_kaiming_normal_has_std_sqrt_2_over_fan_in(shape):
    w = np.asarray(weight_init("kaiming_normal")(jax.random.PRNGKey(0), shape), np.float64)
    std = math.sqrt(2.0 / math.prod(shape[:-1]))
    assert abs(w.std() / std - 1) < 0.01 and abs(w.mean()) < 0.01 * std
    assert np.abs(w).max() > 3 * std  # untruncated


@pytest.mark.parametrize("shape", [CONV_SHAPE, DENSE_SHAPE])
def test_uniform_bound_is_the_scale_or_kaiming_uniform(shape):
    for scale, bound in ((None, math.sqrt(6.0 / math.prod(shape[:-1]))), (0.3, 0.3)):
        w = np.asarray(weight_init("uniform", scale)(jax.random.PRNGKey(0), shape))
        assert np.abs(w).max() <= bound and np.abs(w).max() > 0.99 * bound
        assert abs(w.std() / (bound / math.sqrt(3)) - 1) < 0.01
    # The model zoo passes the config's init_scale through.
    spec = {"name": "digits_mlp", "num_classes": 10, "weight_init": "uniform", "init_scale": 0.05}
    params = _init_params(spec, (8, 8, 1), 0)
    assert 0.049 < float(np.abs(params["Dense_1"]["kernel"]).max()) <= 0.05


def test_unknown_weight_init_names_the_allowed_ones():
    with pytest.raises(ValueError, match="'xavier'.*signed_kaiming, kaiming_normal, uniform"):
        weight_init("xavier")
