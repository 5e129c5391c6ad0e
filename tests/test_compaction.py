"""A structured ticket compiles to a narrower dense model with the masked model's outputs."""
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from slt_jax import load_ticket, masking
from slt_jax.compaction import compact_ticket, count_macs
from slt_jax.data import load_dataset, preprocess
from slt_jax.models import create_model
from slt_jax.train import train_and_evaluate


@pytest.mark.parametrize("model, use_bias, structured_policy, structured_inputs", [
    ("digits_mlp", True, "", ""),
    ("digits_mlp", False, r"^Dense_[01]/", ""),  # the classifier keeps one gate per weight
    # pixel gates, hidden units of the first layer gated as rows of the second, the second's units
    ("digits_mlp", True, r"^Dense_1/", r"^Dense_0/"),
    ("digits_mlp", False, "", r"^Dense_[01]/"),
    pytest.param("conv2", False, "", "", marks=pytest.mark.slow),  # a Conv2 trained: a minute on 2 busy cores
])
def test_compact_model_matches_masked_model(tiny_config, tmp_path, model, use_bias, structured_policy,
                                            structured_inputs):
    c = tiny_config
    c.model, c.use_bias, c.structured, c.sparsity, c.width = model, use_bias, True, 0.5, 0.25 if model == "conv2" else 1.0
    c.structured_policy, c.structured_inputs = structured_policy, structured_inputs
    train_and_evaluate(c, str(tmp_path))
    ticket = load_ticket(str(tmp_path / "ticket"))
    module, variables = compact_ticket(ticket)

    closed = sum(int((~np.asarray(m)).sum()) for m in jax.tree.leaves(ticket.gate_masks))
    assert closed > 0, "the test needs a ticket that closes some units"
    shape = ticket.meta["input_shape"]
    assert count_macs(module, shape) < count_macs(ticket.model, shape)

    data = load_dataset(c)
    x = jnp.asarray(preprocess(data.x_val, ticket.meta["preprocessing"]))
    masked_logits = create_model(ticket.meta["model"]).apply({"params": ticket.masked_params()}, x)
    compact_logits = module.apply(variables, x)
    np.testing.assert_allclose(compact_logits, masked_logits, rtol=1e-5, atol=1e-5)
    assert (np.argmax(compact_logits, -1) == ticket.predict(data.x_val)).all()


def test_unstructured_ticket_is_refused(tiny_config, tmp_path):
    tiny_config.num_steps = 2
    train_and_evaluate(tiny_config, str(tmp_path))
    with pytest.raises(ValueError, match="structured"):
        compact_ticket(load_ticket(str(tmp_path / "ticket")))


# Channel tickets on random weights. The zoo's seeded init is jitted, and for a ResNet its compile
# alone takes 10-20 s; compaction needs only a ticket's meta, masked params and model state.


class FakeTicket(NamedTuple):
    """What ``compact_ticket`` reads of a loaded ``slt_jax.Ticket``."""

    meta: dict[str, Any]
    params: Any
    state: dict[str, Any]

    def masked_params(self):
        return self.params

    def model_state(self):
        return self.state


def _net(name, shape, width, use_bias=False):
    spec = {"name": name, "num_classes": 10, "width": width, "use_bias": use_bias}
    model = create_model(spec)
    abstract = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, *shape))))
    meta = {"model": spec, "input_shape": list(shape), "structured": True}
    return model, abstract, meta


def _he_normal(abstract_params, rng):
    draw = lambda s: rng.normal(size=s.shape) * math.sqrt(2 / math.prod(s.shape[:-1]))  # noqa: E731
    return jax.tree.map(lambda s: draw(s).astype(np.float32), abstract_params)


def _half_closed(params, rng):
    """One gate per output channel / unit, each closed with probability 1/2."""
    return jax.tree.map(lambda s: rng.random(s.shape) < 0.5, masking.gate_shapes(params, structured=True))


def _at(tree, path):
    for key in path.split("/"):
        tree = tree[key]
    return tree


def _open(masks, layer):
    return np.asarray(_at(masks, layer)["kernel"]).reshape(-1)


def _masked_logits(model, ticket, x):
    logits = jax.jit(model.apply)({"params": ticket.params, **ticket.state}, x)
    assert np.abs(logits).max() > 0.1, "the test needs logits that are not ~0"
    return logits


def _assert_same_logits(masked_logits, module, variables, x):
    # Float32 sums in another order differ by ulps of the largest terms, so the bound scales with
    # the logits (1e-5 of the largest; 3e-5 absolute at logits ~40 on an AMD EPYC).
    scale = float(np.abs(masked_logits).max())
    np.testing.assert_allclose(jax.jit(module.apply)(variables, x), masked_logits, rtol=1e-5, atol=1e-5 * max(scale, 1.0))


def _fewer_params_and_macs(model, module, ticket, variables):
    size = lambda tree: sum(np.size(leaf) for leaf in jax.tree.leaves(tree))  # noqa: E731
    shape = ticket.meta["input_shape"]
    assert size(variables["params"]) < size(ticket.params)
    assert count_macs(module, shape) < count_macs(model, shape)


@pytest.mark.parametrize("multiple", [1, 8])
def test_conv4_channel_ticket_compiles_at_mnist_shape(multiple):
    """Every closed channel and unit goes; with ``multiple`` 8, closed ones come back up to a
    multiple of 8 (XLA's CPU convolutions are slow on other channel counts), still exact."""
    rng = np.random.default_rng(0)
    model, abstract, meta = _net("conv4", (28, 28, 1), 0.25)
    params = _he_normal(abstract["params"], rng)
    masks = _half_closed(params, rng)
    ticket = FakeTicket(meta, jax.device_get(masking.apply_masks(params, masks)), {})
    module, variables = compact_ticket(ticket, multiple)

    def width(layer):
        gates = _open(masks, layer)
        return min(-(-int(gates.sum()) // multiple) * multiple, gates.size)

    assert module.channels == tuple(width(f"Conv_{i}") for i in range(4))
    assert module.dense == tuple(width(f"Dense_{i}") for i in range(2))
    _fewer_params_and_macs(model, module, ticket, variables)
    x = jnp.asarray(rng.normal(size=(8, 28, 28, 1)), jnp.float32)
    _assert_same_logits(_masked_logits(model, ticket, x), module, variables, x)


def _batch_stats(model, params, stats, masks_per_batch, x):
    """Running statistics after train-mode batches, one per mask, as a run with a changing mask leaves
    them (from BatchNorm's initial mean 0, var 1)."""
    stats = jax.tree_util.tree_map_with_path(lambda p, s: np.full(s.shape, p[-1].key == "var", np.float32), stats)
    step = jax.jit(lambda s, m: model.apply({"params": masking.apply_masks(params, m), "batch_stats": s}, x,
                                            train=True, mutable=["batch_stats"])[1]["batch_stats"])
    for masks in masks_per_batch:
        stats = step(stats, masks)
    return jax.tree.map(np.asarray, stats)


@pytest.mark.slow  # two ResNet-18 compiles
@pytest.mark.parametrize("name, shape", [("resnet18", (16, 16, 3)), ("resnet18_imagenet", (32, 32, 3))])
def test_resnet18_channel_ticket_compiles(name, shape):
    """Statistics from batches under an earlier mask, then the ticket's: a channel closed in both
    has running mean exactly 0, one closed only in the ticket a decayed mean of either sign, so a
    closed inner channel is a constant relu(-mean * rsqrt(var + eps)) > 0 the compact block folds."""
    rng = np.random.default_rng(1)
    model, abstract, meta = _net(name, shape, 0.125)
    params = _he_normal(abstract["params"], rng)
    earlier, masks = _half_closed(params, rng), _half_closed(params, rng)
    x = jnp.asarray(rng.normal(size=(8, *shape)), jnp.float32)
    stats = _batch_stats(model, params, abstract["batch_stats"], [earlier] * 3 + [masks] * 2, x)
    ticket = FakeTicket(meta, jax.device_get(masking.apply_masks(params, masks)), {"batch_stats": stats})
    module, variables = compact_ticket(ticket)

    blocks = sorted(k for k in params if k.startswith("BasicBlock_"))
    inner_closed_means = np.concatenate([stats[b]["BatchNorm_0"]["mean"][~_open(masks, f"{b}/Conv_0")] for b in blocks])
    assert (inner_closed_means == 0).any() and (inner_closed_means < 0).any(), "the test needs both kinds"
    assert [w.inner for w in module.blocks] == [int(_open(masks, f"{b}/Conv_0").sum()) for b in blocks]
    assert any(w.folded for w in module.blocks)
    _fewer_params_and_macs(model, module, ticket, variables)
    masked_logits = _masked_logits(model, ticket, x)
    _assert_same_logits(masked_logits, module, variables, x)

    module, variables = compact_ticket(ticket, multiple=8)
    full = [(params[b]["Conv_0"]["kernel"].shape[-1], params[b]["Conv_1"]["kernel"].shape[-1]) for b in blocks]
    assert all(n % 8 == 0 or n == f for w, fs in zip(module.blocks, full) for n, f in zip((w.inner, w.out), fs))
    _assert_same_logits(masked_logits, module, variables, x)


def test_resnet_residual_channel_goes_only_where_it_is_zero():
    """Residual channels 0 and 1 of stage 1 (stem, both blocks' second convs) and of stage 2
    (projection, both blocks' second convs) are closed in every conv that adds into them.
    Channel 0 has mean >= 0 in all their norms, so it is 0 everywhere and goes. Channel 1 has one
    norm with mean < 0 (stage 1: the stem; stage 2: the last block), so it is a positive constant
    at some stream point and stays. The first conv of each stage is open at every other channel,
    so the widths are exact."""
    rng = np.random.default_rng(2)
    model, abstract, meta = _net("resnet18", (16, 16, 3), 0.125)
    params = _he_normal(abstract["params"], rng)
    masks = _half_closed(params, rng)
    stats = jax.tree_util.tree_map_with_path(
        lambda p, s: rng.uniform(0.1, 1.1, s.shape) if p[-1].key == "var" else rng.uniform(-1, 1, s.shape),
        abstract["batch_stats"])
    stats = jax.tree.map(lambda a: a.astype(np.float32), stats)
    mean_1 = {  # conv and norm adding into the stream -> the norm's mean at channel 1
        ("Conv_0", "BatchNorm_0"): -0.5,
        ("BasicBlock_0/Conv_1", "BasicBlock_0/BatchNorm_1"): 0.0,
        ("BasicBlock_1/Conv_1", "BasicBlock_1/BatchNorm_1"): 0.0,
        ("BasicBlock_2/shortcut_conv", "BasicBlock_2/shortcut_norm"): 0.0,
        ("BasicBlock_2/Conv_1", "BasicBlock_2/BatchNorm_1"): 0.0,
        ("BasicBlock_3/Conv_1", "BasicBlock_3/BatchNorm_1"): -0.5,
    }
    for (conv, norm), mean in mean_1.items():
        gate = _at(masks, conv)["kernel"]
        if conv in ("Conv_0", "BasicBlock_2/shortcut_conv"):
            gate[:] = True
        gate[..., :2] = False
        _at(stats, norm)["mean"][:2] = 0.3, mean
    masks["BasicBlock_1"]["Conv_0"]["kernel"][:] = False  # a block whose inner channels all go
    ticket = FakeTicket(meta, jax.device_get(masking.apply_masks(params, masks)), {"batch_stats": stats})
    module, variables = compact_ticket(ticket)

    assert module.stem_width == 7
    assert [w.out for w in module.blocks[:4]] == [7, 7, 15, 15]
    assert module.blocks[1].inner == 0
    x = jnp.asarray(rng.normal(size=(8, 16, 16, 3)), jnp.float32)
    _assert_same_logits(_masked_logits(model, ticket, x), module, variables, x)


@pytest.mark.slow  # two ViT compiles
@pytest.mark.parametrize("use_bias", [False, True])
def test_vit_head_and_mlp_ticket_compiles(use_bias):
    """Half the head gates closed: a head whose value or output projection is closed is deleted
    from all four projections, one with only its query or key closed stays (it attends uniformly);
    closed MLP units go; the residual stream keeps its width."""
    rng = np.random.default_rng(2)
    model, abstract, meta = _net("vit_tiny", (16, 16, 3), 0.25, use_bias)
    params = _he_normal(abstract["params"], rng)
    masks = _half_closed(params, rng)
    ticket = FakeTicket(meta, jax.device_get(masking.apply_masks(params, masks)), {})
    module, variables = compact_ticket(ticket)

    blocks = sorted((k for k in params if k.startswith("block_")), key=lambda k: int(k.split("_")[1]))
    heads = [(_open(masks, f"{b}/attention/value") & _open(masks, f"{b}/attention/out")).sum() for b in blocks]
    assert any(0 < h < 3 for h in heads) and 0 in heads, "the test needs blocks losing some and all heads"
    assert [w[0] for w in module.block_widths] == [max(int(h), 1) for h in heads]
    units = [(_open(masks, f"{b}/Dense_0") & np.any(np.asarray(ticket.params[b]["Dense_1"]["kernel"]) != 0, 1)).sum()
             for b in blocks]
    assert [w[1] for w in module.block_widths] == [int(u) for u in units]
    _fewer_params_and_macs(model, module, ticket, variables)
    x = jnp.asarray(rng.normal(size=(4, 16, 16, 3)), jnp.float32)
    _assert_same_logits(_masked_logits(model, ticket, x), module, variables, x)
