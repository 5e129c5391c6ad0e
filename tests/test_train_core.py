"""The harness's promises: frozen weights never move, seeds fix the ticket, the optimiser sees only
gates, the summary reports what the binary ticket is; and the model zoo matches edge-popup's."""
import math

import jax
import numpy as np
import pytest

from configs import default
from slt_jax import load_ticket, masking, sharding
from slt_jax.models import create_model
from slt_jax.models.inits import weight_init
from slt_jax.ticket import init_variables
from slt_jax.train import Run, make_train_step, model_spec, train_and_evaluate


def _short_config(**overrides):
    """tiny_config (see conftest.py), shorter: module-scoped fixtures cannot take a per-test fixture."""
    c = default.get_config()
    c.update(num_epochs=0, num_steps=20, batch_size=64, log_every=10, eval_every=20, checkpoint_every=0,
             num_devices=1, progress=False, plots=False)
    c.update(overrides)
    return c


def _train(run, steps):
    state = sharding.replicate(run.initial_state(), run.mesh)
    step_fn = make_train_step(run.model, run.method, run.optimizer)
    for i in range(steps):
        x, y = run.dataset.train_batch(run.config.seed, i, run.config.batch_size)
        state, _ = step_fn(state, run.frozen, *sharding.shard_batch((x, y), run.mesh))
    return state


@pytest.mark.parametrize("method", ["crbg", "edgepopup"])
def test_frozen_weights_are_bit_identical_and_only_gates_have_optimiser_state(method, tmp_path):
    # Structured gates have a shape no weight has, so a weight-shaped leaf in the state is easy to spot.
    config = _short_config(method=method, structured=method == "crbg", use_bias=True)
    run = Run(config, str(tmp_path))
    initial = init_variables(run.spec, run.dataset.input_shape, config.seed)["params"]
    state = _train(run, 10)
    assert int(state["step"]) == 10 and bool(state["finite"])
    frozen = jax.device_get(run.frozen)
    for name, w in masking.named_leaves(initial).items():
        got = np.asarray(masking.named_leaves(frozen)[name])
        np.testing.assert_array_equal(got.view(np.uint32), np.asarray(w).view(np.uint32), err_msg=name)

    gate_shapes = set(run.shapes.values())
    weight_shapes = {np.shape(w) for w in masking.named_leaves(initial).values()}
    assert not gate_shapes & weight_shapes if config.structured else gate_shapes <= weight_shapes
    for tree in (state["opt_state"], state["gates"]):
        for leaf in jax.tree.leaves(tree):
            assert np.ndim(leaf) == 0 or np.shape(leaf) in gate_shapes, np.shape(leaf)
    num_gates = sum(math.prod(s) for s in run.shapes.values())
    state_size = sum(np.size(leaf) for leaf in jax.tree.leaves(state["opt_state"]) if np.ndim(leaf))
    assert state_size == (2 if method == "crbg" else 1) * num_gates  # Adam: mu, nu; SGD: momentum


@pytest.fixture(scope="module")
def tickets(tmp_path_factory):
    """Three short CRBG runs on digits: seed 0 twice, seed 1 once."""
    out = {}
    for label, seed in (("a", 0), ("b", 0), ("c", 1)):
        workdir = str(tmp_path_factory.mktemp(f"run_{label}"))
        out[label] = (train_and_evaluate(_short_config(seed=seed), workdir), load_ticket(f"{workdir}/ticket"))
    return out


def test_same_seed_same_ticket_different_seed_different_ticket(tickets):
    (sa, ta), (sb, tb), (sc, tc) = tickets["a"], tickets["b"], tickets["c"]
    assert ta.gate_masks.keys() == tb.gate_masks.keys() == tc.gate_masks.keys()
    for name in ta.gate_masks:
        np.testing.assert_array_equal(ta.gate_masks[name], tb.gate_masks[name])
    assert sa["val_accuracy"] == sb["val_accuracy"] and sa["sparsity"] == sb["sparsity"]
    assert any(not np.array_equal(ta.gate_masks[n], tc.gate_masks[n]) for n in ta.gate_masks)
    # A different seed also draws different frozen weights.
    assert not np.array_equal(ta.frozen_params()["Dense_0"]["kernel"], tc.frozen_params()["Dense_0"]["kernel"])


def test_ticket_uses_only_initial_weights_or_zeros(tickets):
    summary, ticket = tickets["a"]
    config = _short_config()
    fresh = masking.named_leaves(init_variables(model_spec(config, 10), (8, 8, 1), config.seed)["params"])
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
    summary, ticket = tickets["a"]
    sizes = {n: m.size for n, m in ticket.gate_masks.items()}
    zeros = {n: int((~m).sum()) for n, m in ticket.gate_masks.items()}
    assert set(summary["layer_sparsity"]) == set(sizes) == {"Dense_0/kernel", "Dense_1/kernel", "Dense_2/kernel"}
    for name, s in summary["layer_sparsity"].items():
        assert s == pytest.approx(zeros[name] / sizes[name])
    assert summary["gated_weights"] == sum(sizes.values())
    assert summary["sparsity"] == pytest.approx(sum(zeros.values()) / sum(sizes.values()))
    assert summary["binary_gap"] == pytest.approx(summary["stochastic_val_accuracy"] - summary["val_accuracy"])
    assert 0.0 <= summary["stochastic_val_accuracy"] <= 1.0


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
    params = init_variables(spec, (8, 8, 1), 0)["params"]
    assert 0.049 < float(np.abs(params["Dense_1"]["kernel"]).max()) <= 0.05


def test_unknown_weight_init_names_the_allowed_ones():
    with pytest.raises(ValueError, match="'xavier'.*signed_kaiming, kaiming_normal, uniform"):
        weight_init("xavier")
