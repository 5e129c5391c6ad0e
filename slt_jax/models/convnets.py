"""Conv2 / Conv4 / Conv6 / Conv8 exactly as edge-popup defines them (Ramanujan et al. 2020).

3x3 convolutions (padding 1, stride 1) with ReLU, a 2x2 max-pool after each pair, then FC 256,
256 and the classifier. No BatchNorm, no biases by default. ``width`` scales every layer.
Conv2: 64,64,P; Conv4: +128,128,P; Conv6: +256,256,P; Conv8: +512,512,P.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax

CONV_WIDTHS = {2: (64,), 4: (64, 128), 6: (64, 128, 256), 8: (64, 128, 256, 512)}


def conv_channels(depth: int, width: float = 1.0) -> tuple[int, ...]:
    """Output channels of each convolution of ConvDEPTH: every stage's width twice."""
    return tuple(int(c * width) for c in CONV_WIDTHS[depth] for _ in range(2))


def max_pool_2x2(x: jax.Array) -> jax.Array:
    """2x2 max-pool, stride 2, NHWC (odd trailing rows/columns dropped, as ``nn.max_pool`` does).

    The same values as ``nn.max_pool(x, (2, 2), strides=(2, 2))``, written as a reshape and a max
    so that its gradient is elementwise: ``nn.max_pool``'s gradient on the CPU goes through an
    argmax pooling that carries four int32 index arrays the size of the input, which cost a Conv4
    step more than its largest convolution's backward pass. Tied maxima share the gradient.
    """
    b, h, w, c = x.shape
    x = x[:, : h - h % 2, : w - w % 2, :].reshape(b, h // 2, 2, w // 2, 2, c)
    return x.max(axis=(2, 4))


class ConvNet(nn.Module):
    """Convolutions with the given output channels (pooled after every second one), then Dense
    layers of the given widths and the classifier. Per-layer widths let a structured ticket
    compile to a narrower copy (``slt_jax.compaction``)."""

    channels: Sequence[int]
    num_classes: int
    dense: Sequence[int] = (256, 256)
    use_bias: bool = False
    kernel_init: Callable[..., Any] = nn.initializers.lecun_normal()

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        del train
        for i, channels in enumerate(self.channels):
            x = nn.relu(nn.Conv(channels, (3, 3), padding=1, use_bias=self.use_bias, kernel_init=self.kernel_init)(x))
            if i % 2 == 1:
                x = max_pool_2x2(x)
        x = x.reshape(x.shape[0], -1)
        for width in self.dense:
            x = nn.relu(nn.Dense(width, use_bias=self.use_bias, kernel_init=self.kernel_init)(x))
        return nn.Dense(self.num_classes, use_bias=self.use_bias, kernel_init=self.kernel_init)(x)
