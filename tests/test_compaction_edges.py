"""Compaction at its edges (issue 22): a structured ticket whose first layer is closed compacts to a
model that applies (and so do count_macs and benchmarks/compaction.py), and a user's own Dense/Conv
Linen model compacts, or is refused in one line naming the layers it cannot compact."""
import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from slt_jax import load_ticket, masking, save_ticket
from slt_jax.compaction import compact_ticket, count_macs
from slt_jax.models import create_model

from conftest import ROOT

rng = np.random.default_rng(0)
X_DIGITS = rng.normal(size=(64, 8, 8, 1)).astype(np.float32)


def _structured_masks(params, closed_layer=None, seed=0):
    """One gate per unit, each open with probability 0.6; every unit of ``closed_layer`` closed."""
    r = np.random.default_rng(seed)
    masks = jax.tree.map(lambda s: r.random(s.shape) < 0.6, masking.gate_shapes(params, structured=True))
    if closed_layer is not None:
        masks[closed_layer]["kernel"] = np.zeros_like(masks[closed_layer]["kernel"])
    return masks


def _jit_init(module, x, **kwargs):
    """``module.init(...)["params"]`` jitted: one compile instead of one per eager op."""
    return jax.jit(lambda key: module.init(key, x, **kwargs))(jax.random.key(0))["params"]


def _zoo_ticket(tmp_path, name, closed_layer, use_bias=True, shape=(8, 8, 1)):
    spec = {"name": name, "num_classes": 10, "width": 0.25, "use_bias": use_bias}
    params = _jit_init(create_model(spec), jnp.zeros((1, *shape)), train=False)
    path = str(tmp_path / "ticket")
    save_ticket(path, {"model": spec, "input_shape": list(shape), "seed": 1, "structured": True},
                _structured_masks(params, closed_layer), method="crbg")
    return path


def _check_compact(ticket, x):
    module, variables = compact_ticket(ticket)
    kwargs = ticket.meta.get("init_kwargs", {"train": False} if "model" in ticket.meta else {})
    masked = jax.jit(lambda variables: ticket.model.apply(variables, x, **kwargs))(
        {"params": ticket.masked_params(), **ticket.model_state()})
    compact = jax.jit(module.apply)(variables, x)
    scale = max(float(np.abs(masked).max()), 1.0)
    np.testing.assert_allclose(compact, masked, rtol=1e-5, atol=1e-5 * scale)
    shape = tuple(ticket.meta["input_shape"])
    assert count_macs(module, shape) < count_macs(ticket.model, shape)
    return module, variables


@pytest.mark.parametrize("name, closed, use_bias", [
    ("digits_mlp", "Dense_0", True),
    ("digits_mlp", "Dense_0", False),
    ("digits_mlp", "Dense_1", False),
    ("conv2", "Conv_0", False),
])
def test_a_closed_layer_compacts_to_a_model_that_applies(name, closed, use_bias, tmp_path):
    ticket = load_ticket(_zoo_ticket(tmp_path, name, closed, use_bias))
    _check_compact(ticket, X_DIGITS)


def test_the_benchmark_runs_on_a_ticket_whose_first_layer_is_closed(tmp_path):
    path = _zoo_ticket(tmp_path, "digits_mlp", "Dense_0")
    p = subprocess.run([sys.executable, "benchmarks/compaction.py", path, "--batch", "8", "--reps", "2", "--json"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    result = json.loads(p.stdout.strip().splitlines()[-1])
    assert result["compact_macs"] < result["masked_macs"] and result["max_abs_logit_diff"] <= 1e-5


# A user's own Linen models.

class UserMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = x.reshape((x.shape[0], -1))
        x = nn.relu(nn.Dense(32, bias_init=nn.initializers.normal(0.5))(x))
        x = nn.relu(nn.Dense(24, name="hidden")(x))
        return nn.Dense(10)(x)


class UserCNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(8, (3, 3))(x))
        x = nn.max_pool(x, (2, 2), (2, 2))
        x = nn.relu(nn.Conv(12, (3, 3), use_bias=False)(x))
        x = x.reshape((x.shape[0], -1))
        x = nn.relu(nn.Dense(16)(x))
        return nn.Dense(10)(x)


class Block(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.relu(nn.Dense(20)(x))


class NestedMLP(nn.Module):
    """Layers inside a submodule: their paths are nested (block/Dense_0)."""

    @nn.compact
    def __call__(self, x):
        x = Block(name="block")(x.reshape((x.shape[0], -1)))
        return nn.Dense(10)(x)


def _user_ticket(tmp_path, module, closed_layer=None, seed=0, structured_inputs=""):
    params = _jit_init(module, X_DIGITS[:1])
    r = np.random.default_rng(seed)
    shapes = masking.gate_shapes(params, structured=True, structured_inputs=structured_inputs)
    masks = jax.tree.map(lambda s: r.random(s.shape) < 0.6, shapes)
    if closed_layer is not None:
        masks[closed_layer]["kernel"] = np.zeros_like(masks[closed_layer]["kernel"])
    path = str(tmp_path / "ticket")
    save_ticket(path, {"seed": 4, "input_shape": [8, 8, 1], "structured": True}, masks, model=module, method="crbg")
    return load_ticket(path, model=module)


@pytest.mark.parametrize("module, closed, inputs", [
    (UserMLP(), None, ""),
    (UserMLP(), "Dense_0", ""),
    (UserMLP(), None, r"^Dense_0/"),  # pixel gates: the compact model reads the kept pixels only
    (UserCNN(), None, ""),
    (NestedMLP(), None, ""),
])
def test_a_users_own_dense_and_conv_model_compacts(module, closed, inputs, tmp_path):
    ticket = _user_ticket(tmp_path, module, closed, structured_inputs=inputs)
    module, variables = _check_compact(ticket, X_DIGITS)
    assert module.apply(variables, X_DIGITS[:3]).shape == (3, 10)


class WithNorm(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.LayerNorm()(nn.Dense(16)(x.reshape((x.shape[0], -1)))))
        return nn.Dense(10)(x)


class Sigmoid(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(10)(nn.sigmoid(nn.Dense(16)(x.reshape((x.shape[0], -1)))))  # sigmoid(0) = 1/2


class Shared(nn.Module):
    @nn.compact
    def __call__(self, x):
        dense = nn.Dense(64)
        return nn.Dense(10)(nn.relu(dense(nn.relu(dense(x.reshape((x.shape[0], -1)))))))


class WithBatchNorm(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Dense(16)(x.reshape((x.shape[0], -1)))
        x = nn.BatchNorm(use_running_average=True, use_scale=False, use_bias=False)(x)
        return nn.Dense(10)(nn.relu(x))


@pytest.mark.parametrize("module, words", [
    (WithNorm(), "LayerNorm_0"),
    (WithBatchNorm(), "BatchNorm_0 (batch_stats)"),
    (Sigmoid(), "not exact"),
    (Shared(), "Dense_0"),
])
def test_a_model_it_cannot_compact_is_one_line_naming_why(module, words, tmp_path):
    ticket = _user_ticket(tmp_path, module)
    with pytest.raises(ValueError) as err:
        compact_ticket(ticket)
    message = str(err.value)
    assert "\n" not in message and words in message, message
