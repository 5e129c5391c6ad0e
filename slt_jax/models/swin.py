"""Swin Transformer, tiny (Liu et al. 2021): shifted-window attention with patch merging.

    patches (conv, kernel = stride = p) -> LN
    -> 4 stages of depth (2, 2, 6, 2), heads (3, 6, 12, 24), channels C, 2C, 4C, 8C (C = 96):
       each block  x += W-MSA(LN(x)) (windows shifted by w/2 in every other block); x += MLP(LN(x))
       between stages: patch merging (concatenate 2x2 neighbours -> LN -> Dense 4C' -> 2C')
    -> LN -> global average pool -> Dense classifier

Window attention adds a learned-at-init (here: frozen random) relative position bias, one scalar
per head and relative offset ((2w - 1)^2 of them), and in shifted blocks a mask of -100 between
tokens that the cyclic shift brought together from different image regions.

Input sizes. At 224x224 this is the published Swin-T: patch 4, window 7 (56, 28, 14, 7 tokens a
side). For inputs up to 64 pixels a side (CIFAR), patch 2 and window 4 (32x32: 16, 8, 4, 2 tokens
a side), the usual CIFAR adaptation: patch 4 would leave 8x8 tokens and a 1x1 last stage. In
every stage the window shrinks to the feature map when the map is smaller, and a stage whose map
fits in one window does not shift (as in the reference code). ``patch_size`` / ``window_size``
override the choice.

Sides that do not tile are padded as the reference code does (zeros at the bottom and right):
patch merging pads an odd side by one before concatenating 2x2 neighbours, and window attention
pads the normalised map up to a multiple of the window, attends over the padding as zero tokens
(the shifted-window mask is built on the padded size) and crops it off before the residual. A
map that tiles runs exactly the operations it ran before padding existed (32x32 and 224x224
outputs are bit-identical to the unpadded code's). The patch embedding does not pad: pixels past
the last whole patch are dropped, as before (28, 32 and 224 are multiples of their patch). MNIST's 28x28 keeps the small-input rule, patch 2 and window 4:
14 (padded to 16 in attention), 7 (padded to 8), 4 (7 merged with a padded row and column) and
2 tokens a side, shifted windows in the first two stages as at 32x32. Window 7 would tile the
first two stages without padding, but its stage 1 is one unshifted window, and a forward and
backward pass at width 0.25 and batch 128 took 1.5x as long (1,026 against 681 ms on a busy 2-core
CPU): attention over 49 keys costs more than the padded rows.

Gating is the same policy as ``slt_jax.models.vit``: every kernel (patch embedding, the
query/key/value/out projections, with one structured gate per head, MLP, patch-merging reduction,
classifier) is gated; the relative position bias tables (N(0, 0.02^2)) are frozen and not
gated; LayerNorms are non-affine. Gated kernels use the spec's ``weight_init``. ``width``
multiplies C (heads fixed; every stage's channels must stay divisible by its head count).
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

EMBED_INIT = nn.initializers.normal(stddev=0.02)
MASKED = -100.0  # added to attention logits across shifted-window region borders, as the reference


def pad_to_multiple(x: jax.Array, m: int) -> jax.Array:
    """(B, H, W, C) with zero rows at the bottom and zero columns at the right up to sides that are
    multiples of ``m`` (the reference's ``F.pad``); ``x`` itself when they already are, so a map that
    tiles exactly runs the same operations as it did before padding existed."""
    pad_h, pad_w = -x.shape[1] % m, -x.shape[2] % m
    if not (pad_h or pad_w):
        return x
    return jnp.pad(x, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)))


def _windows(x: jax.Array, w: int) -> jax.Array:
    """(B, H, W, C) -> (B * H/w * W/w, w * w, C), windows in row-major order."""
    b, h, wd, c = x.shape
    x = x.reshape(b, h // w, w, wd // w, w, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, w * w, c)


def _unwindows(x: jax.Array, w: int, h: int, wd: int) -> jax.Array:
    """Inverse of ``_windows``."""
    c = x.shape[-1]
    x = x.reshape(-1, h // w, wd // w, w, w, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, h, wd, c)


def relative_position_index(w: int) -> np.ndarray:
    """(w*w, w*w) index into the (2w - 1)^2 bias table for every pair of tokens in a window."""
    coords = np.stack(np.meshgrid(np.arange(w), np.arange(w), indexing="ij")).reshape(2, -1)
    rel = coords[:, :, None] - coords[:, None, :] + (w - 1)  # (2, N, N), offsets shifted to >= 0
    return rel[0] * (2 * w - 1) + rel[1]


def shifted_window_mask(h: int, wd: int, w: int, shift: int) -> np.ndarray:
    """(num_windows, w*w, w*w): 0 within a region, ``MASKED`` between regions the shift joined."""
    region = np.zeros((1, h, wd, 1))
    bands = (slice(0, -w), slice(-w, -shift), slice(-shift, None))
    for label, (rows, cols) in enumerate((r, c) for r in bands for c in bands):
        region[:, rows, cols, :] = label
    ids = _windows(region, w)[..., 0]  # (num_windows, N); numpy in, numpy out
    return np.where(ids[:, None, :] != ids[:, :, None], MASKED, 0.0).astype(np.float32)


class WindowAttention(nn.Module):
    """Multi-head self-attention inside each window; projections shaped like Flax's attention
    (query/key/value kernels (C, heads, head_dim), out kernel (heads, head_dim, C)) so structured
    gating gates heads."""

    num_heads: int
    window: int
    use_bias: bool
    kernel_init: Callable[..., Any]

    @nn.compact
    def __call__(self, x: jax.Array, mask: np.ndarray | None) -> jax.Array:
        n, c = x.shape[1], x.shape[2]
        head_dim = c // self.num_heads
        proj = lambda name: nn.DenseGeneral((self.num_heads, head_dim), use_bias=self.use_bias,  # noqa: E731
                                            kernel_init=self.kernel_init, name=name)(x)
        q, k, v = proj("query"), proj("key"), proj("value")  # (B*, N, heads, head_dim)
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(head_dim)
        table = self.param("relative_position_bias", EMBED_INIT, ((2 * self.window - 1) ** 2, self.num_heads))
        bias = table[relative_position_index(self.window).reshape(-1)].reshape(n, n, self.num_heads)
        logits = logits + bias.transpose(2, 0, 1)[None]
        if mask is not None:  # (num_windows, N, N); windows of one image are consecutive in the batch
            nw = mask.shape[0]
            logits = (logits.reshape(-1, nw, self.num_heads, n, n) + mask[None, :, None]).reshape(logits.shape)
        y = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, axis=-1), v)
        return nn.DenseGeneral(c, axis=(-2, -1), use_bias=self.use_bias, kernel_init=self.kernel_init, name="out")(y)


class SwinBlock(nn.Module):
    num_heads: int
    window: int
    shift: int
    use_bias: bool
    kernel_init: Callable[..., Any]

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, wd, c = x.shape
        # Padded after the norm, as the reference: the padding is real zero tokens that the attention
        # sees (keys, values and their position biases), cropped off again before the residual.
        y = pad_to_multiple(nn.LayerNorm(use_scale=False, use_bias=False)(x), self.window)
        hp, wp = y.shape[1:3]
        if self.shift:
            y = jnp.roll(y, (-self.shift, -self.shift), axis=(1, 2))
        mask = shifted_window_mask(hp, wp, self.window, self.shift) if self.shift else None
        y = WindowAttention(self.num_heads, self.window, self.use_bias, self.kernel_init,
                            name="attention")(_windows(y, self.window), mask)
        y = _unwindows(y, self.window, hp, wp)
        if self.shift:
            y = jnp.roll(y, (self.shift, self.shift), axis=(1, 2))
        x = x + y[:, :h, :wd]
        y = nn.LayerNorm(use_scale=False, use_bias=False)(x)
        y = nn.gelu(nn.Dense(4 * c, use_bias=self.use_bias, kernel_init=self.kernel_init)(y))
        return x + nn.Dense(c, use_bias=self.use_bias, kernel_init=self.kernel_init)(y)


class PatchMerging(nn.Module):
    """2x2 neighbours concatenated (4C), normalised, reduced to 2C: half the side (rounded up: an odd
    side first gets a zero row or column at the bottom or right, as the reference), twice the channels."""

    kernel_init: Callable[..., Any]

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = pad_to_multiple(x, 2)
        b, h, wd, c = x.shape
        x = x.reshape(b, h // 2, 2, wd // 2, 2, c).transpose(0, 1, 3, 4, 2, 5).reshape(b, h // 2, wd // 2, 4 * c)
        x = nn.LayerNorm(use_scale=False, use_bias=False)(x)
        return nn.Dense(2 * c, use_bias=False, kernel_init=self.kernel_init, name="reduction")(x)


class Swin(nn.Module):
    embed_dim: int
    depths: Sequence[int]
    num_heads: Sequence[int]
    num_classes: int
    patch_size: int | None = None  # None: 2 for inputs up to 64 pixels a side, 4 above
    window_size: int | None = None  # None: 4 for inputs up to 64 pixels a side, 7 above
    width: float = 1.0
    use_bias: bool = False
    kernel_init: Callable[..., Any] = nn.initializers.lecun_normal()

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        del train  # no dropout or stochastic depth: the weights are frozen, only the mask is learned
        small = max(x.shape[1:3]) <= 64
        p = self.patch_size or (2 if small else 4)
        window = self.window_size or (4 if small else 7)
        dim = int(self.embed_dim * self.width)
        x = nn.Conv(dim, (p, p), strides=(p, p), padding="VALID", use_bias=self.use_bias,
                    kernel_init=self.kernel_init, name="embedding")(x)
        x = nn.LayerNorm(use_scale=False, use_bias=False)(x)
        for stage, (depth, heads) in enumerate(zip(self.depths, self.num_heads)):
            if stage > 0:
                x = PatchMerging(self.kernel_init, name=f"merge_{stage}")(x)
            side = min(x.shape[1:3])
            w = min(window, side)
            if x.shape[-1] % heads:
                raise ValueError(f"Swin width {self.width} gives stage {stage} {x.shape[-1]} channels, not a multiple "
                                 f"of its {heads} heads; allowed: widths that make every stage's channels "
                                 f"(int({self.embed_dim} * width) * 2^stage) a multiple of its heads "
                                 f"{tuple(self.num_heads)}, e.g. 0.25")
            for i in range(depth):
                shift = w // 2 if i % 2 and side > w else 0
                x = SwinBlock(heads, w, shift, self.use_bias, self.kernel_init, name=f"stage_{stage}_block_{i}")(x)
        x = nn.LayerNorm(use_scale=False, use_bias=False)(x).mean(axis=(1, 2))
        return nn.Dense(self.num_classes, use_bias=self.use_bias, kernel_init=self.kernel_init, name="head")(x)


SWINS: dict[str, dict[str, Any]] = {
    "swin_t": {"embed_dim": 96, "depths": (2, 2, 6, 2), "num_heads": (3, 6, 12, 24)},
}
