"""Parameter-level gating: policies, gate shapes, exact mask application, and a user's own model."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from slt_jax import masking
from slt_jax.methods.crbg import CRBG
from slt_jax.methods.edgepopup import EdgePopup
from slt_jax.models import create_model
from slt_jax.ticket import init_variables
from slt_jax.train import make_train_step


def _spec(name, use_bias=False):
    return {"name": name, "num_classes": 10, "weight_init": "signed_kaiming", "use_bias": use_bias, "width": 0.25}


def _with_random_biases(params, seed=0):
    # Flax initialises biases to 0, which would hide whether a gate reaches them.
    leaves = masking.named_leaves(params)
    keys = iter(jax.random.split(jax.random.PRNGKey(seed), len(leaves)))
    return jax.tree_util.tree_map_with_path(
        lambda p, w: jax.random.normal(next(keys), w.shape) if masking.path_name(p).endswith("bias") else w, params)


@pytest.mark.parametrize("name, input_shape, kernels", [
    ("digits_mlp", (8, 8, 1), ["Dense_0/kernel", "Dense_1/kernel", "Dense_2/kernel"]),
    ("conv2", (8, 8, 3), ["Conv_0/kernel", "Conv_1/kernel", "Dense_0/kernel", "Dense_1/kernel", "Dense_2/kernel"]),
])
def test_default_policy_gates_every_kernel_with_the_right_shapes(name, input_shape, kernels):
    params = init_variables(_spec(name, use_bias=True), input_shape, 0)["params"]
    leaves = masking.named_leaves(params)
    unstructured = masking.gate_shapes(params)
    assert sorted(unstructured) == sorted(kernels)  # first and last layer included, biases not
    for k in kernels:
        assert unstructured[k] == leaves[k].shape
    structured = masking.gate_shapes(params, structured=True)
    for k in kernels:
        shape = leaves[k].shape
        assert structured[k] == (1,) * (len(shape) - 1) + (shape[-1],)


def test_structured_policy_gives_unit_gates_to_matching_leaves_only():
    params = init_variables(_spec("digits_mlp", use_bias=True), (8, 8, 1), 0)["params"]
    leaves = masking.named_leaves(params)
    shapes = masking.gate_shapes(params, structured=True, structured_policy=r"^Dense_[01]/")
    assert shapes["Dense_0/kernel"] == (1, leaves["Dense_0/kernel"].shape[-1])
    assert shapes["Dense_1/kernel"] == (1, leaves["Dense_1/kernel"].shape[-1])
    assert shapes["Dense_2/kernel"] == leaves["Dense_2/kernel"].shape
    # The per-weight classifier gates leave its bias alone; the unit gates close their units' biases.
    gated = {n for n, m in masking.full_masks(params, {k: np.ones(v, bool) for k, v in shapes.items()}).items()
             if m is not None}
    assert gated == {"Dense_0/kernel", "Dense_0/bias", "Dense_1/kernel", "Dense_1/bias", "Dense_2/kernel"}
    assert masking.gate_shapes(params, structured=False, structured_policy=r"^Dense_0/") == masking.gate_shapes(params)
    with pytest.raises(ValueError, match="structured_policy"):
        masking.gate_shapes(params, structured=True, structured_policy="Dense_[0")


def test_policy_selects_leaves_and_rejects_a_policy_matching_nothing():
    params = init_variables(_spec("digits_mlp"), (8, 8, 1), 0)["params"]
    assert list(masking.gate_shapes(params, policy=r"^Dense_1/")) == ["Dense_1/kernel"]
    with pytest.raises(ValueError, match="Dense_9") as err:
        masking.gate_shapes(params, policy=r"Dense_9")
    assert "Dense_0/kernel" in str(err.value)  # names what exists


def test_bool_mask_is_exactly_where_mask_w_zero():
    w = jnp.asarray(np.random.default_rng(0).standard_normal((40, 30)).astype(np.float32) * np.logspace(-30, 30, 30,
                                                                                                       dtype=np.float32))
    params = {"Dense_0": {"kernel": w}}
    mask = jax.random.bernoulli(jax.random.PRNGKey(1), 0.3, w.shape)
    for apply in (masking.apply_masks, jax.jit(masking.apply_masks)):
        out = np.asarray(apply(params, {"Dense_0/kernel": mask})["Dense_0"]["kernel"])
        expected = np.where(np.asarray(mask), np.asarray(w), np.float32(0))
        np.testing.assert_array_equal(out.view(np.uint32), expected.view(np.uint32))  # bit-identical, +0.0 for dropped


def test_gates_at_one_give_the_plain_model():
    spec = _spec("conv2", use_bias=True)
    model = create_model(spec)
    params = _with_random_biases(init_variables(spec, (8, 8, 3), 0)["params"])
    x = jax.random.normal(jax.random.PRNGKey(2), (4, 8, 8, 3))
    plain = model.apply({"params": params}, x)
    for structured in (False, True):
        ones = {k: jnp.ones(s) for k, s in masking.gate_shapes(params, structured=structured).items()}
        gated = model.apply({"params": masking.apply_masks(params, ones)}, x)
        np.testing.assert_array_equal(gated, plain)


def test_structured_gate_closes_the_whole_unit_bias_included():
    spec = _spec("digits_mlp", use_bias=True)
    model = create_model(spec)
    params = _with_random_biases(init_variables(spec, (8, 8, 1), 0)["params"])
    shapes = masking.gate_shapes(params, structured=True)
    closed = np.array([0, 5, 17])
    gate = np.ones(shapes["Dense_0/kernel"], bool)
    gate[0, closed] = False
    masks = {k: jnp.ones(s, bool) for k, s in shapes.items()} | {"Dense_0/kernel": jnp.asarray(gate)}
    gated = masking.apply_masks(params, masks)
    assert np.all(np.asarray(gated["Dense_0"]["bias"])[closed] == 0)
    np.testing.assert_array_equal(np.delete(np.asarray(gated["Dense_0"]["bias"]), closed),
                                  np.delete(np.asarray(params["Dense_0"]["bias"]), closed))
    x = jax.random.normal(jax.random.PRNGKey(3), (16, 8, 8, 1))
    _, inter = model.apply({"params": gated}, x, capture_intermediates=True)
    pre_activation = np.asarray(inter["intermediates"]["Dense_0"]["__call__"][0])
    assert np.all(pre_activation[:, closed] == 0.0)  # exactly 0, so ReLU outputs exactly 0
    assert np.all(np.delete(pre_activation, closed, axis=1) != 0.0)
    # A soft structured gate scales the unit's weights and bias by the same factor.
    soft = jnp.linspace(0.0, 1.0, shapes["Dense_0/kernel"][-1]).reshape(shapes["Dense_0/kernel"])
    out = masking.apply_masks(params, {"Dense_0/kernel": soft})
    np.testing.assert_array_equal(out["Dense_0"]["bias"], params["Dense_0"]["bias"] * soft[0])
    np.testing.assert_array_equal(out["Dense_0"]["kernel"], params["Dense_0"]["kernel"] * soft)


def test_unstructured_gate_leaves_biases_alone():
    params = _with_random_biases(init_variables(_spec("digits_mlp", use_bias=True), (8, 8, 1), 0)["params"])
    zeros = {k: jnp.zeros(s, bool) for k, s in masking.gate_shapes(params).items()}
    out = masking.apply_masks(params, zeros)
    for layer in params:
        np.testing.assert_array_equal(out[layer]["bias"], params[layer]["bias"])
        assert not np.any(out[layer]["kernel"])


def test_mask_tree_is_params_shaped_with_none_for_ungated_leaves():
    params = init_variables(_spec("digits_mlp", use_bias=True), (8, 8, 1), 0)["params"]
    for structured in (False, True):
        shapes = masking.gate_shapes(params, structured=structured)
        masks = {k: jax.random.bernoulli(jax.random.PRNGKey(i), 0.5, s) for i, (k, s) in enumerate(shapes.items())}
        tree = masking.mask_tree(params, masks)
        is_none = lambda x: x is None
        assert jax.tree.structure(tree, is_leaf=is_none) == jax.tree.structure(params)
        for layer in params:
            np.testing.assert_array_equal(tree[layer]["kernel"], masks[f"{layer}/kernel"])
            assert tree[layer]["kernel"].dtype == bool
            if structured:
                np.testing.assert_array_equal(tree[layer]["bias"], np.asarray(masks[f"{layer}/kernel"]).ravel())
            else:
                assert tree[layer]["bias"] is None


def test_sparsity_report_counts_zeros():
    params = {"a": {"kernel": jnp.ones((4, 5)), "bias": jnp.ones(5)}, "b": {"kernel": jnp.ones((5, 2))}}
    m_a = np.zeros((4, 5), bool)
    m_a[:, :2] = True  # 8 of 20 kept
    m_b = np.ones((5, 2), bool)
    m_b[0, 0] = False  # 9 of 10 kept
    r = masking.sparsity_report(params, {"a/kernel": m_a, "b/kernel": m_b})
    assert r["gated_weights"] == 30
    assert r["layers"] == pytest.approx({"a/kernel": 12 / 20, "b/kernel": 1 / 10})
    assert r["sparsity"] == pytest.approx(13 / 30)
    # Structured: a closed unit removes its kernel column and its bias.
    s_a = np.array([[True, False, True, True, False]])
    r = masking.sparsity_report(params, {"a/kernel": s_a})
    assert r["gated_weights"] == 25
    assert r["layers"] == pytest.approx({"a/kernel": 8 / 20, "a/bias": 2 / 5})
    assert r["sparsity"] == pytest.approx(10 / 25)


class UsersNet(nn.Module):
    """A model the library has never heard of: custom names, a nested block, a bias-free conv."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.relu(nn.Conv(6, (3, 3), use_bias=False, name="stem")(x))
        x = nn.avg_pool(x, (2, 2), strides=(2, 2)).reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(16, name="hidden")(x))
        return nn.Dense(3, name="classifier")(x)


@pytest.mark.parametrize("method", [CRBG(num_steps=20, sparsity=0.5, learning_rate=0.05),
                                    EdgePopup(num_steps=20, sparsity=0.5)])
def test_a_users_linen_model_is_ticketed_end_to_end(method):
    model = UsersNet()
    x = jax.random.normal(jax.random.PRNGKey(0), (64, 8, 8, 2))
    y = jnp.argmax(x.reshape(64, -1)[:, :3], -1)  # learnable: which of three pixels is largest
    frozen = model.init(jax.random.PRNGKey(1), x[:1])["params"]
    frozen_copy = jax.tree.map(np.array, frozen)
    shapes = masking.gate_shapes(frozen)
    assert sorted(shapes) == ["classifier/kernel", "hidden/kernel", "stem/kernel"]

    gates = method.init(jax.random.PRNGKey(2), shapes)
    initial_binary = jax.device_get(method.binary_masks(gates))
    optimizer = method.optimizer()
    state = {"step": jnp.int32(0), "gates": gates, "opt_state": optimizer.init(gates),
             "method_state": method.init_state(), "model_state": {}, "finite": jnp.bool_(True),
             "rng": jax.random.PRNGKey(3)}
    step = make_train_step(model, method, optimizer)
    losses = []
    for _ in range(20):
        state, metrics = step(state, frozen, x, y)
        losses.append(float(metrics["cross_entropy"]))
    assert bool(state["finite"]) and int(state["step"]) == 20
    assert np.mean(losses[-5:]) < np.mean(losses[:5])
    jax.tree.map(np.testing.assert_array_equal, frozen, frozen_copy)  # weights untouched

    binary = jax.device_get(method.binary_masks(state["gates"]))
    assert any(not np.array_equal(binary[k], initial_binary[k]) for k in binary)  # the ticket moved
    ticket = masking.apply_masks(frozen, binary)
    for name, w in masking.named_leaves(frozen).items():
        t = np.asarray(masking.named_leaves(ticket)[name])
        expected = np.where(binary[name], w, 0) if name in binary else np.asarray(w)
        np.testing.assert_array_equal(t, expected)
    assert model.apply({"params": ticket}, x).shape == (64, 3)


def test_weights_per_gate_counts_what_one_gate_removes():
    params = {"Dense_0": {"kernel": np.zeros((784, 300)), "bias": np.zeros(300)}, "Dense_1": {"kernel": np.zeros((300, 10))}}
    assert masking.weights_per_gate(params, masking.gate_shapes(params)) == {"Dense_0/kernel": 1.0, "Dense_1/kernel": 1.0}
    structured = masking.weights_per_gate(params, masking.gate_shapes(params, structured=True))
    assert structured == {"Dense_0/kernel": 785.0, "Dense_1/kernel": 300.0}  # fan-in, plus the unit's bias
