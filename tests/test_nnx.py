"""slt_jax.nnx_gating: NNX models ticketed like Linen ones (frozen weights, Gate-only updates)."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import slt_jax
from slt_jax import masking
from slt_jax.nnx_gating import Gate, GatedModel

X = np.random.default_rng(0).normal(size=(16, 4)).astype(np.float32)
Y = np.arange(16) % 3


class MLP(nnx.Module):
    """Linear (non-zero biases) + BatchNorm + Linear: weights, biases and non-Param state."""

    def __init__(self, rngs: nnx.Rngs):
        self.l1 = nnx.Linear(4, 6, bias_init=nnx.initializers.normal(1.0), rngs=rngs)
        self.bn = nnx.BatchNorm(6, rngs=rngs)
        self.l2 = nnx.Linear(6, 3, bias_init=nnx.initializers.normal(1.0), rngs=rngs)

    def __call__(self, x):
        return self.l2(nnx.relu(self.bn(self.l1(x))))


class Probe(nnx.Module):
    """Returns the weights its Linear sees, so a test reads what the model computed with."""

    def __init__(self, rngs: nnx.Rngs):
        self.lin = nnx.Linear(4, 6, bias_init=nnx.initializers.normal(1.0), rngs=rngs)

    def __call__(self, x):
        return {"kernel": self.lin.kernel[...], "bias": self.lin.bias[...], "y": self.lin(x)}


def _train(gated, method, steps):
    optimizer = nnx.Optimizer(gated, optax.adam(0.05), wrt=Gate)
    state = method.init_state()

    @nnx.jit
    def step_fn(gated, optimizer, state, step, key):
        def loss_fn(gated):
            logits = gated(X, key=key, step=step)
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, Y).mean()
            penalty, aux = method.penalty(gated.gate_tree(), state, step)
            return ce + penalty, aux

        grads, aux = nnx.grad(loss_fn, argnums=nnx.DiffState(0, Gate), has_aux=True)(gated)
        optimizer.update(gated, grads)
        return method.update_state(state, aux)

    for t in range(steps):
        state = step_fn(gated, optimizer, state, t, jax.random.key(t))
    return optimizer, state


def test_training_updates_only_the_gates_and_keeps_weights_bit_identical():
    method = slt_jax.CRBG(num_steps=3, sparsity=0.9)
    gated = GatedModel(MLP(nnx.Rngs(0)), method, rngs=nnx.Rngs(1), structured=True)
    frozen0 = jax.tree.map(np.array, gated.frozen())
    gates0 = jax.tree.map(np.array, gated.gate_tree())
    stats0 = np.array(gated.model.bn.mean[...])

    optimizer, state = _train(gated, method, steps=3)

    for name, w in masking.named_leaves(gated.frozen()).items():
        w0 = masking.named_leaves(frozen0)[name]
        assert np.array_equal(np.asarray(w).view(np.uint32), w0.view(np.uint32)), name
    for name, g in masking.named_leaves(gated.gate_tree()).items():
        assert not np.array_equal(np.asarray(g), masking.named_leaves(gates0)[name]), name
    assert float(state["lambda"]) > 0.0  # the penalty's multiplier update ran
    # The optimiser holds moments for the gates alone, not for the frozen weights.
    moments = masking.named_leaves(nnx.to_pure_dict(nnx.state(optimizer, nnx.OptVariable)))
    assert moments and all(name.split("/")[3] == "gates" for name in moments), sorted(moments)
    # BatchNorm's statistics are the model's own, updated in place through the gated call.
    assert not np.array_equal(np.asarray(gated.model.bn.mean[...]), stats0)


def test_frozen_weights_get_zero_gradient_even_when_asked_for():
    gated = GatedModel(MLP(nnx.Rngs(0)), slt_jax.CRBG(num_steps=1), rngs=nnx.Rngs(1))
    # nnx.grad's default: every nnx.Param, i.e. the model's frozen weights, not the gates.
    grads = nnx.grad(lambda g: jnp.sum(g(X, key=jax.random.key(0)) ** 2))(gated)
    leaves = jax.tree.leaves(grads)
    assert leaves and all(not np.any(np.asarray(g)) for g in leaves)


def test_structured_gate_closes_kernel_column_and_bias_as_linen():
    method = slt_jax.CRBG(num_steps=1)
    gated = GatedModel(Probe(nnx.Rngs(0)), method, rngs=nnx.Rngs(1), structured=True)
    frozen = gated.frozen()

    class LinenProbe(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(6, name="lin")(x)

    linen = slt_jax.gated(LinenProbe(), method, structured=True)
    linen_vars = linen.init(jax.random.key(0), X)
    assert jax.tree.map(jnp.shape, linen_vars["gates"]) == jax.tree.map(jnp.shape, gated.gate_tree())

    closed = jnp.ones((1, 6)).at[0, 2].set(0.0)  # mu = 0: unit 2 is off in the binary ticket
    gated.gates["lin"]["kernel"][...] = closed
    out = gated(X)
    kernel, bias = np.asarray(frozen["lin"]["kernel"]), np.asarray(frozen["lin"]["bias"])
    assert bias[2] != 0.0
    np.testing.assert_array_equal(out["kernel"][:, 2], 0.0)
    np.testing.assert_array_equal(out["bias"][2], 0.0)
    np.testing.assert_array_equal(np.delete(out["kernel"], 2, 1), np.delete(kernel, 2, 1))
    np.testing.assert_array_equal(np.delete(out["bias"], 2), np.delete(bias, 2))
    # Linen with the same weights and gates computes the same unit-closed layer.
    linen_out = linen.apply({"frozen": frozen, "gates": {"lin": {"kernel": closed, "bias": None}}}, X,
                            deterministic=True)
    np.testing.assert_allclose(out["y"], linen_out, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(linen_out[:, 2], 0.0)


@pytest.mark.parametrize("structured", [False, True])
def test_gate_shapes_on_nnx_state_match_pure_dict(structured):
    model = nnx.Sequential(nnx.Linear(4, 6, rngs=nnx.Rngs(0)), nnx.relu, nnx.Linear(6, 3, rngs=nnx.Rngs(1)))
    state = nnx.state(model, nnx.Param)
    on_state = masking.named_leaves(masking.gate_shapes(state, r"(kernel|bias)$", structured))
    on_dict = masking.named_leaves(masking.gate_shapes(nnx.to_pure_dict(state), r"(kernel|bias)$", structured))
    names = ["layers/0/bias", "layers/0/kernel", "layers/2/bias", "layers/2/kernel"]
    if structured:  # a bias closes with its unit's gate: none of its own
        names = ["layers/0/kernel", "layers/2/kernel"]
    assert list(on_state) == list(on_dict) == names
    assert [s.shape for s in on_state.values()] == [s.shape for s in on_dict.values()]


def test_binary_ticket_equals_model_on_where_masked_weights():
    method = slt_jax.CRBG(num_steps=1)
    gated = GatedModel(MLP(nnx.Rngs(0)), method, rngs=nnx.Rngs(1), policy=r"(kernel|bias)$")
    gated.eval()  # BatchNorm on its running statistics: the call is a pure function of the weights
    masks = gated.masks()
    kept = np.mean(np.concatenate([np.ravel(m) for m in jax.tree.leaves(masks)]))
    assert 0.2 < kept < 0.8  # a non-trivial ticket

    frozen = gated.frozen()
    by_name = masking.named_leaves(masks)

    def where(path, w):
        name = masking.path_name(path)
        return jnp.where(by_name[name], w, 0.0) if name in by_name else w

    reference = nnx.clone(gated.model)
    params = nnx.state(reference, nnx.Param)
    nnx.replace_by_pure_dict(params, jax.tree_util.tree_map_with_path(where, frozen))
    nnx.update(reference, params)

    ticket_out = gated(X)
    np.testing.assert_array_equal(ticket_out, reference(X))
    assert not np.allclose(ticket_out, gated.model(X))  # the mask matters
    np.testing.assert_array_equal(gated.frozen()["l1"]["kernel"], frozen["l1"]["kernel"])  # weights untouched
