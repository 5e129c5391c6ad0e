"""NNX tickets (issue 22): a GatedModel's ticket saves and reloads bit-exact, its weights drawn from
the recorded seed through the user's module factory; weights that are not the seed's are refused at
save, and GatedModel's rngs without a gates stream is one line."""
import os

import jax
import numpy as np
import optax
import pytest
from flax import nnx

import slt_jax
from slt_jax import load_ticket, masking
from slt_jax.methods import Biprop
from slt_jax.nnx_gating import Gate, GatedModel

X = np.random.default_rng(0).normal(size=(32, 4)).astype(np.float32)
Y = np.arange(32) % 3
META = {"seed": 7, "input_shape": [4]}


class MLP(nnx.Module):
    """Linear (non-zero biases) + BatchNorm + Linear: a user's NNX model with running statistics."""

    def __init__(self, rngs: nnx.Rngs, width: int = 16):
        self.l1 = nnx.Linear(4, width, bias_init=nnx.initializers.normal(1.0), rngs=rngs)
        self.bn = nnx.BatchNorm(width, rngs=rngs)
        self.l2 = nnx.Linear(width, 3, bias_init=nnx.initializers.normal(1.0), rngs=rngs)

    def __call__(self, x):
        return self.l2(nnx.relu(self.bn(self.l1(x))))


def _trained(method, seed=7, steps=5):
    gated = GatedModel(MLP(nnx.Rngs(seed)), method, rngs=nnx.Rngs(gates=1))
    optimizer = nnx.Optimizer(gated, optax.adam(0.1), wrt=Gate)
    state = method.init_state()

    @nnx.jit
    def step_fn(gated, optimizer, state, step, key):
        def loss_fn(gated):
            logits = gated(X, key=key, step=step)
            penalty, aux = method.penalty(gated.gate_tree(), state, step)
            return optax.softmax_cross_entropy_with_integer_labels(logits, Y).mean() + penalty, aux

        grads, aux = nnx.grad(loss_fn, argnums=nnx.DiffState(0, Gate), has_aux=True)(gated)
        optimizer.update(gated, grads)
        return method.update_state(state, aux)

    for t in range(steps):
        state = step_fn(gated, optimizer, state, t, jax.random.key(t))
    return gated


@pytest.fixture(scope="module")
def crbg_ticket(tmp_path_factory):
    method = slt_jax.CRBG(num_steps=5, sparsity=0.5)
    gated = _trained(method)
    path = str(tmp_path_factory.mktemp("nnx") / "ticket")
    gated.save_ticket(path, META, model_factory=MLP)
    return gated, method, path


def _bits(tree):
    return {n: np.asarray(v).view(np.uint32) for n, v in masking.named_leaves(tree).items()}


def test_an_nnx_ticket_reloads_bit_exact(crbg_ticket):
    gated, method, path = crbg_ticket
    ticket = load_ticket(path, model_factory=MLP)
    assert ticket.meta["framework"] == "nnx" and ticket.meta["method"] == "crbg"
    frozen = _bits(ticket.frozen_params())
    assert frozen.keys() == _bits(gated.frozen()).keys()
    for name, w in _bits(gated.frozen()).items():
        np.testing.assert_array_equal(frozen[name], w, err_msg=name)
    masks = jax.device_get(gated.masks())
    for name, m in masking.named_leaves(masks).items():
        np.testing.assert_array_equal(masking.named_leaves(ticket.gate_masks)[name], m, err_msg=name)
    want = _bits(jax.device_get(method.masked_params(gated.frozen(), masks)))
    for name, w in _bits(ticket.masked_params()).items():
        np.testing.assert_array_equal(w, want[name], err_msg=name)
    stats = nnx.to_pure_dict(nnx.state(gated.model, nnx.BatchStat))
    assert np.any(np.asarray(stats["bn"]["mean"]) != 0)  # training moved them: the ticket must carry them
    jax.tree.map(np.testing.assert_array_equal, ticket.model_state()["batch_stats"], stats)

    gated.eval()  # the running statistics, as predict uses them
    logits = np.asarray(gated(X))
    gated.train()
    np.testing.assert_array_equal(ticket.predict(X), np.argmax(logits, -1))
    np.testing.assert_allclose(ticket.model.apply({"params": ticket.masked_params(), **ticket.model_state()}, X),
                               logits, rtol=1e-5, atol=1e-6)


def test_an_nnx_ticket_names_the_factory_it_needs(crbg_ticket):
    _, _, path = crbg_ticket
    with pytest.raises(ValueError) as err:
        load_ticket(path)
    assert "\n" not in str(err.value) and "model_factory" in str(err.value)
    with pytest.raises(ValueError) as err:  # was: AttributeError 'init'
        load_ticket(path, model=MLP(nnx.Rngs(7)))
    assert "\n" not in str(err.value) and "model_factory" in str(err.value)


def test_weights_not_drawn_from_the_recorded_seed_are_refused(tmp_path):
    gated = GatedModel(MLP(nnx.Rngs(8)), slt_jax.CRBG(num_steps=5, sparsity=0.5), rngs=nnx.Rngs(gates=1))
    with pytest.raises(ValueError) as err:
        gated.save_ticket(str(tmp_path / "t"), META, model_factory=MLP)  # META records seed 7
    message = str(err.value)
    assert "\n" not in message and "seed" in message and "l1/" in message
    with pytest.raises(ValueError, match="model_factory"):  # another module of the same shapes
        gated.save_ticket(str(tmp_path / "t"), {**META, "seed": 8}, model_factory=lambda rngs: MLP(rngs, width=17))
    assert not os.path.exists(tmp_path / "t")


def test_a_biprop_nnx_ticket_computes_with_binarised_weights(tmp_path):
    method = Biprop(num_steps=3, sparsity=0.5)
    gated = _trained(method, steps=3)
    gated.save_ticket(str(tmp_path / "t"), META, model_factory=MLP)
    ticket = load_ticket(str(tmp_path / "t"), model_factory=MLP)
    assert ticket.meta["weights"] == "binarized"
    want = jax.device_get(method.masked_params(gated.frozen(), gated.masks()))
    jax.tree.map(np.testing.assert_array_equal, ticket.masked_params(), want)


def test_nan_gates_are_refused_at_save(tmp_path):
    gated = GatedModel(MLP(nnx.Rngs(7)), slt_jax.CRBG(num_steps=5, sparsity=0.5), rngs=nnx.Rngs(gates=1))
    gated.gates["l1"]["kernel"][...] = gated.gates["l1"]["kernel"][...].at[0, 0].set(np.nan)
    with pytest.raises(ValueError, match=r"l1/kernel.*NaN"):
        gated.save_ticket(str(tmp_path / "t"), META, model_factory=MLP)
    assert not os.path.exists(tmp_path / "t")


def test_rngs_without_a_gates_stream_is_one_line():
    with pytest.raises(ValueError) as err:
        GatedModel(MLP(nnx.Rngs(0)), slt_jax.CRBG(num_steps=5, sparsity=0.5), rngs=nnx.Rngs(params=1))
    message = str(err.value)
    assert "\n" not in message and "'gates'" in message and "nnx.Rngs(gates=" in message
    a = GatedModel(MLP(nnx.Rngs(0)), slt_jax.CRBG(num_steps=5, sparsity=0.5), rngs=nnx.Rngs(3))  # default stream
    b = GatedModel(MLP(nnx.Rngs(0)), slt_jax.CRBG(num_steps=5, sparsity=0.5), rngs=nnx.Rngs(gates=3))
    jax.tree.map(np.testing.assert_array_equal, a.gate_tree(), b.gate_tree())
