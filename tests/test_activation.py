"""The MLPs' ``activation``: leaky_relu passes negative pre-activations on (where ReLU zeroes them),
a ticket records it and reloads with it (one saved before the key loads as ReLU), the independent
verifier and compaction apply it, and a bad value is refused in one line naming the allowed ones."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from slt_jax import load_ticket, masking, save_ticket
from slt_jax.compaction import compact_ticket
from slt_jax.data import load_dataset, preprocess
from slt_jax.frozen import init_variables
from slt_jax.models import create_model
from slt_jax.models.mlp import MLP
from slt_jax.run_config import ConfigError, fingerprint, validate_config
from slt_jax.ticket import ZOO_INIT_KWARGS
from slt_jax.train import train_and_evaluate

from independent_verifier import _forward, verify

SPEC = {"name": "digits_mlp", "num_classes": 10, "weight_init": "uniform", "init_scale": None,
        "use_bias": False, "width": 0.25}


def _x(n=16):
    return jnp.asarray(np.random.default_rng(0).normal(size=(n, 8, 8, 1)), jnp.float32)


def test_leaky_relu_differs_from_relu_exactly_where_a_pre_activation_is_negative():
    relu, leaky = create_model(SPEC), create_model({**SPEC, "activation": "leaky_relu", "negative_slope": 0.25})
    variables, x = relu.init(jax.random.key(0), _x()), _x()
    w = variables["params"]["Dense_0"]["kernel"]
    hidden = x.reshape(len(x), -1) @ w
    assert (hidden < 0).any()  # random weights: about half the pre-activations are negative
    assert not np.allclose(relu.apply(variables, x), leaky.apply(variables, x))
    # one hidden layer read out by the identity: leaky_relu(v) = v for v > 0, 0.25 v otherwise
    one = MLP((w.shape[1],), w.shape[1], activation="leaky_relu", negative_slope=0.25)
    eye = {"params": {"Dense_0": {"kernel": w}, "Dense_1": {"kernel": jnp.eye(w.shape[1])}}}
    np.testing.assert_allclose(one.apply(eye, x), jnp.where(hidden > 0, hidden, 0.25 * hidden), rtol=1e-6, atol=1e-6)
    # every pre-activation positive (positive weights and inputs): the two are the same function
    positive = jax.tree.map(jnp.abs, variables)
    np.testing.assert_array_equal(relu.apply(positive, jnp.abs(x)), leaky.apply(positive, jnp.abs(x)))


def test_a_leaky_slope_of_none_is_025():
    a = create_model({**SPEC, "activation": "leaky_relu"})
    b = create_model({**SPEC, "activation": "leaky_relu", "negative_slope": 0.25})
    variables = a.init(jax.random.key(0), _x())
    np.testing.assert_array_equal(a.apply(variables, _x()), b.apply(variables, _x()))


@pytest.mark.parametrize("spec, message", [
    ({**SPEC, "activation": "prelu"}, r"^unknown activation 'prelu'; allowed: relu, leaky_relu$"),
    ({**SPEC, "activation": "leaky_relu", "negative_slope": 1.5}, r"^negative_slope=1.5; allowed: a number in \[0, 1\)$"),
    ({**SPEC, "negative_slope": 0.1}, r"^negative_slope=0.1 with activation='relu'"),
    ({"name": "conv2", "num_classes": 10, "activation": "leaky_relu"},
     r"^activation='leaky_relu' with model 'conv2'; allowed: activation='relu', or a model of digits_mlp, lenet300$"),
])
def test_a_bad_activation_is_refused_in_one_line(spec, message):
    with pytest.raises(ValueError, match=message):
        create_model(spec)


@pytest.mark.parametrize("overrides, message", [
    ({"activation": "gelu"}, r"^activation='gelu'; allowed: relu, leaky_relu$"),
    ({"activation": "leaky_relu", "negative_slope": -0.1}, r"^negative_slope=-0.1; allowed: a number in \[0.0, 1.0\)$"),
    ({"negative_slope": 0.1}, r"^negative_slope=0.1 with activation='relu'; allowed"),
    ({"model": "conv4", "activation": "leaky_relu"}, r"^activation='leaky_relu' with model 'conv4'; allowed"),
])
def test_a_bad_activation_in_the_config_is_refused(tiny_config, overrides, message):
    tiny_config.update(overrides)
    with pytest.raises(ConfigError, match=message):
        validate_config(tiny_config)


def test_relu_keeps_the_fingerprint_runs_had_before_the_key(tiny_config):
    before = fingerprint(tiny_config)
    assert "activation" not in before and "negative_slope" not in before
    tiny_config.activation = "leaky_relu"
    assert fingerprint(tiny_config)["activation"] == "leaky_relu"


def test_a_ticket_saved_without_the_key_loads_as_relu(tmp_path):
    params = init_variables(create_model(SPEC), (8, 8, 1), 3, ZOO_INIT_KWARGS)["params"]
    masks = jax.tree.map(lambda s: np.random.default_rng(0).random(s.shape) < 0.5, masking.gate_shapes(params))
    save_ticket(str(tmp_path / "old"), {"model": SPEC, "input_shape": [8, 8, 1], "seed": 3}, masks, frozen=params,
                method="crbg")
    ticket = load_ticket(str(tmp_path / "old"))
    assert ticket.model.activation == "relu"
    relu = create_model(SPEC).apply({"params": ticket.masked_params()}, _x())
    np.testing.assert_array_equal(ticket.model.apply({"params": ticket.masked_params()}, _x()), relu)


def test_a_leaky_structured_ticket_round_trips_compacts_and_verifies(tiny_config, tmp_path):
    c = tiny_config
    c.activation, c.negative_slope, c.weight_init = "leaky_relu", 0.1, "uniform"
    c.structured, c.structured_policy, c.structured_inputs, c.sparsity = True, "", r"^Dense_[01]/kernel$", 0.5
    train_and_evaluate(c, str(tmp_path))
    with open(os.path.join(tmp_path, "ticket", "ticket.json")) as f:
        spec = json.load(f)["model"]
    assert (spec["activation"], spec["negative_slope"]) == ("leaky_relu", 0.1)
    ticket = load_ticket(str(tmp_path / "ticket"))
    assert (ticket.model.activation, ticket.model.negative_slope) == ("leaky_relu", 0.1)

    data = load_dataset(c)
    x = jnp.asarray(preprocess(data.x_val, ticket.meta["preprocessing"]))
    leaky = ticket.model.apply({"params": ticket.masked_params()}, x)
    relu = create_model({**spec, "activation": "relu", "negative_slope": None}).apply(
        {"params": ticket.masked_params()}, x)
    assert not np.allclose(leaky, relu)  # the ticket's model really is the leaky one
    assert (np.argmax(leaky, -1) == ticket.predict(data.x_val)).all()

    module, variables = compact_ticket(ticket)
    assert sum(int((~np.asarray(m)).sum()) for m in jax.tree.leaves(ticket.gate_masks)) > 0
    np.testing.assert_allclose(module.apply(variables, x), leaky, rtol=1e-5, atol=1e-5)

    weights = {k: np.asarray(v, np.float64) for k, v in masking.named_leaves(ticket.masked_params()).items()}
    np.testing.assert_allclose(_forward("digits_mlp", weights, np.asarray(x), 0.1), leaky, rtol=1e-4, atol=1e-4)
    report = verify(str(tmp_path / "ticket"), data.x_val, data.y_val)
    with open(os.path.join(tmp_path, "summary.json")) as f:
        assert report["accuracy"] == pytest.approx(json.load(f)["val_accuracy"], abs=1e-9)
