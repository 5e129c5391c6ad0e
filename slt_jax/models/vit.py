"""Vision Transformers (Dosovitskiy et al. 2021): ViT-Ti, ViT-S, ViT-B.

    patches (conv, kernel = stride = p) -> [cls] + tokens + position embedding
    -> depth x (x += MHSA(LN(x)); x += MLP(LN(x)))  -> LN -> Dense on the cls token

The patch size follows the input: p = 4 for images up to 64 pixels on a side (CIFAR: 32x32 -> 64
tokens), p = 16 above (ImageNet: 224x224 -> 196 tokens); ``patch_size`` overrides it.

What the default gate policy (every leaf named ``kernel``) gates, and what stays fixed:

* gated: the patch embedding (a conv kernel), the query/key/value/out projections of every
  attention layer, both MLP kernels and the classifier. Structured gating gives attention kernels
  one gate per head (see ``slt_jax.masking``) and every other kernel one gate per output unit.
* not gated, frozen at their random initial value: the position embedding and the cls token,
  N(0, 0.02^2) as in big_vision (a zero cls token would be the same for every image anyway).
* LayerNorms are non-affine (no scale, no shift): a frozen affine LayerNorm at its standard
  init (scale 1, shift 0) is the same function, so the parameters would only be dead weight.

Initialisation: gated kernels use the spec's ``weight_init`` (so a ViT ticket and a ResNet ticket
are drawn from the same family); the embeddings use the standard N(0, 0.02^2). Flax's
DenseGeneral hands the initialiser the kernel flattened to (fan_in, fan_out), so fan-in scaled
schemes see the true fan-in of the (in, heads, head_dim) attention kernels. Biases, when
``use_bias``, start at 0 as usual. ``width`` multiplies the hidden size (heads fixed; hidden must
stay divisible by the head count) and the MLP size.
"""
from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

EMBED_INIT = nn.initializers.normal(stddev=0.02)


class EncoderBlock(nn.Module):
    num_heads: int
    head_dim: int
    mlp_dim: int
    use_bias: bool
    kernel_init: Callable[..., Any]

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        y = nn.LayerNorm(use_scale=False, use_bias=False)(x)
        x = x + nn.MultiHeadDotProductAttention(num_heads=self.num_heads, qkv_features=self.num_heads * self.head_dim,
                                                use_bias=self.use_bias, kernel_init=self.kernel_init,
                                                name="attention")(y, y)
        y = nn.LayerNorm(use_scale=False, use_bias=False)(x)
        y = nn.gelu(nn.Dense(self.mlp_dim, use_bias=self.use_bias, kernel_init=self.kernel_init)(y))
        return x + nn.Dense(x.shape[-1], use_bias=self.use_bias, kernel_init=self.kernel_init)(y)


class ViT(nn.Module):
    hidden: int
    depth: int
    num_heads: int
    mlp_dim: int
    num_classes: int
    patch_size: int | None = None  # None: 4 for inputs up to 64 pixels a side, 16 above
    width: float = 1.0
    use_bias: bool = False
    kernel_init: Callable[..., Any] = nn.initializers.lecun_normal()
    # (heads, MLP units) of each block where they differ from num_heads and mlp_dim * width: a
    # compacted ticket's (``slt_jax.compaction``). Heads keep their size, hidden // num_heads.
    block_widths: tuple[tuple[int, int], ...] | None = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        del train  # no dropout: the weights are random and frozen, only the mask is learned
        hidden = int(self.hidden * self.width)
        if hidden % self.num_heads:
            raise ValueError(f"ViT width {self.width} gives hidden size {hidden}, not divisible by "
                             f"{self.num_heads} heads; allowed: widths making it a multiple of {self.num_heads}")
        p = self.patch_size or (4 if max(x.shape[1:3]) <= 64 else 16)
        x = nn.Conv(hidden, (p, p), strides=(p, p), padding="VALID", use_bias=self.use_bias,
                    kernel_init=self.kernel_init, name="embedding")(x)
        x = x.reshape(x.shape[0], -1, hidden)
        cls = self.param("cls", EMBED_INIT, (1, 1, hidden))
        x = jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, hidden)), x], axis=1)
        x = x + self.param("pos_embedding", EMBED_INIT, (1, x.shape[1], hidden))
        widths = self.block_widths or ((self.num_heads, int(self.mlp_dim * self.width)),) * self.depth
        if len(widths) != self.depth:
            raise ValueError(f"ViT block_widths has {len(widths)} blocks for depth {self.depth}; allowed: one "
                             f"(heads, MLP units) pair per block")
        for i, (heads, mlp_dim) in enumerate(widths):
            x = EncoderBlock(heads, hidden // self.num_heads, mlp_dim, self.use_bias, self.kernel_init,
                             name=f"block_{i}")(x)
        x = nn.LayerNorm(use_scale=False, use_bias=False)(x[:, 0])
        return nn.Dense(self.num_classes, use_bias=self.use_bias, kernel_init=self.kernel_init, name="head")(x)


VITS: dict[str, dict[str, int]] = {
    "vit_tiny": {"hidden": 192, "depth": 12, "num_heads": 3, "mlp_dim": 768},
    "vit_small": {"hidden": 384, "depth": 12, "num_heads": 6, "mlp_dim": 1536},
    "vit_base": {"hidden": 768, "depth": 12, "num_heads": 12, "mlp_dim": 3072},
}
