"""The model zoo (ResNets, ViT, Swin-T, the ConvNets' pooling) and the paper's configs.

Every config builds its full-size model, gates and method (abstractly: no compile); one runs end
to end through the CLI at 1/16 width. Every architecture, on tiny shapes, inits, trains a few
steps, evaluates, equals its plain self with every gate open, and leaves its frozen weights
bit-identical; a BatchNorm ticket predicts exactly what the run evaluated.
"""
import importlib
import json
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from slt_jax import cli, load_ticket, masking
from slt_jax.data import load_dataset
from slt_jax.methods import create_method
from slt_jax.models import MODELS, create_model
from slt_jax.models.convnets import max_pool_2x2
from slt_jax.frozen import init_variables
from slt_jax.run_config import model_spec, validate_config
from slt_jax.ticket import ZOO_INIT_KWARGS
from slt_jax.train import Run, train_and_evaluate

CONFIGS = ["cifar10_conv4_edgepopup", "cifar10_conv6_crbg", "cifar10_resnet18_crbg", "cifar10_resnet50_crbg",
           "cifar10_wrn50_crbg", "cifar10_vit_base_crbg", "cifar10_swin_t_crbg", "imagenet_resnet50_crbg",
           "imagenet_wrn50_edgepopup"]
# (model, tiny input shape, width): every block type and stem, at sizes a CPU trains in seconds.
TINY = [("resnet18", (16, 16, 3), 0.125), ("resnet50", (16, 16, 3), 0.0625), ("wrn50_2_imagenet", (32, 32, 3), 0.0625),
        ("vit_tiny", (16, 16, 3), 0.25), ("swin_t", (16, 16, 3), 0.25)]
# Each takes most of a minute to compile on 2 busy cores: the gate-open check of every one is marked slow;
# the ViT's per-head gate tests below stay in the default suite.
SLOW_TO_COMPILE = ("resnet18", "resnet50", "wrn50_2_imagenet", "vit_tiny", "swin_t")


def _shrink(c, shape=None, width=0.0625):
    """A config cut to a few seconds: 2 steps, 1/16 width, 64 synthetic images, one device."""
    c.dataset = "synthetic"
    c.num_epochs = 0
    c.num_steps = 2
    c.batch_size = 8
    c.width = width
    c.synthetic_size = 64
    c.val_fraction = 0.25
    c.eval_batch_size = 64
    c.log_every = c.eval_every = 2
    c.checkpoint_every = 0
    c.num_devices = 1
    c.progress = c.plots = False
    if shape is not None:
        c.synthetic_shape = shape
    return c


def _config(name, **shrink):
    c = importlib.import_module(f"configs.{name}").get_config()
    with c.unlocked():
        return _shrink(c, **shrink)


@pytest.mark.parametrize("name", CONFIGS)
def test_config_builds_its_full_size_model_and_method(name):
    """Each config's model, gates and method at full width and the config's own input size,
    traced abstractly (no compile); the tiny-shape tests below run the real loop."""
    c = importlib.import_module(f"configs.{name}").get_config()
    validate_config(c)
    net = create_model(model_spec(c, c.num_classes))
    variables = jax.eval_shape(lambda: net.init(jax.random.PRNGKey(0), jnp.zeros((1, *c.synthetic_shape)), train=False))
    logits = jax.eval_shape(lambda v: net.apply(v, jnp.zeros((2, *c.synthetic_shape)), train=False), variables)
    assert logits.shape == (2, c.num_classes)
    shapes = masking.gate_shapes(variables["params"], c.gate_policy, c.structured)
    assert set(masking.named_leaves(shapes)) == {k for k in masking.named_leaves(variables["params"])
                                                  if k.endswith("kernel")}
    create_method(c, num_steps=10, param_shapes=variables["params"]).optimizer()


@pytest.mark.parametrize("model,shape,kernels", [("resnet50_imagenet", (224, 224, 3), 25_502_912),
                                                 ("vit_base", (224, 224, 3), 86_444_544)])
def test_full_size_models_have_the_published_weight_counts(model, shape, kernels):
    """torchvision's ResNet-50 (25,557,032 parameters) less its fc bias and BatchNorm affine
    parameters; ViT-B/16 without biases or LayerNorm affine parameters (1000 classes)."""
    net = create_model({"name": model, "num_classes": 1000})
    params = jax.eval_shape(lambda: net.init(jax.random.PRNGKey(0), jnp.zeros((1, *shape)), train=False))["params"]
    assert sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params)) == kernels


@pytest.mark.slow  # a Conv4 compiled and trained through the CLI
def test_one_config_runs_end_to_end_through_the_cli(tmp_path, capsys):
    c = _config("cifar10_conv4_edgepopup", shape=(32, 32, 3))
    assert cli.run(c, str(tmp_path)) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["num_steps"] == 2 and summary["model"] == "conv4"
    assert load_ticket(str(tmp_path / "ticket")).meta["model"]["name"] == "conv4"


def test_configs_follow_the_reference_recipes():
    for name in CONFIGS:
        c = importlib.import_module(f"configs.{name}").get_config()
        imagenet = name.startswith("imagenet")
        assert (c.num_epochs, c.lr_schedule) == (100, "cosine"), name
        assert c.batch_size == (256 if imagenet else 128), name
        assert c.label_smoothing == (0.1 if imagenet else 0.0), name
        assert tuple(c.synthetic_shape) == ((224, 224, 3) if imagenet else (32, 32, 3)), name
        assert c.model in MODELS, name
        doc = importlib.import_module(f"configs.{name}").__doc__
        assert f"python run.py --config configs/{name}.py" in doc, name


# One architecture through the harness's Run: its eager per-leaf init dominates test time (minutes
# for the deep ones on 2 busy cores). ResNet-18 trains end to end in the ticket round-trip test.
@pytest.mark.slow  # a ViT's train step compiled: minutes on 2 busy cores
@pytest.mark.parametrize("model,shape,width", [t for t in TINY if t[0] == "vit_tiny"])
def test_model_trains_evaluates_and_keeps_frozen_weights(model, shape, width, tiny_config, tmp_path):
    c = tiny_config
    with c.unlocked():
        _shrink(c, shape, width)
    c.model = model
    run = Run(c, str(tmp_path))
    state = run.initial_state()
    copy = lambda tree: jax.tree.map(np.array, jax.device_get(tree))  # noqa: E731 (the step donates its state)
    frozen_before, gates_before, stats_before = copy(run.frozen), copy(state.gates), copy(state.model_state)
    step = run.train_step()
    for i in range(2):
        x, y = run.dataset.train_batch(c.seed, i, c.batch_size)
        state, metrics = step(state, run.frozen, x, y)
    assert np.isfinite(float(metrics["loss"]))
    for name, (a, b) in {k: (v, masking.named_leaves(jax.device_get(run.frozen))[k])
                         for k, v in masking.named_leaves(frozen_before).items()}.items():
        np.testing.assert_array_equal(a, b, err_msg=name)
    before = masking.named_leaves(gates_before)
    moved = [k for k, g in masking.named_leaves(jax.device_get(state.gates)).items()
             if not np.array_equal(g, before[k])]
    assert moved, "no gate moved"
    if stats_before:  # BatchNorm models: the running statistics follow the training batches
        changed = jax.tree.leaves(jax.tree.map(lambda a, b: not np.allclose(a, b), stats_before,
                                               jax.device_get(state.model_state)))
        assert any(changed)
    ev = run.evaluate(state)
    assert 0.0 <= ev["val_accuracy"] <= 1.0 and 0.0 < ev["sparsity"] < 1.0


def _init(spec, shape, seed=0):
    """(module, variables) with ``init`` jitted: one compile instead of one per eager op."""
    net = create_model(spec)
    return net, jax.jit(lambda key: net.init(key, jnp.zeros((1, *shape)), train=False))(jax.random.PRNGKey(seed))


@pytest.mark.parametrize("model,shape,width", [
    pytest.param(*t, marks=pytest.mark.slow) if t[0] in SLOW_TO_COMPILE else t for t in TINY])
def test_every_gate_open_is_the_plain_model(model, shape, width):
    net, variables = _init({"name": model, "num_classes": 10, "width": width}, shape, seed=3)
    params = variables.pop("params")
    x = jax.random.normal(jax.random.PRNGKey(0), (4, *shape))
    gated = jax.jit(lambda masks: net.apply({"params": masking.apply_masks(params, masks), **variables}, x, train=False))
    plain = jax.jit(lambda p: net.apply({"params": p, **variables}, x, train=False))(params)
    for structured in (False, True):
        shapes = masking.gate_shapes(params, structured=structured)
        for dtype in (bool, jnp.float32):
            np.testing.assert_array_equal(gated(jax.tree.map(lambda s: jnp.ones(s.shape, dtype), shapes)), plain)
    # and a closed gate does change it: the gates reach the computation
    closed = jax.tree_util.tree_map_with_path(
        lambda p, s: jnp.full(s.shape, not (masking.path_name(p).endswith("head/kernel")
                                            or masking.path_name(p) == "Dense_0/kernel")), shapes)
    assert not np.array_equal(gated(closed), plain)


def _shapes(spec, shape):
    """The model's params as shapes only (``jax.eval_shape``): what gating needs, without a compile."""
    net = create_model(spec)
    return jax.eval_shape(lambda: net.init(jax.random.PRNGKey(0), jnp.zeros((1, *shape)), train=False))["params"]


def test_attention_kernels_get_one_structured_gate_per_head():
    params = _shapes({"name": "vit_tiny", "num_classes": 10, "width": 0.25}, (16, 16, 3))
    shapes = {k: s.shape for k, s in masking.named_leaves(masking.gate_shapes(params, structured=True)).items()}
    leaves = masking.named_leaves(params)
    heads = 3
    for proj in ("query", "key", "value"):
        kernel = leaves[f"block_0/attention/{proj}/kernel"]
        assert kernel.shape[1] == heads and shapes[f"block_0/attention/{proj}/kernel"] == (1, heads, 1)
    assert shapes["block_0/attention/out/kernel"] == (heads, 1, 1)
    assert shapes["block_0/Dense_0/kernel"] == (1, leaves["block_0/Dense_0/kernel"].shape[1])
    assert shapes["embedding/kernel"] == (1, 1, 1, leaves["embedding/kernel"].shape[-1])
    assert "pos_embedding" not in shapes and "cls" not in shapes


def test_closing_a_value_head_zeroes_exactly_that_head_and_its_bias():
    # Every weight and bias 1 (the zoo's biases start at 0, where a zeroed head would not show).
    shapes = _shapes({"name": "vit_tiny", "num_classes": 10, "width": 0.25, "use_bias": True}, (16, 16, 3))
    params = jax.tree.map(lambda s: np.ones(s.shape, s.dtype), shapes)
    masks = jax.tree.map(lambda s: np.ones(s.shape, bool), masking.gate_shapes(params, structured=True))
    by_name = masking.named_leaves(masks)  # the same arrays, by name
    by_name["block_0/attention/value/kernel"][0, 1, 0] = False
    by_name["block_0/attention/out/kernel"][2] = False
    gated = masking.named_leaves(masking.apply_masks(params, masks))
    value, value_bias = gated["block_0/attention/value/kernel"], gated["block_0/attention/value/bias"]
    assert not value[:, 1].any() and value[:, [0, 2]].all()
    assert value_bias.shape == (3, 16)  # (heads, head_dim)
    np.testing.assert_array_equal(value_bias[1], 0.0)
    out = gated["block_0/attention/out/kernel"]
    assert not out[2].any() and out[:2].all()
    # the output bias is shared by all heads: a per-head gate leaves it alone
    np.testing.assert_array_equal(gated["block_0/attention/out/bias"],
                                  masking.named_leaves(params)["block_0/attention/out/bias"])
    report = masking.sparsity_report(params, masks)["layers"]
    assert report["block_0/attention/value/kernel"] == pytest.approx(1 / 3)
    assert report["block_0/attention/out/kernel"] == pytest.approx(1 / 3)


@pytest.mark.slow  # a ResNet-18 trained, resumed and recalibrated: minutes on 2 cores
def test_batchnorm_ticket_round_trips_and_predicts_as_evaluated(tiny_config, tmp_path):
    c = tiny_config
    with c.unlocked():
        _shrink(c, (16, 16, 3), 0.125)
    c.model = "resnet18"
    c.num_steps = 4
    c.eval_every = c.log_every = 4
    c.bn_recalibration_batches = 0  # the ticket keeps the statistics training averaged
    train_and_evaluate(c, str(tmp_path))
    training = load_ticket(str(tmp_path / "ticket")).model_state()
    shutil.rmtree(tmp_path / "ticket")
    c.bn_recalibration_batches = 3  # a rerun resumes at the last step and only recomputes them
    summary = train_and_evaluate(c, str(tmp_path))
    ticket = load_ticket(str(tmp_path / "ticket"))
    stored = masking.named_leaves(ticket.model_state())
    model = create_model(ticket.meta["model"])
    variables = init_variables(model, (16, 16, 3), c.seed, ZOO_INIT_KWARGS)
    initial = masking.named_leaves({k: v for k, v in variables.items() if k != "params"})
    assert stored.keys() == initial.keys()
    # The ticket's statistics are its own: training's after 3 train-mode passes of the binary ticket.
    data = load_dataset(c)
    stats = training
    for i in range(3):
        x, _ = data.train_batch(c.seed, i, c.batch_size)
        _, stats = model.apply({"params": ticket.masked_params(), **stats}, x, train=True, mutable=list(stats))
    expected = masking.named_leaves(stats)
    for k in stored:
        assert not np.allclose(stored[k], initial[k]) and not np.allclose(stored[k], masking.named_leaves(training)[k]), k
        np.testing.assert_allclose(stored[k], expected[k], rtol=1e-4, atol=1e-6, err_msg=k)
    accuracy = float(np.mean(ticket.predict(data.x_val) == data.y_val))
    assert accuracy == summary["val_accuracy"]


@pytest.mark.parametrize("shape", [(2, 8, 8, 3), (3, 7, 9, 4)])
def test_max_pool_2x2_equals_flax_max_pool_in_value_and_gradient(shape):
    x = jax.random.normal(jax.random.PRNGKey(0), shape)
    flax_pool = lambda v: nn.max_pool(v, (2, 2), strides=(2, 2))
    np.testing.assert_array_equal(max_pool_2x2(x), flax_pool(x))
    loss = lambda pool: lambda v: jnp.sum(pool(v) ** 2)
    np.testing.assert_allclose(jax.grad(loss(max_pool_2x2))(x), jax.grad(loss(flax_pool))(x), rtol=1e-6)
