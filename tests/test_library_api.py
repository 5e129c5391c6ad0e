"""The library used as a library: ``gated`` on a user's own Linen module, ``gates_only`` /
``stop_frozen`` for any Optax optimiser, and ``make_train_step`` with a user's model and optimiser.
Frozen weights never move and cost nothing to differentiate."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import slt_jax
from slt_jax import gates as gates_lib
from slt_jax import masking

CRBG = slt_jax.CRBG(num_steps=10, sparsity=0.5)
EDGEPOPUP = slt_jax.EdgePopup(num_steps=10)


class UsersCNN(nn.Module):
    """A user's own model: conv and dense with biases, a LayerNorm; it knows nothing of gates."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(4, (3, 3))(x)).reshape(x.shape[0], -1)
        x = nn.LayerNorm()(x)
        x = nn.relu(nn.Dense(16)(x))
        return nn.Dense(3)(x)


class UsersBNNet(nn.Module):
    """A user's own model with a BatchNorm: its batch_stats are model state, updated in training."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Dense(24)(x.reshape(x.shape[0], -1))
        x = nn.BatchNorm(use_running_average=not train, momentum=0.5)(x)
        return nn.Dense(3)(nn.relu(x))


def _data(n=32, seed=0):
    x = jax.random.normal(jax.random.PRNGKey(seed), (n, 6, 6, 1))
    y = jnp.argmax(x.reshape(n, -1)[:, :3], -1)  # learnable: which of three pixels is largest
    return x, y


def _bits(tree):
    """Host copies of every leaf, compared bit for bit later."""
    return [np.array(leaf).reshape(-1).view(np.uint8) for leaf in jax.tree.leaves(tree)]


def _assert_bit_identical(tree, copies):
    leaves = jax.tree.leaves(tree)
    assert len(leaves) == len(copies)
    for leaf, copy in zip(leaves, copies):
        np.testing.assert_array_equal(np.asarray(leaf).reshape(-1).view(np.uint8), copy)


@functools.lru_cache(maxsize=None)
def _init(method, policy=masking.DEFAULT_POLICY, structured=False, batch_norm=False):
    """``gated(model, method, seed=0).init(key(1), x[:1])``, once per setting (tests never mutate it)."""
    model = slt_jax.gated(UsersBNNet() if batch_norm else UsersCNN(), method, policy=policy, structured=structured,
                          seed=0)
    return model, jax.jit(model.init)(jax.random.key(1), _data(1)[0])


def _ce(logits, y):
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def test_every_public_name_resolves():
    for name in slt_jax.__all__:
        assert getattr(slt_jax, name) is not None, name


def test_gated_is_a_linen_module_whose_frozen_weights_are_its_seeds():
    method = CRBG
    x, _ = _data()
    model = slt_jax.gated(UsersCNN(), method, policy=r"(kernel|bias)$", seed=0)
    assert isinstance(model, nn.Module)
    variables = jax.jit(model.init)(jax.random.key(1), x[:1])
    assert set(variables) == {"frozen", "gates"}
    # The weights are exactly the seed's (what load_ticket regenerates), whatever key init is given.
    plain = jax.jit(UsersCNN().init)(slt_jax.weights_key(0), x[:1])["params"]
    jax.tree.map(np.testing.assert_array_equal, variables["frozen"], plain)
    other = jax.jit(model.init)(jax.random.key(2), x[:1])
    jax.tree.map(np.testing.assert_array_equal, other["frozen"], plain)
    assert not np.array_equal(other["gates"]["Dense_0"]["kernel"], variables["gates"]["Dense_0"]["kernel"])
    shapes = masking.gate_shapes(plain, r"(kernel|bias)$")
    assert jax.tree.map(jnp.shape, variables["gates"]) == jax.tree.map(lambda s: s.shape, shapes)
    assert variables["gates"]["LayerNorm_0"]["scale"] is None  # the policy matches no "scale"
    assert variables["gates"]["Dense_0"]["bias"].shape == (16,)
    # Without a seed: Linen's "params" stream, as any submodule's weights.
    unseeded = jax.jit(slt_jax.gated(UsersCNN(), method).init)(jax.random.key(1), x[:1])
    assert not np.array_equal(unseeded["frozen"]["Dense_0"]["kernel"], plain["Dense_0"]["kernel"])


@pytest.mark.parametrize("structured", [False, True])
def test_gates_only_adam_moves_the_gates_and_never_the_frozen_weights(structured):
    method = CRBG
    model, variables = _init(method, structured=structured)
    x, y = _data()
    frozen_bits, gates_before = _bits(variables["frozen"]), jax.tree.map(np.array, variables["gates"])
    tx = slt_jax.gates_only(optax.adam(0.05))
    opt_state = tx.init(variables)

    # The optimiser state holds Adam's two moments for each gate leaf and nothing of a frozen weight.
    state_shapes = sorted(tuple(leaf.shape) for leaf in jax.tree.leaves(opt_state) if np.ndim(leaf) > 0)
    gate_shapes = [tuple(g.shape) for g in jax.tree.leaves(variables["gates"])]
    assert state_shapes == sorted(gate_shapes * 2)
    assert sum(int(np.size(leaf)) for leaf in jax.tree.leaves(opt_state) if np.ndim(leaf) > 0) == \
        2 * gates_lib.gate_count(variables["gates"])
    frozen_shapes = {tuple(np.shape(w)) for w in jax.tree.leaves(variables["frozen"])}
    if structured:  # unit gates: no array in the optimiser state has a weight's shape at all
        assert not frozen_shapes & set(state_shapes)

    @jax.jit
    def train_step(variables, opt_state, lam_state, step, key):
        def loss_fn(v):
            logits = model.apply(v, x, deterministic=False, rngs={"gates": key}, step=step)
            penalty, aux = method.penalty(v["gates"], lam_state, step)
            return _ce(logits, y) + penalty, aux

        grads, aux = jax.grad(loss_fn, has_aux=True)(variables)
        updates, opt_state = tx.update(grads, opt_state, variables)
        return optax.apply_updates(variables, updates), opt_state, method.update_state(lam_state, aux)

    lam_state = method.init_state()
    for step in range(5):
        variables, opt_state, lam_state = train_step(variables, opt_state, lam_state, step,
                                                     jax.random.fold_in(jax.random.key(1), step))
    _assert_bit_identical(variables["frozen"], frozen_bits)
    for before, after in zip(jax.tree.leaves(gates_before), jax.tree.leaves(variables["gates"])):
        assert not np.array_equal(before, np.asarray(after))
    assert variables["gates"]["Dense_0"]["bias"] is None


def test_a_plain_optax_optimiser_would_move_the_frozen_weights():
    # Why gates_only exists: the same gradient through optax.adam alone moves "frozen" unless the
    # gradient is stopped, while gates_only leaves it untouched however large the gradient.
    _, variables = _init(CRBG)
    fake_grads = jax.tree.map(jnp.ones_like, variables)  # a gradient everywhere, frozen included
    for tx, moves in ((optax.adam(0.1), True), (slt_jax.gates_only(optax.adam(0.1)), False)):
        updates, _ = tx.update(fake_grads, tx.init(variables), variables)
        moved = any(bool(jnp.any(u != 0)) for u in jax.tree.leaves(updates["frozen"]))
        assert moved == moves
        assert all(bool(jnp.all(u != 0)) for u in jax.tree.leaves(updates["gates"]))


def _flops(compiled):
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older jax: one dict per computation
        cost = cost[0]
    return float(cost["flops"])


@pytest.mark.parametrize("method", [CRBG, EDGEPOPUP], ids=["crbg", "edgepopup"])
def test_grad_over_all_variables_stops_at_frozen_and_costs_what_gates_only_cost(method):
    module = UsersCNN()
    model, variables = _init(method)
    x, y = _data(16)
    key = jax.random.key(1)

    def loss(v, k):
        return _ce(model.apply(v, x, deterministic=False, rngs={"gates": k}, step=3), y)

    def grad_all(v, k):
        return jax.grad(loss)(v, k)

    def grad_gates(gates, frozen, k):
        return jax.grad(lambda g: loss({"frozen": frozen, "gates": g}, k))(gates)

    def unstopped_loss(v, k):  # apply_masks on the raw frozen weights: their gradient is computed
        params = masking.apply_masks(v["frozen"], method.train_masks(v["gates"], k, 3))
        return _ce(module.apply({"params": params}, x), y)

    def stopped_grad(v, k):  # stop_frozen by hand on a user's own loss
        return jax.grad(lambda v: unstopped_loss(slt_jax.stop_frozen(v), k))(v)

    compiled = {
        "all": jax.jit(grad_all).lower(variables, key).compile(),
        "gates": jax.jit(grad_gates).lower(variables["gates"], variables["frozen"], key).compile(),
        "stopped": jax.jit(stopped_grad).lower(variables, key).compile(),
        "unstopped": jax.jit(jax.grad(unstopped_loss)).lower(variables, key).compile(),
    }
    grads = compiled["all"](variables, key)
    for g in jax.tree.leaves(grads["frozen"]):
        assert not np.any(np.asarray(g))  # exactly zero, every frozen leaf
    assert any(np.any(np.asarray(g)) for g in jax.tree.leaves(grads["gates"]))
    # The gates' gradient is the one gates-only differentiation gives.
    only = compiled["gates"](variables["gates"], variables["frozen"], key)
    for a, b in zip(jax.tree.leaves(grads["gates"]), jax.tree.leaves(only)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9)
    stopped = compiled["stopped"](variables, key)
    assert not any(np.any(np.asarray(g)) for g in jax.tree.leaves(stopped["frozen"]))
    unstopped = compiled["unstopped"](variables, key)
    assert any(np.any(np.asarray(g)) for g in jax.tree.leaves(unstopped["frozen"]))

    flops = {name: _flops(c) for name, c in compiled.items()}
    assert flops["gates"] > 0
    # No weight gradient is computed: the whole-tree gradient costs what the gates-only one costs.
    for name in ("all", "stopped"):
        assert flops["gates"] >= flops[name] * (1 - 1e-3), flops
    # The measure can tell: without stop_gradient the weight gradient shows up in the flops.
    assert flops["unstopped"] > flops["gates"] * (1 + 1e-3), flops


def test_gated_apply_refuses_to_mutate_frozen_or_gates():
    model, variables = _init(CRBG, batch_norm=True)
    x, _ = _data(8)
    assert set(variables) == {"frozen", "gates", "batch_stats"}
    for mutable in ("frozen", "gates", ["gates"], ("batch_stats", "frozen"), True):
        with pytest.raises(ValueError, match="mutable"):
            model.apply(variables, x, deterministic=True, train=True, mutable=mutable)
    # Other collections may be mutable: BatchNorm's statistics update.
    logits, updates = model.apply(variables, x, deterministic=True, train=True, mutable=["batch_stats"])
    assert logits.shape == (8, 3) and set(updates) == {"batch_stats"}
    moved = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), updates["batch_stats"], variables["batch_stats"])
    assert any(jax.tree.leaves(moved))


class _StreamKey(nn.Module):
    """The key ``make_rng(name)`` gives a root module's first call: what ``Gated`` samples its gates with."""

    name_: str = "gates"

    @nn.compact
    def __call__(self):
        return self.make_rng(self.name_)


def test_gated_apply_asks_for_sample_or_ticket_in_one_line():
    # Silent case 6: a forgotten gates rng used to apply the binary ticket (gradient 0) without a word.
    model, variables = _init(CRBG)
    x, y = _data(8)
    for kwargs, match in (({}, "deterministic"), ({"deterministic": False}, "rngs"),
                          ({"rngs": {"gates": jax.random.key(0)}}, "deterministic")):
        with pytest.raises(ValueError, match=match) as e:
            model.apply(variables, x, **kwargs)
        assert "\n" not in str(e.value)
    # Inside a loss, the sampled choice has a gradient; the ticket has none.
    grads = jax.grad(lambda g: _ce(model.apply({**variables, "gates": g}, x, deterministic=False,
                                               rngs={"gates": jax.random.key(0)}), y))(variables["gates"])
    assert any(np.any(np.asarray(g)) for g in jax.tree.leaves(grads))
    # The choice may be made once, on the module, as nn.Dropout's.
    ticket = model.clone(deterministic=True).apply(variables, x)
    np.testing.assert_array_equal(ticket, model.apply(variables, x, deterministic=True))


@pytest.mark.parametrize("method", [CRBG, EDGEPOPUP], ids=["crbg", "edgepopup"])
def test_gated_apply_deterministic_is_the_binary_ticket_and_otherwise_a_sample(method):
    module = UsersCNN()
    model, variables = _init(method)
    x, _ = _data(8)
    binary = method.binary_masks(variables["gates"])
    kept = np.mean(np.concatenate([np.ravel(m) for m in jax.tree.leaves(binary)]))
    assert 0.2 < kept < 0.8  # the ticket is not the dense network
    ticket = masking.apply_masks(variables["frozen"], binary)
    apply_module = jax.jit(lambda params: module.apply({"params": params}, x))
    logits = jax.jit(lambda v: model.apply(v, x, deterministic=True))(variables)
    np.testing.assert_array_equal(logits, apply_module(ticket))
    assert not np.allclose(logits, apply_module(variables["frozen"]))
    # deterministic=False with a gates rng: a training sample of the masks, at the given step.
    key = jax.random.key(5)
    derived = _StreamKey().apply({}, rngs={"gates": key})
    sampled = masking.apply_masks(variables["frozen"], method.train_masks(variables["gates"], derived, 7))
    out = jax.jit(lambda v, k: model.apply(v, x, deterministic=False, rngs={"gates": k}, step=7))(variables, key)
    np.testing.assert_allclose(out, apply_module(sampled), rtol=1e-6, atol=1e-6)


class Backbone(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(16)(x.reshape(x.shape[0], -1)))
        return nn.LayerNorm()(x)


class BigModel(nn.Module):
    """A larger model: a gated backbone (frozen weights, gates) and an ordinary trainable head."""

    @nn.compact
    def __call__(self, x, *, deterministic: bool, step=0):
        features = slt_jax.gated(Backbone(), CRBG, seed=3, name="backbone")(x, deterministic=deterministic, step=step)
        return nn.Dense(3, name="head")(features)


def test_a_gated_module_nests_inside_a_larger_model_with_a_trainable_head():
    x, y = _data(16)
    variables = BigModel().init(jax.random.key(0), x[:1], deterministic=True)
    assert set(variables) == {"params", "frozen", "gates"}
    assert set(variables["params"]) == {"head"} and set(variables["frozen"]) == {"backbone"}
    seeds = jax.jit(Backbone().init)(slt_jax.weights_key(3), x[:1])["params"]
    jax.tree.map(np.testing.assert_array_equal, variables["frozen"]["backbone"], seeds)

    def loss(trainable, frozen, key):
        logits = BigModel().apply({**trainable, "frozen": frozen}, x, deterministic=False, rngs={"gates": key})
        return _ce(logits, y)

    trainable = {"params": variables["params"], "gates": variables["gates"]}
    grads = jax.grad(loss)(trainable, variables["frozen"], jax.random.key(1))
    assert all(np.any(np.asarray(g)) for g in jax.tree.leaves(grads["params"]))
    assert any(np.any(np.asarray(g)) for g in jax.tree.leaves(grads["gates"]))


def test_trainable_names_leaves_that_stay_ordinary_params():
    x, y = _data(16)
    model = slt_jax.gated(UsersCNN(), CRBG, seed=0, trainable=r"(Dense_1|LayerNorm_0)/")
    variables = model.init(jax.random.key(1), x[:1])
    assert set(variables) == {"frozen", "gates", "params"}
    assert set(variables["params"]) == {"Dense_1", "LayerNorm_0"}
    assert set(variables["frozen"]) == set(variables["gates"]) == {"Conv_0", "Dense_0"}
    seeds = jax.jit(UsersCNN().init)(slt_jax.weights_key(0), x[:1])["params"]
    np.testing.assert_array_equal(variables["params"]["Dense_1"]["kernel"], seeds["Dense_1"]["kernel"])

    def loss(trainable):
        logits = model.apply({**variables, **trainable}, x, deterministic=False, rngs={"gates": jax.random.key(2)})
        return _ce(logits, y)

    grads = jax.grad(loss)({"params": variables["params"], "gates": variables["gates"]})
    assert all(np.any(np.asarray(g)) for g in jax.tree.leaves(grads["params"]))
    with pytest.raises(ValueError, match="trainable") as e:
        slt_jax.gated(UsersCNN(), CRBG, trainable="Nothing_9/").init(jax.random.key(1), x[:1])
    assert "\n" not in str(e.value)


class UsersDropoutNet(nn.Module):
    """A user's model with Dropout, Linen's convention: ``deterministic`` at call time."""

    @nn.compact
    def __call__(self, x, deterministic: bool):
        x = nn.relu(nn.Dense(32)(x.reshape(x.shape[0], -1)))
        x = nn.Dropout(0.5)(x, deterministic=deterministic)
        return nn.Dense(3)(x)


def test_gated_passes_deterministic_and_the_dropout_rng_to_the_module():
    x, _ = _data(8)
    model = slt_jax.gated(UsersDropoutNet(), EDGEPOPUP, seed=0)  # edge-popup's sample is its ticket
    variables = model.init(jax.random.key(1), x[:1], deterministic=True)
    ticket = model.apply(variables, x, deterministic=True)
    sample = lambda k: model.apply(variables, x, deterministic=False,  # noqa: E731
                                   rngs={"gates": jax.random.key(0), "dropout": k})
    assert not np.allclose(sample(jax.random.key(1)), ticket)  # dropout ran
    assert not np.allclose(sample(jax.random.key(1)), sample(jax.random.key(2)))


@pytest.mark.parametrize("method", [CRBG, EDGEPOPUP], ids=["crbg", "edgepopup"])
def test_make_train_step_with_a_users_model_batchnorm_and_optimiser(method):
    model = UsersBNNet()
    x, y = _data(32)
    variables = model.init(jax.random.PRNGKey(0), x[:1], train=False)
    frozen, model_state = variables["params"], {"batch_stats": variables["batch_stats"]}
    frozen_bits = _bits(frozen)
    gates = method.init(jax.random.PRNGKey(1), masking.gate_shapes(frozen, r"(kernel|bias)$"))
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(0.05, weight_decay=1e-4))  # the user's own
    state0 = slt_jax.TrainState.create(method, tx, gates, jax.random.PRNGKey(2), model_state)
    state0_bits = _bits(state0)
    step = slt_jax.make_train_step(model.apply, method, tx, apply_kwargs={"train": True}, donate=False)

    state1, metrics = step(state0, frozen, x, y)
    assert int(state1.step) == 1 and bool(state1.finite)
    assert np.isfinite(float(metrics["loss"])) and "cross_entropy" in metrics and "train_accuracy" in metrics
    # donate=False: the input state is still there, unchanged, and gives the same step again.
    assert not any(leaf.is_deleted() for leaf in jax.tree.leaves(state0))
    _assert_bit_identical(state0, state0_bits)
    again, _ = step(state0, frozen, x, y)
    _assert_bit_identical(again, _bits(state1))

    state = state1
    for _ in range(4):
        state, metrics = step(state, frozen, x, y)
    assert int(state.step) == 5 and int(state0.step) == 0
    _assert_bit_identical(frozen, frozen_bits)  # the frozen weights are an input, never moved
    assert not any(leaf.is_deleted() for leaf in jax.tree.leaves(frozen))
    # The gates trained; the model state is BatchNorm's, updated in training mode.
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(gates), jax.tree.leaves(state.gates)))
    assert state.gates["BatchNorm_0"]["scale"] is None  # ungated leaves stay None through the optimiser
    mean0 = np.asarray(model_state["batch_stats"]["BatchNorm_0"]["mean"])
    assert not np.allclose(np.asarray(state.model_state["batch_stats"]["BatchNorm_0"]["mean"]), mean0)
    assert jax.tree.structure(state.model_state) == jax.tree.structure(model_state)

    # The control: a donating step does invalidate its input state (so the check above can fail).
    donating = slt_jax.make_train_step(model.apply, method, tx, apply_kwargs={"train": True}, donate=True)
    fresh = jax.tree.map(jnp.array, state0)
    donating(fresh, frozen, x, y)
    assert any(leaf.is_deleted() for leaf in jax.tree.leaves(fresh))


def test_gates_only_leaves_a_negative_zero_frozen_weight_bit_identical():
    # optax.apply_updates adds the update: w + 0.0 would turn -0.0 (a pruned pretrained weight) into +0.0.
    variables = {"frozen": {"w": jnp.array([-0.0, 1.0, -2.5])}, "gates": {"w": jnp.ones(3)}}
    tx = slt_jax.gates_only(optax.adam(0.1))
    updates, _ = tx.update(jax.tree.map(jnp.ones_like, variables), tx.init(variables), variables)
    new = optax.apply_updates(variables, updates)
    np.testing.assert_array_equal(np.asarray(new["frozen"]["w"]).view(np.uint32),
                                  np.asarray(variables["frozen"]["w"]).view(np.uint32))
    assert not np.array_equal(np.asarray(new["gates"]["w"]), np.ones(3))


def test_make_train_step_takes_the_gated_module_frozen_an_input_never_an_output():
    x, y = _data(32)
    model = slt_jax.gated(UsersDropoutNet(), CRBG, seed=0)
    variables = model.init(jax.random.key(1), x[:1], deterministic=True)
    frozen, gates = variables["frozen"], variables["gates"]
    frozen_bits = _bits(frozen)
    tx = slt_jax.with_penalty(CRBG, optax.adam(0.05))
    state = slt_jax.TrainState.create(CRBG, tx, gates, jax.random.PRNGKey(2))
    step = slt_jax.make_train_step(model, CRBG, tx)
    # Frozen is an argument of the compiled step and no part of its result.
    out_shapes = jax.eval_shape(step, state, frozen, x, y)
    out_bytes = sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(out_shapes))
    state_bytes = sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(state))
    frozen_bytes = sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(frozen))
    assert out_bytes < state_bytes + frozen_bytes / 2
    for _ in range(5):
        state, metrics = step(state, frozen, x, y)
    _assert_bit_identical(frozen, frozen_bits)
    assert not any(leaf.is_deleted() for leaf in jax.tree.leaves(frozen))  # never donated
    assert int(state.step) == 5 and "binary_density" in metrics and "lambda" in metrics
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(gates), jax.tree.leaves(state.gates)))
    assert int(slt_jax.penalty_optax.penalty_state(state.opt_state).step) == 5
    assert state.method_state == {}  # the multiplier lives in the optimiser state, once


def test_make_train_step_passes_a_dropout_rng_to_apply_fn():
    x, y = _data(32)
    module = UsersDropoutNet()
    frozen = module.init(jax.random.PRNGKey(0), x[:1], deterministic=True)["params"]
    gates = EDGEPOPUP.init(jax.random.PRNGKey(1), masking.gate_shapes(frozen))
    tx = EDGEPOPUP.optimizer()
    state = slt_jax.TrainState.create(EDGEPOPUP, tx, gates, jax.random.PRNGKey(2))
    step = slt_jax.make_train_step(module.apply, EDGEPOPUP, tx, apply_kwargs={"deterministic": False})
    state, metrics = step(state, frozen, x, y)
    assert int(state.step) == 1 and np.isfinite(float(metrics["loss"]))


def test_the_step_gives_the_same_gates_in_the_optax_and_the_explicit_form():
    x, y = _data(32)
    module = UsersCNN()
    frozen = jax.jit(module.init)(jax.random.PRNGKey(0), x[:1])["params"]
    method = slt_jax.CRBG(num_steps=10, sparsity=0.5, lam=0.2)
    gates = method.init(jax.random.PRNGKey(1), masking.gate_shapes(frozen))
    explicit = slt_jax.TrainState.create(method, optax.adam(0.05), gates, jax.random.PRNGKey(2))
    explicit_step = slt_jax.make_train_step(module.apply, method, optax.adam(0.05))
    tx = slt_jax.with_penalty(method, optax.adam(0.05))
    inside = slt_jax.TrainState.create(method, tx, jax.tree.map(jnp.array, gates), jax.random.PRNGKey(2))
    inside_step = slt_jax.make_train_step(module.apply, method, tx)
    for _ in range(4):
        explicit, m1 = explicit_step(explicit, frozen, x, y)
        inside, m2 = inside_step(inside, frozen, x, y)
    jax.tree.map(np.testing.assert_array_equal, explicit.gates, inside.gates)
    np.testing.assert_array_equal(m1["lambda"], m2["lambda"])
    np.testing.assert_array_equal(m1["cross_entropy"], m2["cross_entropy"])


def test_a_state_made_for_another_method_is_named_in_one_line():
    # Was: KeyError 'lambda' from deep inside the traced step.
    x, y = _data(8)
    module = UsersCNN()
    frozen = jax.jit(module.init)(jax.random.PRNGKey(0), x[:1])["params"]
    gates = EDGEPOPUP.init(jax.random.PRNGKey(1), masking.gate_shapes(frozen))
    state = slt_jax.TrainState.create(EDGEPOPUP, EDGEPOPUP.optimizer(), gates, jax.random.PRNGKey(2))
    step = slt_jax.make_train_step(module.apply, CRBG, CRBG.optimizer())
    with pytest.raises(ValueError, match="crbg") as e:
        step(state, frozen, x, y)
    assert "\n" not in str(e.value)
    gated_model = slt_jax.gated(module, EDGEPOPUP, seed=0)
    with pytest.raises(ValueError, match="method") as e:
        slt_jax.make_train_step(gated_model, CRBG, CRBG.optimizer())
    assert "\n" not in str(e.value)


def test_the_public_api_has_the_sharding_helpers_the_sparsity_report_and_iterands_redraw():
    for name in ("make_mesh", "shard_batch", "replicate", "sparsity_report", "IteRand", "params_by_generation"):
        assert name in slt_jax.__all__, name
    # IteRand's re-draw in a loop of one's own, from public names only.
    x, _ = _data(8)
    method = slt_jax.IteRand(num_steps=10, redraw_every=2, redraw_fraction=1.0, sparsity=0.5)
    draw = slt_jax.params_by_generation(UsersCNN(), (6, 6, 1), seed=0)
    params = draw(0)
    gates = method.init(jax.random.key(1), slt_jax.gate_shapes(params))
    state = method.init_state(gates)
    assert method.is_redraw_step(2)
    state, redrawn = method.redraw(jax.random.key(2), gates, state, params, draw(1), 1)
    pruned = ~method.binary_masks(gates)["Dense_0"]["kernel"]
    new, old = np.asarray(redrawn["Dense_0"]["kernel"]), np.asarray(params["Dense_0"]["kernel"])
    assert np.all(new[pruned] != old[pruned]) and np.array_equal(new[~pruned], old[~pruned])
    assert np.all(np.asarray(state["generation"]["Dense_0"]["kernel"])[pruned] == 1)
    mesh = slt_jax.make_mesh(1)
    xs, = slt_jax.shard_batch((np.asarray(x),), mesh)
    assert xs.shape == x.shape and slt_jax.replicate(gates, mesh) is not None
    report = slt_jax.sparsity_report(params, method.binary_masks(gates))
    assert 0.4 < report["sparsity"] < 0.6


class _Shared(nn.Module):
    @nn.compact
    def __call__(self, x):
        g = slt_jax.gated(Backbone(), CRBG, seed=1, name="shared")
        return g(x, deterministic=True) + g(x, deterministic=True)  # one gated module, called twice


class _NoParams(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.relu(x)


def test_a_gated_module_called_twice_is_initialised_once_and_one_without_params_is_refused():
    x, _ = _data(4)
    variables = _Shared().init(jax.random.key(0), x)
    assert set(variables["frozen"]) == {"shared"}
    assert _Shared().apply(variables, x).shape == (4, 16)
    with pytest.raises(ValueError, match="no parameters") as e:
        slt_jax.gated(_NoParams(), CRBG).init(jax.random.key(0), x)
    assert "\n" not in str(e.value)
