"""Swin-T on sides that do not tile: the reference code's zero padding in window attention and patch
merging, checked against a per-token numpy reference; MNIST's 28x28; the published weight count."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from slt_jax.models import create_model
from slt_jax.models.swin import MASKED, PatchMerging, SwinBlock, pad_to_multiple

# Swin-T's 28,288,354 parameters (Liu et al. 2021, 1000 classes) less its 64,286 biases and LayerNorm
# affine parameters: the kernels and the relative position bias tables (169 per head and block).
SWIN_T_224 = 28_222_746
# At 32x32 (patch 2; windows 4, 4, 4, 2; 10 classes): the smaller patch kernel, bias tables and head.
SWIN_T_32 = SWIN_T_224 - 3 * 96 * (16 - 4) - 18_480 - 768 * 990


def _layer_norm(v):
    return (v - v.mean(-1, keepdims=True)) / np.sqrt(v.var(-1, keepdims=True) + 1e-6)


def _gelu(v):  # Flax's nn.gelu: the tanh approximation
    return 0.5 * v * (1 + np.tanh(np.sqrt(2 / np.pi) * (v + 0.044715 * v ** 3)))


def _band(i, n, w, shift):
    """The reference's region of row (or column) ``i`` of the padded, shifted map of side ``n``."""
    return 0 if i < n - w else 1 if i < n - shift else 2


def reference_block(p, x, w, shift):
    """The reference block, one query token at a time in float64: normalise, zero-pad to multiples
    of ``w`` at the bottom/right, roll by -shift, attend within each window (relative position
    bias; -100 across the regions the roll joined), roll back, crop, residual; then the MLP."""
    b, h, wd, c = x.shape
    hp, wp = math.ceil(h / w) * w, math.ceil(wd / w) * w
    y = np.zeros((b, hp, wp, c))
    y[:, :h, :wd] = _layer_norm(x)
    y = np.roll(y, (-shift, -shift), axis=(1, 2))
    q, k, v = (np.einsum("bijc,chd->bijhd", y, p[n]["kernel"]) for n in ("query", "key", "value"))
    heads, head_dim = q.shape[-2:]
    attended = np.zeros((b, hp, wp, heads, head_dim))
    for i in range(hp):
        for j in range(wp):
            r0, c0 = i // w * w, j // w * w
            keys = [(r, s) for r in range(r0, r0 + w) for s in range(c0, c0 + w)]
            logits = np.stack([np.einsum("bhd,bhd->bh", q[:, i, j], k[:, r, s]) / np.sqrt(head_dim)
                               + p["relative_position_bias"][(i - r + w - 1) * (2 * w - 1) + (j - s + w - 1)]
                               + (MASKED if shift and (_band(i, hp, w, shift), _band(j, wp, w, shift))
                                  != (_band(r, hp, w, shift), _band(s, wp, w, shift)) else 0.0)
                               for r, s in keys], axis=-1)  # (b, heads, keys)
            weights = np.exp(logits - logits.max(-1, keepdims=True))
            weights /= weights.sum(-1, keepdims=True)
            attended[:, i, j] = np.einsum("bhk,kbhd->bhd", weights, np.stack([v[:, r, s] for r, s in keys]))
    out = np.einsum("bijhd,hdc->bijc", attended, p["out"]["kernel"])
    x = x + np.roll(out, (shift, shift), axis=(1, 2))[:, :h, :wd]
    return x + _gelu(_layer_norm(x) @ p["Dense_0"]["kernel"]) @ p["Dense_1"]["kernel"]


@pytest.mark.parametrize("h,wd,shift", [(8, 8, 0), (8, 8, 2), (7, 7, 0), (7, 7, 2), (5, 7, 2), (6, 3, 2)])
def test_window_attention_block_equals_the_per_token_reference(h, wd, shift):
    """8x8 tiles (the unpadded path); 7x7, 5x7 and 6x3 are padded to 8x8 and 8x4, with the
    shifted-window mask built on the padded map (a shift of 2 of window 4)."""
    block = SwinBlock(num_heads=2, window=4, shift=shift, use_bias=False,
                      kernel_init=jax.nn.initializers.normal(0.5))
    x = jax.random.normal(jax.random.PRNGKey(0), (2, h, wd, 8))
    params = block.init(jax.random.PRNGKey(1), x)["params"]
    # Bias tables of weight comparable to the logits, so a wrong relative index shows.
    table = params["attention"]["relative_position_bias"]
    params["attention"]["relative_position_bias"] = jax.random.normal(jax.random.PRNGKey(2), table.shape)
    got = jax.jit(block.apply)({"params": params}, x)
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    expected = reference_block({**p["attention"], "Dense_0": p["Dense_0"], "Dense_1": p["Dense_1"]},
                               np.asarray(x, np.float64), 4, shift)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_padding_leaves_a_map_that_tiles_untouched():
    """No pad and no crop where the sides are multiples: the 32x32 and 224x224 models run what they ran."""
    x = jnp.ones((1, 8, 12, 3))
    assert pad_to_multiple(x, 4) is x
    padded = pad_to_multiple(x, 5)
    assert padded.shape == (1, 10, 15, 3)
    np.testing.assert_array_equal(padded[:, :8, :12], x)
    assert not padded[:, 8:].any() and not padded[:, :, 12:].any()


@pytest.mark.parametrize("h,wd", [(7, 7), (7, 4), (4, 5)])
def test_merging_an_odd_side_is_merging_its_explicit_zero_padding(h, wd):
    merge = PatchMerging(jax.nn.initializers.normal(1.0))
    x = jax.random.normal(jax.random.PRNGKey(0), (2, h, wd, 3))
    variables = merge.init(jax.random.PRNGKey(1), x)
    explicit = jnp.pad(x, ((0, 0), (0, h % 2), (0, wd % 2), (0, 0)))
    got = merge.apply(variables, x)
    assert got.shape == (2, math.ceil(h / 2), math.ceil(wd / 2), 6)
    np.testing.assert_array_equal(got, merge.apply(variables, explicit))


def _param_shapes(shape, num_classes=10, width=1.0):
    net = create_model({"name": "swin_t", "num_classes": num_classes, "width": width})
    return jax.eval_shape(lambda: net.init(jax.random.PRNGKey(0), jnp.zeros((1, *shape)), train=False))["params"]


def test_swin_t_runs_on_mnist_28x28_with_the_small_input_layout():
    """Patch 2 and window 4, as at 32x32: the same weights (bar the one input channel), 14, 7, 4
    and 2 tokens a side (the last stage's window shrinks to 2)."""
    net = create_model({"name": "swin_t", "num_classes": 10, "width": 0.25})
    variables = jax.eval_shape(lambda: net.init(jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1)), train=False))
    logits = jax.eval_shape(lambda v: net.apply(v, jnp.zeros((3, 28, 28, 1)), train=False), variables)
    assert logits.shape == (3, 10)
    at_28 = jax.tree.map(lambda s: s.shape, variables["params"])
    at_32 = jax.tree.map(lambda s: s.shape, _param_shapes((32, 32, 1), width=0.25))
    assert at_28 == at_32
    assert at_28["embedding"]["kernel"] == (2, 2, 1, 24)
    assert at_28["stage_0_block_0"]["attention"]["relative_position_bias"] == (49, 3)
    assert at_28["stage_3_block_0"]["attention"]["relative_position_bias"] == (9, 24)


@pytest.mark.parametrize("shape,num_classes,count", [((224, 224, 3), 1000, SWIN_T_224), ((32, 32, 3), 10, SWIN_T_32)])
def test_swin_t_has_the_published_weight_count(shape, num_classes, count):
    params = _param_shapes(shape, num_classes)
    assert sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params)) == count


def test_a_width_that_splits_no_head_evenly_is_a_one_line_error():
    with pytest.raises(ValueError, match=r"^Swin width 0.2 gives stage 0 19 channels.*allowed") as err:
        _param_shapes((28, 28, 1), width=0.2)
    assert "\n" not in str(err.value)
