"""Edge-popup's exact top-k and straight-through gradient, its scores' scale (biases too); CRBG's
dual ascent, penalty and anneal; the methods' defaults are the config's; a short run of each
method on digits is well above chance."""
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from slt_jax import gates as gates_lib
from slt_jax import masking
from slt_jax.frozen import init_variables
from slt_jax.methods import create_method, method_hyperparameters
from slt_jax.methods.crbg import CRBG
from slt_jax.methods.edgepopup import EdgePopup, kth_largest_threshold
from slt_jax.models import create_model

# A digits MLP's kernels: the first and the last layer are the smallest and most lopsided.
LAYER_SHAPES = {"Dense_0": (64, 256), "Dense_1": (256, 256), "Dense_2": (256, 10)}
# The gate template (slt_jax.masking.gate_shapes): params-shaped, None at the ungated biases.
SHAPES = {layer: {"kernel": jax.ShapeDtypeStruct(s, jnp.float32), "bias": None} for layer, s in LAYER_SHAPES.items()}
SPARSITIES = [0.1, 0.5, 0.8, 0.93, 0.99]


def _tree(make):
    """A params-shaped gate tree: ``make(i, layer, shape)`` per kernel, None at the biases."""
    return {layer: {"kernel": make(i, layer, s), "bias": None} for i, (layer, s) in enumerate(LAYER_SHAPES.items())}


def _scores(seed=0):
    keys = jax.random.split(jax.random.PRNGKey(seed), len(LAYER_SHAPES))
    return _tree(lambda i, _, s: jax.random.normal(keys[i], s))


def _kernels(tree):
    return {layer: tree[layer]["kernel"] for layer in LAYER_SHAPES}


def _separates(kept_abs, dropped_abs):
    return kept_abs.size == 0 or dropped_abs.size == 0 or kept_abs.min() >= dropped_abs.max()


def _assert_none_biases(tree):
    for layer in LAYER_SHAPES:
        assert tree[layer]["bias"] is None


@pytest.mark.parametrize("sparsity", SPARSITIES)
def test_edgepopup_keeps_exactly_the_requested_fraction_per_layer(sparsity):
    method = EdgePopup(num_steps=1, sparsity=sparsity, scope="layer")
    scores = _scores()
    masks = method.binary_masks(scores)
    soft = method.train_masks(scores, None, 0)
    _assert_none_biases(masks)
    _assert_none_biases(soft)
    for name, s in _kernels(scores).items():
        m, a = np.asarray(masks[name]["kernel"]), np.abs(np.asarray(s))
        assert m.sum() == round((1 - sparsity) * s.size), name
        assert _separates(a[m], a[~m]), name  # the largest |s| are the ones kept
        # The training forward: exactly 0 or 1.
        np.testing.assert_array_equal(soft[name]["kernel"], m.astype(np.float32))


@pytest.mark.parametrize("sparsity", SPARSITIES)
def test_edgepopup_global_scope_keeps_the_fraction_over_all_layers(sparsity):
    method = EdgePopup(num_steps=1, sparsity=sparsity, scope="global")
    # Scale each layer differently so a global threshold keeps different fractions per layer.
    base = _kernels(_scores(1))
    scores = _tree(lambda i, layer, _: base[layer] * (i + 1))
    masks = method.binary_masks(scores)
    _assert_none_biases(masks)
    kernels, kernel_masks = _kernels(scores), _kernels(masks)
    total = sum(s.size for s in kernels.values())
    kept = sum(int(np.sum(m)) for m in kernel_masks.values())
    assert kept == round((1 - sparsity) * total)
    a = np.concatenate([np.abs(np.asarray(s)).ravel() for s in kernels.values()])
    m = np.concatenate([np.asarray(kernel_masks[n]).ravel() for n in kernels])
    assert _separates(a[m], a[~m])
    per_layer = [float(np.mean(kernel_masks[n])) for n in kernels]
    assert max(per_layer) - min(per_layer) > 0.01


def test_kth_largest_threshold_equals_the_sorted_kth_value():
    rng = np.random.default_rng(0)
    arrays = [
        rng.standard_normal(1000),
        rng.standard_normal(777) * 1e-38,  # subnormals
        rng.standard_normal(500) * 1e38,
        np.concatenate([np.zeros(50), -np.ones(20), rng.standard_normal(30) * 1e-3]),  # zeros and ties
        np.array([-3.0]),
    ]
    threshold = jax.jit(kth_largest_threshold)  # k traced: one compile per input shape
    for x in arrays:
        a = np.abs(x.astype(np.float32))
        desc = np.sort(a)[::-1]
        for k in sorted({1, 2, len(a) // 3, len(a) // 2, len(a) - 1, len(a)} & set(range(1, len(a) + 1))):
            t = threshold([jnp.abs(jnp.asarray(x, jnp.float32))], k)  # negative scores via abs
            assert np.float32(t) == desc[k - 1], (len(a), k)
    # Several arrays at once: the k-th largest of their union.
    parts = [np.abs(rng.standard_normal(n).astype(np.float32)) for n in (10, 300, 7)]
    desc = np.sort(np.concatenate(parts))[::-1]
    for k in (1, 5, 100, 317):
        assert np.float32(threshold([jnp.asarray(p) for p in parts], k)) == desc[k - 1]


def test_edgepopup_straight_through_gradient_matches_hand_computation():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((6, 5)).astype(np.float32)
    b = rng.standard_normal(5).astype(np.float32)
    x = rng.standard_normal((4, 6)).astype(np.float32)
    c = rng.standard_normal((4, 5)).astype(np.float32)
    s = rng.standard_normal((6, 5)).astype(np.float32)  # negative scores too: the abs's sign matters
    method = EdgePopup(num_steps=1, sparsity=0.6)

    def loss(scores):
        params = masking.apply_masks({"d": {"kernel": jnp.asarray(w), "bias": jnp.asarray(b)}},
                                     method.train_masks(scores, None, 0))
        return jnp.sum(c * (x @ params["d"]["kernel"] + params["d"]["bias"]))

    grad = jax.grad(loss)({"d": {"kernel": jnp.asarray(s), "bias": None}})
    assert grad["d"]["bias"] is None
    dl_dweff = x.T @ c  # L = sum(c * (x @ w_eff + b)), whatever the mask
    np.testing.assert_allclose(np.asarray(grad["d"]["kernel"]), dl_dweff * w * np.sign(s), rtol=1e-5, atol=1e-6)


def test_edgepopup_scores_start_kaiming_uniform():
    scores = EdgePopup(num_steps=1).init(jax.random.PRNGKey(0), SHAPES)
    _assert_none_biases(scores)
    for name, shape in LAYER_SHAPES.items():
        bound = 1 / math.sqrt(shape[0])
        s = np.asarray(scores[name]["kernel"])
        assert s.shape == shape and np.abs(s).max() <= bound and np.abs(s).max() > 0.95 * bound
    assert not np.array_equal(scores["Dense_0"]["kernel"][:, :10], scores["Dense_2"]["kernel"][:64])


def _with_biases_gated():
    """A digits MLP with biases, and a conv and a norm scale beside it, every leaf gated."""
    spec = {"name": "digits_mlp", "num_classes": 10, "weight_init": "signed_kaiming", "use_bias": True, "width": 1.0}
    params = init_variables(create_model(spec), (8, 8, 1), 0, {"train": False})["params"]
    params = {**params, "Conv_0": {"kernel": np.zeros((3, 3, 3, 16), np.float32), "bias": np.zeros(16, np.float32)},
              "LayerNorm_0": {"scale": np.ones(100, np.float32)}}
    return params, masking.gate_shapes(params, policy=r"(kernel|bias|scale)$")


def test_edgepopup_scores_a_bias_on_its_kernels_scale():
    params, shapes = _with_biases_gated()
    scores = EdgePopup(num_steps=1, scope="global").init(jax.random.PRNGKey(0), shapes)
    fan_in = {"Dense_0": 64, "Dense_1": 256, "Dense_2": 256, "Conv_0": 27}
    for layer, n in fan_in.items():
        bound = 1 / math.sqrt(n)
        for leaf in ("kernel", "bias"):
            s = np.abs(np.asarray(scores[layer][leaf]))
            assert s.shape == np.shape(params[layer][leaf])
            assert s.max() <= bound, (layer, leaf)
            # U(-bound, bound): even the 10 or 16 scores of a small bias spread over most of it.
            assert s.max() > (0.95 if s.size > 100 else 0.5) * bound, (layer, leaf)
    # A 1-D leaf without a kernel beside it (a norm's scale) is scored on its own length.
    s = np.abs(np.asarray(scores["LayerNorm_0"]["scale"]))
    assert 0.9 / 10 < s.max() <= 1 / 10


@pytest.mark.parametrize("sparsity", [0.5, 0.8])
def test_global_edgepopup_does_not_keep_every_bias(sparsity):
    params, shapes = _with_biases_gated()
    method = EdgePopup(num_steps=1, sparsity=sparsity, scope="global")
    masks = method.binary_masks(method.init(jax.random.PRNGKey(0), shapes))
    named = {n: np.asarray(m) for n, m in masking.named_leaves(masks).items()}
    total = sum(m.size for m in named.values())
    assert sum(int(m.sum()) for m in named.values()) == round((1 - sparsity) * total)
    biases = {n: m for n, m in named.items() if n.endswith("bias")}
    assert sorted(biases) == ["Conv_0/bias", "Dense_0/bias", "Dense_1/bias", "Dense_2/bias"]
    # Scored on its kernel's scale a bias is ranked like its kernel's weights: about the same
    # fraction kept, not every one (as a bias scored on U(-1, 1) would be).
    for layer in ("Dense_0", "Dense_1"):
        kernel_kept, bias_kept = named[f"{layer}/kernel"].mean(), biases[f"{layer}/bias"].mean()
        assert bias_kept < 1.0
        assert abs(bias_kept - kernel_kept) < 0.15, (layer, bias_kept, kernel_kept)
    all_biases = np.concatenate([m.ravel() for m in biases.values()])
    assert all_biases.mean() < 1.0 - sparsity + 0.2


def _gates(mu):
    return _tree(lambda i, _, s: jnp.full(s, mu))


# The multiplier alone (no shift, no ramp): what these tests measure is its own arithmetic.
PI_ALONE = {"shift_onto_target": False, "target_ramp": 0.0}


def test_crbg_dual_ascent_raises_lambda_while_too_dense_and_keeps_it_nonnegative():
    method = CRBG(num_steps=100, sparsity=0.9, dual_lr=0.1, dual_kp=0.0, **PI_ALONE)
    penalty, update_state = jax.jit(method.penalty), jax.jit(method.update_state)
    state = method.init_state()
    assert float(state["lambda"]) == 0.0
    dense = _gates(0.9)  # every gate kept: binary density 1, expected density Phi(1.8) = 0.96, both far above 0.1
    lams = []
    for step in range(5):
        _, aux = penalty(dense, state, step)
        assert float(aux["expected_density"]) > 0.1 and float(aux["binary_density"]) == pytest.approx(1.0)
        state = update_state(state, aux)
        lams.append(float(state["lambda"]))
    steps = np.diff([0.0] + lams)
    np.testing.assert_allclose(steps, 0.1 * (1.0 - 0.1), rtol=1e-5)  # dual_lr * (binary density - 0.1)
    sparse = _gates(-3.0)  # every gate closed: density 0 < 0.1, lambda falls, never below 0
    for step in range(50):
        _, aux = penalty(sparse, state, step)
        new = update_state(state, aux)
        assert float(new["lambda"]) <= float(state["lambda"]) and float(new["lambda"]) >= 0.0
        state = new
    assert float(state["lambda"]) == 0.0


def test_crbg_proportional_term_answers_at_once_to_the_violation():
    method = CRBG(num_steps=100, sparsity=0.9, dual_lr=0.05, dual_kp=100.0, **PI_ALONE)
    state = method.init_state()
    _, aux = method.penalty(_gates(0.9), state, 0)
    state = method.update_state(state, aux)
    violation = 1.0 - 0.1
    assert float(state["integral"]) == pytest.approx(0.05 * violation)
    assert float(state["lambda"]) == pytest.approx(0.05 * violation + 100.0 * violation)
    _, aux = method.penalty(_gates(-3.0), state, 1)  # undershoot: lambda drops to 0 at once
    state = method.update_state(state, aux)
    assert float(state["lambda"]) == 0.0 and float(state["integral"]) > 0.0


def test_crbg_fixed_lambda_stays_and_its_penalty_gradient_is_the_closed_form():
    method = CRBG(num_steps=10, sparsity=0.5, lambda_mode="fixed", lam=0.3, temp_start=0.4, temp_end=0.4,
                  decision_weight=0.0)
    state = method.init_state()
    rng = np.random.default_rng(0)
    mu = _tree(lambda i, _, s: jnp.asarray(rng.uniform(-1, 1, s), jnp.float32))
    penalty = jax.jit(method.penalty)
    for step in range(3):
        _, aux = penalty(mu, state, step)
        state = method.update_state(state, aux)
        assert float(state["lambda"]) == pytest.approx(0.3)
    grad = jax.jit(jax.grad(lambda g: method.penalty(g, state, 0)[0]))(mu)
    _assert_none_biases(grad)
    n = gates_lib.gate_count(mu)
    for name, m in _kernels(mu).items():
        m = np.asarray(m, np.float64)
        expected = 0.3 / (0.4 * np.sqrt(2 * np.pi)) * np.exp(-m**2 / (2 * 0.4**2)) / n
        np.testing.assert_allclose(grad[name]["kernel"], expected, rtol=1e-4, atol=1e-12)


def test_crbg_param_shapes_make_densities_count_weights():
    # Two leaves: one gate per weight and unit gates each removing 100 weights.
    tree = {"a": {"kernel": jnp.full((10, 10), 0.9), "bias": None}, "b": {"kernel": jnp.full((1, 10), -0.9)}}
    params = {"a": {"kernel": jax.ShapeDtypeStruct((10, 10), jnp.float32), "bias": jax.ShapeDtypeStruct((10,), jnp.float32)},
              "b": {"kernel": jax.ShapeDtypeStruct((100, 10), jnp.float32)}}
    counted = CRBG(num_steps=10, param_shapes=params)
    _, aux = counted.penalty(tree, counted.init_state(), 0)
    assert float(aux["binary_density"]) == pytest.approx(100 / (100 + 1000))  # weights kept / gated weights
    plain = CRBG(num_steps=10)
    _, aux = plain.penalty(tree, plain.init_state(), 0)
    assert float(aux["binary_density"]) == pytest.approx(100 / 110)  # gates kept / gates


def test_crbg_temperature_anneals_geometrically_between_the_endpoints():
    method = CRBG(num_steps=101, temp_start=0.5, temp_end=0.05)
    temps = np.asarray(jax.vmap(method.temp)(jnp.arange(101)))
    assert temps[0] == pytest.approx(0.5) and temps[-1] == pytest.approx(0.05)
    assert temps[50] == pytest.approx(math.sqrt(0.5 * 0.05))
    assert np.all(np.diff(temps) < 0)
    _, aux = method.penalty(_gates(0.5), method.init_state(), 100)
    assert float(aux["temp"]) == pytest.approx(0.05)


@pytest.mark.parametrize("method", [CRBG(num_steps=10), EdgePopup(num_steps=10)])
def test_train_masks_keep_the_template_structure_under_jit(method):
    gates = method.init(jax.random.PRNGKey(0), SHAPES)
    masks = jax.jit(method.train_masks)(gates, jax.random.key(1), jnp.int32(3))
    binary = jax.jit(method.binary_masks)(gates)
    for tree in (gates, masks, binary):
        _assert_none_biases(tree)
        for layer, shape in LAYER_SHAPES.items():
            assert tree[layer]["kernel"].shape == shape
    assert all(m.dtype == jnp.bool_ for m in jax.tree.leaves(binary))


def _config(method, **overrides):
    c = default.get_config()
    c.method = method
    for k, v in overrides.items():
        c[k] = v
    return c


def test_the_dataclass_defaults_are_the_configs_defaults():
    # One source of truth: configs/default.py reads each method's sub-config from its dataclass.
    c = default.get_config()
    assert c.learning_rate is None and c.lr_schedule is None  # None: the method's own
    for name, cls in (("crbg", CRBG), ("edgepopup", EdgePopup)):
        assert c[name].to_dict() == method_hyperparameters(name)
        fields = {f.name for f in dataclasses.fields(cls) if f.name not in
                  ("num_steps", "sparsity", "learning_rate", "lr_schedule", "warmup_steps", "param_shapes", "name")}
        assert set(c[name].to_dict()) == fields
        made = create_method(_config(name), num_steps=123)
        assert type(made) is cls
        assert made == cls(num_steps=123, sparsity=c.sparsity)  # every other field the dataclass default
        assert made.learning_rate == cls.__dataclass_fields__["learning_rate"].default
        assert made.lr_schedule == cls.__dataclass_fields__["lr_schedule"].default
        assert made.optimizer is not None
    assert CRBG(num_steps=1).learning_rate == 0.05 and CRBG(num_steps=1).lr_schedule == "constant"
    assert EdgePopup(num_steps=1).learning_rate == 0.1 and EdgePopup(num_steps=1).lr_schedule == "cosine"


def test_create_method_passes_the_configs_overrides():
    c = _config("crbg", learning_rate=0.2, lr_schedule="cosine", sparsity=0.7)
    c.crbg.dual_kp = 3.0
    c.crbg.family = "hard_concrete"
    c.crbg.shift_onto_target = False  # the shift needs a gaussian family
    weights = {"Dense_0": {"kernel": jax.ShapeDtypeStruct((3, 2), jnp.float32)}}
    made = create_method(c, num_steps=50, warmup_steps=5, param_shapes=weights)
    assert made == CRBG(num_steps=50, sparsity=0.7, learning_rate=0.2, lr_schedule="cosine", warmup_steps=5,
                        dual_kp=3.0, family="hard_concrete", shift_onto_target=False)
    assert made.param_shapes is weights
    c = _config("edgepopup", sparsity=0.6)
    c.edgepopup.scope = "global"
    assert create_method(c, num_steps=9, param_shapes=weights) == EdgePopup(num_steps=9, sparsity=0.6,
                                                                                   scope="global")


def test_bad_method_settings_name_the_allowed_values(tiny_config):
    tiny_config.method = "edge_popup"
    with pytest.raises(ValueError, match="edge_popup.*crbg, edgepopup"):
        create_method(tiny_config, num_steps=1)
    with pytest.raises(ValueError, match="'row'.*layer, global"):
        EdgePopup(num_steps=1, scope="row")
    with pytest.raises(ValueError, match="'dynamic'.*dual, fixed"):
        CRBG(num_steps=1, lambda_mode="dynamic")


@pytest.mark.parametrize("method", ["crbg", "edgepopup", "supermask"])
def test_a_short_run_of_each_method_is_well_above_chance(method, tiny_config, tmp_path):
    from slt_jax.train import train_and_evaluate

    tiny_config.method = method
    summary = train_and_evaluate(tiny_config, str(tmp_path))
    assert summary["val_accuracy"] > 0.5  # chance is 0.1
    if method == "edgepopup":  # edge-popup's sparsity is exact by construction
        assert summary["sparsity"] == pytest.approx(tiny_config.sparsity, abs=1e-3)


def test_warmup_epochs_ramp_the_learning_rate_linearly(tiny_config, tmp_path):
    import json

    from slt_jax.methods.schedules import learning_rate_schedule
    from slt_jax.train import Run, train_and_evaluate

    schedule = learning_rate_schedule("cosine", 0.1, num_steps=100, warmup_steps=10)
    assert float(schedule(0)) == 0.0 and abs(float(schedule(5)) - 0.05) < 1e-7 and abs(float(schedule(10)) - 0.1) < 1e-7
    tiny_config.warmup_epochs = 1.0
    tiny_config.num_steps = 2
    # digits: about 1,290 training images at batch 64 -> 20 steps per epoch, resolved by the run
    run = Run(tiny_config, str(tmp_path))
    assert run.warmup_steps == 20 and run.method.warmup_steps == 20
    train_and_evaluate(tiny_config, str(tmp_path))
    # The resolved count travels as an argument: the recorded config is the one given.
    assert json.load(open(tmp_path / "config.json"))["warmup_epochs"] == 1.0
    assert "warmup_steps" not in json.load(open(tmp_path / "config.json"))
