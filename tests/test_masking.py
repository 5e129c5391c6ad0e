"""Parameter-level gating: policies, params-shaped gate trees, exact mask application, and a user's own model."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from slt_jax import masking
from slt_jax.frozen import init_variables
from slt_jax.methods.crbg import CRBG
from slt_jax.methods.edgepopup import EdgePopup
from slt_jax.models import create_model
from slt_jax.step import TrainState, make_train_step

IS_NONE = lambda x: x is None  # noqa: E731


def _spec(name, use_bias=False):
    return {"name": name, "num_classes": 10, "weight_init": "signed_kaiming", "use_bias": use_bias, "width": 0.25}


def _params(name, input_shape, use_bias=False):
    return init_variables(create_model(_spec(name, use_bias)), input_shape, 0, {"train": False})["params"]


def _with_random_biases(params, seed=0):
    # Flax initialises biases to 0, which would hide whether a gate reaches them.
    leaves = masking.named_leaves(params)
    keys = iter(jax.random.split(jax.random.PRNGKey(seed), len(leaves)))
    return jax.tree_util.tree_map_with_path(
        lambda p, w: jax.random.normal(next(keys), w.shape) if masking.path_name(p).endswith("bias") else w, params)


def _structure(tree):
    return jax.tree.structure(tree, is_leaf=IS_NONE)


def _full(shapes, value, dtype=None):
    """A gate tree shaped like ``shapes`` (gate_shapes' template), every gate ``value``."""
    return jax.tree.map(lambda s: jnp.full(s.shape, value, dtype or s.dtype), shapes)


@pytest.mark.parametrize("name, input_shape, kernels", [
    ("digits_mlp", (8, 8, 1), ["Dense_0/kernel", "Dense_1/kernel", "Dense_2/kernel"]),
    ("conv2", (8, 8, 3), ["Conv_0/kernel", "Conv_1/kernel", "Dense_0/kernel", "Dense_1/kernel", "Dense_2/kernel"]),
])
def test_default_policy_gates_every_kernel_with_the_right_shapes(name, input_shape, kernels):
    params = _params(name, input_shape, use_bias=True)
    leaves = masking.named_leaves(params)
    unstructured = masking.gate_shapes(params)
    # Shaped like the params: the same tree, None at every ungated leaf (the biases).
    assert _structure(unstructured) == _structure(params)
    named = masking.named_leaves(unstructured)
    assert sorted(named) == sorted(kernels)  # first and last layer included, biases not
    for layer in params:
        assert unstructured[layer]["bias"] is None
    for k in kernels:
        assert isinstance(named[k], jax.ShapeDtypeStruct)
        assert named[k].shape == leaves[k].shape and named[k].dtype == jnp.float32
    structured = masking.named_leaves(masking.gate_shapes(params, structured=True))
    for k in kernels:
        shape = leaves[k].shape
        assert structured[k].shape == (1,) * (len(shape) - 1) + (shape[-1],)


def test_structured_policy_gives_unit_gates_to_matching_leaves_only():
    params = _params("digits_mlp", (8, 8, 1), use_bias=True)
    leaves = masking.named_leaves(params)
    shapes = masking.gate_shapes(params, structured=True, structured_policy=r"^Dense_[01]/")
    assert shapes["Dense_0"]["kernel"].shape == (1, leaves["Dense_0/kernel"].shape[-1])
    assert shapes["Dense_1"]["kernel"].shape == (1, leaves["Dense_1/kernel"].shape[-1])
    assert shapes["Dense_2"]["kernel"].shape == leaves["Dense_2/kernel"].shape
    # The per-weight classifier gates leave its bias alone; the unit gates close their units' biases.
    gated = set(masking.named_leaves(masking.leaf_masks(params, _full(shapes, True, bool))))
    assert gated == {"Dense_0/kernel", "Dense_0/bias", "Dense_1/kernel", "Dense_1/bias", "Dense_2/kernel"}
    assert masking.gate_shapes(params, structured=False, structured_policy=r"^Dense_0/") == masking.gate_shapes(params)
    with pytest.raises(ValueError, match="structured_policy"):
        masking.gate_shapes(params, structured=True, structured_policy="Dense_[0")


def test_input_gates_close_rows_and_leave_the_bias_alone():
    params = _with_random_biases(_params("conv2", (8, 8, 3), use_bias=True))
    leaves = masking.named_leaves(params)
    shapes = masking.gate_shapes(params, structured=True, structured_policy=r"^Dense_1/",
                                 structured_inputs=r"^(Conv_1|Dense_0)/")
    assert shapes["Conv_1"]["kernel"].shape == (1, 1, leaves["Conv_1/kernel"].shape[2], 1)
    assert shapes["Dense_0"]["kernel"].shape == (leaves["Dense_0/kernel"].shape[0], 1)
    assert shapes["Dense_1"]["kernel"].shape == (1, leaves["Dense_1/kernel"].shape[1])  # unit gates elsewhere
    # Closing input feature 0 of Dense_0 zeroes exactly its row; its bias is untouched.
    gates = _full(shapes, True, bool)
    gates["Dense_0"]["kernel"] = gates["Dense_0"]["kernel"].at[0, 0].set(False)
    masked = masking.apply_masks(params, gates)
    kernel = np.asarray(leaves["Dense_0/kernel"])
    np.testing.assert_array_equal(masked["Dense_0"]["kernel"], np.concatenate([0 * kernel[:1], kernel[1:]]))
    np.testing.assert_array_equal(masked["Dense_0"]["bias"], leaves["Dense_0/bias"])
    per_gate = masking.named_leaves(masking.weights_per_gate(params, shapes))
    assert per_gate["Dense_0/kernel"] == kernel.shape[1]  # one row
    assert per_gate["Conv_1/kernel"] == 9 * leaves["Conv_1/kernel"].shape[-1]  # one input channel's taps
    with pytest.raises(ValueError, match="structured=False"):
        masking.gate_shapes(params, structured_inputs=r"^Dense_0/")
    with pytest.raises(ValueError, match="matches no gated parameter"):
        masking.gate_shapes(params, structured=True, structured_inputs=r"^Dense_9/")


def test_an_input_gate_closes_the_unit_it_reads_whole_and_the_count_follows():
    params = _with_random_biases(_params("digits_mlp", (8, 8, 1), use_bias=True))
    leaves = masking.named_leaves(params)
    shapes = masking.gate_shapes(params, structured=True, structured_inputs=r"^Dense_[01]/kernel$",
                                 structured_policy=r"^Dense_0/")  # Dense_2 keeps one gate per weight
    gates = _full(shapes, True, bool)
    gates["Dense_1"]["kernel"] = gates["Dense_1"]["kernel"].at[3, 0].set(False)  # unit 3 of Dense_0
    masked = masking.apply_masks(params, gates)
    assert not np.any(masked["Dense_1"]["kernel"][3]) and np.all(masked["Dense_1"]["kernel"][4] == leaves["Dense_1/kernel"][4])
    assert not np.any(masked["Dense_0"]["kernel"][:, 3]) and masked["Dense_0"]["bias"][3] == 0
    np.testing.assert_array_equal(np.delete(masked["Dense_0"]["bias"], 3), np.delete(leaves["Dense_0/bias"], 3))
    report = masking.sparsity_report(params, gates)
    closed = leaves["Dense_0/kernel"].shape[0] + 1 + leaves["Dense_1/kernel"].shape[1]  # column, bias, row
    assert round(report["sparsity"] * report["gated_weights"]) == closed
    assert float(masking.kept_fraction(params, gates)) == pytest.approx(1 - report["sparsity"], abs=1e-7)
    # With probabilities the count is the expectation: a weight two gates touch keeps the product.
    probs = jax.tree.map(lambda s: jax.random.uniform(jax.random.PRNGKey(s.size), s.shape), shapes)
    p_pixel, p_unit = np.asarray(probs["Dense_0"]["kernel"])[:, 0], np.asarray(probs["Dense_1"]["kernel"])[:, 0]
    kept = (np.outer(p_pixel, p_unit).sum() + p_unit.sum()  # Dense_0: kernel and bias
            + p_unit.sum() * leaves["Dense_1/kernel"].shape[1] + np.asarray(probs["Dense_2"]["kernel"]).sum())
    total = sum(np.size(leaves[n]) for n in ("Dense_0/kernel", "Dense_0/bias", "Dense_1/kernel", "Dense_2/kernel"))
    assert float(masking.kept_fraction(params, probs)) == pytest.approx(kept / total, rel=1e-5)


def test_policy_selects_leaves_and_rejects_a_policy_matching_nothing():
    params = _params("digits_mlp", (8, 8, 1))
    shapes = masking.gate_shapes(params, policy=r"^Dense_1/")
    assert list(masking.named_leaves(shapes)) == ["Dense_1/kernel"]
    assert shapes["Dense_0"]["kernel"] is None and shapes["Dense_2"]["kernel"] is None
    with pytest.raises(ValueError, match="Dense_9") as err:
        masking.gate_shapes(params, policy=r"Dense_9")
    assert "Dense_0/kernel" in str(err.value)  # names what exists
    with pytest.raises(ValueError, match="gate_policy"):
        masking.gate_shapes(params, policy="kernel[")


def test_bool_mask_is_exactly_where_mask_w_zero():
    w = jnp.asarray(np.random.default_rng(0).standard_normal((40, 30)).astype(np.float32) * np.logspace(-30, 30, 30,
                                                                                                       dtype=np.float32))
    params = {"Dense_0": {"kernel": w}}
    mask = jax.random.bernoulli(jax.random.PRNGKey(1), 0.3, w.shape)
    for apply in (masking.apply_masks, jax.jit(masking.apply_masks)):
        out = np.asarray(apply(params, {"Dense_0": {"kernel": mask}})["Dense_0"]["kernel"])
        expected = np.where(np.asarray(mask), np.asarray(w), np.float32(0))
        np.testing.assert_array_equal(out.view(np.uint32), expected.view(np.uint32))  # bit-identical, +0.0 for dropped


def test_gates_at_one_give_the_plain_model():
    spec = _spec("conv2", use_bias=True)
    model = create_model(spec)
    params = _with_random_biases(_params("conv2", (8, 8, 3), use_bias=True))
    x = jax.random.normal(jax.random.PRNGKey(2), (4, 8, 8, 3))
    plain = model.apply({"params": params}, x)
    for structured in (False, True):
        ones = _full(masking.gate_shapes(params, structured=structured), 1.0)
        gated = model.apply({"params": masking.apply_masks(params, ones)}, x)
        np.testing.assert_array_equal(gated, plain)


def test_structured_gate_closes_the_whole_unit_bias_included():
    spec = _spec("digits_mlp", use_bias=True)
    model = create_model(spec)
    params = _with_random_biases(_params("digits_mlp", (8, 8, 1), use_bias=True))
    shapes = masking.gate_shapes(params, structured=True)
    closed = np.array([0, 5, 17])
    gate = np.ones(shapes["Dense_0"]["kernel"].shape, bool)
    gate[0, closed] = False
    masks = _full(shapes, True, bool)
    masks["Dense_0"]["kernel"] = jnp.asarray(gate)
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
    n = shapes["Dense_0"]["kernel"].shape[-1]
    soft = jnp.linspace(0.0, 1.0, n).reshape(1, n)
    out = masking.apply_masks(params, {"Dense_0": {"kernel": soft, "bias": None}, "Dense_1": None, "Dense_2": None})
    np.testing.assert_array_equal(out["Dense_0"]["bias"], params["Dense_0"]["bias"] * soft[0])
    np.testing.assert_array_equal(out["Dense_0"]["kernel"], params["Dense_0"]["kernel"] * soft)
    for layer in ("Dense_1", "Dense_2"):
        for leaf in ("kernel", "bias"):
            np.testing.assert_array_equal(out[layer][leaf], params[layer][leaf])


def test_unstructured_gate_leaves_biases_alone():
    params = _with_random_biases(_params("digits_mlp", (8, 8, 1), use_bias=True))
    zeros = _full(masking.gate_shapes(params), False, bool)
    out = masking.apply_masks(params, zeros)
    for layer in params:
        np.testing.assert_array_equal(out[layer]["bias"], params[layer]["bias"])
        assert not np.any(out[layer]["kernel"])


def test_leaf_masks_are_params_shaped_with_none_for_ungated_leaves_and_jit_safe():
    params = _params("digits_mlp", (8, 8, 1), use_bias=True)
    for structured in (False, True):
        shapes = masking.gate_shapes(params, structured=structured)
        keys = iter(jax.random.split(jax.random.PRNGKey(0), 8))
        masks = jax.tree.map(lambda s: jax.random.bernoulli(next(keys), 0.5, s.shape), shapes)
        for leaf_masks in (masking.leaf_masks, jax.jit(masking.leaf_masks)):
            tree = leaf_masks(params, masks)
            assert _structure(tree) == _structure(params)  # a leaf (mask or None) per parameter
            for layer in params:
                np.testing.assert_array_equal(tree[layer]["kernel"], masks[layer]["kernel"])
                assert tree[layer]["kernel"].dtype == bool
                if structured:
                    np.testing.assert_array_equal(tree[layer]["bias"], np.asarray(masks[layer]["kernel"]).ravel())
                    # Each mask broadcasts against its leaf.
                    assert np.broadcast_shapes(tree[layer]["bias"].shape, params[layer]["bias"].shape) == \
                        params[layer]["bias"].shape
                else:
                    assert tree[layer]["bias"] is None


def test_sparsity_report_counts_zeros():
    params = {"a": {"kernel": jnp.ones((4, 5)), "bias": jnp.ones(5)}, "b": {"kernel": jnp.ones((5, 2))}}
    m_a = np.zeros((4, 5), bool)
    m_a[:, :2] = True  # 8 of 20 kept
    m_b = np.ones((5, 2), bool)
    m_b[0, 0] = False  # 9 of 10 kept
    r = masking.sparsity_report(params, {"a": {"kernel": m_a, "bias": None}, "b": {"kernel": m_b}})
    assert r["gated_weights"] == 30
    assert r["layers"] == pytest.approx({"a/kernel": 12 / 20, "b/kernel": 1 / 10})
    assert r["sparsity"] == pytest.approx(13 / 30)
    # Structured: a closed unit removes its kernel column and its bias.
    s_a = np.array([[True, False, True, True, False]])
    r = masking.sparsity_report(params, {"a": {"kernel": s_a, "bias": None}, "b": {"kernel": None}})
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
    assert sorted(masking.named_leaves(shapes)) == ["classifier/kernel", "hidden/kernel", "stem/kernel"]

    gates = method.init(jax.random.PRNGKey(2), shapes)
    assert _structure(gates) == _structure(shapes)
    initial_binary = jax.device_get(method.binary_masks(gates))
    optimizer = method.optimizer()
    state = TrainState.create(method, optimizer, gates, jax.random.PRNGKey(3))
    step = make_train_step(model.apply, method, optimizer)
    losses = []
    for _ in range(20):
        state, metrics = step(state, frozen, x, y)
        losses.append(float(metrics["cross_entropy"]))
    assert bool(state.finite) and int(state.step) == 20
    assert np.mean(losses[-5:]) < np.mean(losses[:5])
    jax.tree.map(np.testing.assert_array_equal, frozen, frozen_copy)  # weights untouched

    binary = jax.device_get(method.binary_masks(state.gates))
    named_binary, named_initial = masking.named_leaves(binary), masking.named_leaves(initial_binary)
    assert any(not np.array_equal(named_binary[k], named_initial[k]) for k in named_binary)  # the ticket moved
    ticket = masking.apply_masks(frozen, binary)
    named_ticket = masking.named_leaves(ticket)
    for name, w in masking.named_leaves(frozen).items():
        expected = np.where(named_binary[name], w, 0) if name in named_binary else np.asarray(w)
        np.testing.assert_array_equal(np.asarray(named_ticket[name]), expected)
    assert model.apply({"params": ticket}, x).shape == (64, 3)


def test_weights_per_gate_counts_what_one_gate_removes():
    params = {"Dense_0": {"kernel": np.zeros((784, 300)), "bias": np.zeros(300)}, "Dense_1": {"kernel": np.zeros((300, 10))}}
    unstructured = masking.weights_per_gate(params, masking.gate_shapes(params))
    assert unstructured == {"Dense_0": {"kernel": 1.0, "bias": None}, "Dense_1": {"kernel": 1.0}}
    structured = masking.weights_per_gate(params, masking.gate_shapes(params, structured=True))
    # fan-in, plus the unit's bias (closed with it)
    assert structured == {"Dense_0": {"kernel": 785.0, "bias": None}, "Dense_1": {"kernel": 300.0}}
    # A policy that also matches the bias changes nothing: the bias still closes with its unit.
    both = masking.weights_per_gate(params, masking.gate_shapes(params, policy=r"(kernel|bias)$", structured=True))
    assert both == structured


def test_attention_projections_get_one_gate_per_head():
    params = {"attn": {"query": {"kernel": np.zeros((16, 4, 8)), "bias": np.zeros((4, 8))},
                       "out": {"kernel": np.zeros((4, 8, 16)), "bias": np.zeros(16)}}}
    shapes = masking.gate_shapes(params, structured=True)
    assert shapes["attn"]["query"]["kernel"].shape == (1, 4, 1)
    assert shapes["attn"]["out"]["kernel"].shape == (4, 1, 1)
    masks = masking.leaf_masks(params, _full(shapes, True, bool))
    assert masks["attn"]["query"]["bias"].shape == (4, 1)  # the head's bias closes with its head
    assert masks["attn"]["out"]["bias"] is None  # shared by every head: stays ungated
