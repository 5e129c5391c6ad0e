"""ResNet-18, ResNet-50 and Wide-ResNet-50-2 (He et al. 2016; Zagoruyko & Komodakis 2016), as
edge-popup uses them for strong lottery tickets: non-affine BatchNorm, no biases.

Every convolution is followed by ``BatchNorm(use_scale=False, use_bias=False)``: it normalises with
batch statistics while training and with running statistics (collection ``batch_stats``, momentum
0.9) at evaluation, and has no learned scale or shift, so the only parameters are conv and Dense
kernels, all of which the default gate policy gates. The classifier is a Dense on globally
average-pooled features (with a bias only if ``use_bias``).

Two stems:

* ``cifar``: 3x3 conv, stride 1, no max-pool (32x32 inputs keep their resolution into stage 1);
* ``imagenet``: 7x7 conv, stride 2, then 3x3 max-pool, stride 2 (224 -> 56 into stage 1).

Stages have 64, 128, 256, 512 base channels; stages 2-4 halve the resolution in their first
block (stride on the 3x3 conv, as torchvision's "ResNet v1.5"). A bottleneck block is
1x1 (w) -> 3x3 (w) -> 1x1 (4 * base), with w = base for ResNet-50 and 2 * base for WRN-50-2.
A projection shortcut (1x1 conv + BN) is used wherever the shape changes. ``width`` multiplies
every channel count (smoke tests use small widths).
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax

STEMS = ("cifar", "imagenet")


class BasicBlock(nn.Module):
    """Two 3x3 convs (ResNet-18/34)."""

    channels: int
    strides: int
    conv: Callable[..., nn.Module]
    norm: Callable[..., nn.Module]

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        y = nn.relu(self.norm()(self.conv(self.channels, 3, self.strides)(x)))
        y = self.norm()(self.conv(self.channels, 3)(y))
        return nn.relu(y + _shortcut(x, self.channels, self.strides, self.conv, self.norm))


class Bottleneck(nn.Module):
    """1x1 (inner) -> 3x3 (inner, strided) -> 1x1 (4 * channels) (ResNet-50, WRN-50-2)."""

    channels: int
    strides: int
    conv: Callable[..., nn.Module]
    norm: Callable[..., nn.Module]
    inner: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        y = nn.relu(self.norm()(self.conv(self.inner, 1)(x)))
        y = nn.relu(self.norm()(self.conv(self.inner, 3, self.strides)(y)))
        y = self.norm()(self.conv(4 * self.channels, 1)(y))
        return nn.relu(y + _shortcut(x, 4 * self.channels, self.strides, self.conv, self.norm))


def _shortcut(x: jax.Array, channels: int, strides: int, conv, norm) -> jax.Array:
    if x.shape[-1] == channels and strides == 1:
        return x
    return norm(name="shortcut_norm")(conv(channels, 1, strides, name="shortcut_conv")(x))


class ResNet(nn.Module):
    """A ResNet on NHWC images; ``blocks`` per stage, ``bottleneck`` chooses the block type."""

    blocks: Sequence[int]
    num_classes: int
    bottleneck: bool = False
    width_factor: int = 1  # bottleneck inner width = width_factor * base (2 for WRN-50-2)
    stem: str = "cifar"
    width: float = 1.0
    use_bias: bool = False
    kernel_init: Callable[..., Any] = nn.initializers.lecun_normal()

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        if self.stem not in STEMS:
            raise ValueError(f"unknown ResNet stem {self.stem!r}; allowed: {', '.join(STEMS)}")

        def conv(features: int, size: int, strides: int = 1, name: str | None = None) -> nn.Conv:
            # Symmetric padding (size - 1) // 2, as torchvision: SAME would pad strided convs unevenly.
            return nn.Conv(features, (size, size), strides, padding=(size - 1) // 2, use_bias=False,
                           kernel_init=self.kernel_init, name=name)

        norm = functools.partial(nn.BatchNorm, use_running_average=not train, use_scale=False, use_bias=False,
                                 momentum=0.9, epsilon=1e-5)
        scaled = lambda c: max(1, int(c * self.width))  # noqa: E731

        if self.stem == "cifar":
            x = nn.relu(norm()(conv(scaled(64), 3)(x)))
        else:
            x = nn.relu(norm()(conv(scaled(64), 7, 2)(x)))
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        for stage, (base, n) in enumerate(zip((64, 128, 256, 512), self.blocks)):
            for i in range(n):
                strides = 2 if stage > 0 and i == 0 else 1
                if self.bottleneck:
                    x = Bottleneck(scaled(base), strides, conv, norm, inner=scaled(base * self.width_factor))(x)
                else:
                    x = BasicBlock(scaled(base), strides, conv, norm)(x)
        x = x.mean(axis=(1, 2))
        return nn.Dense(self.num_classes, use_bias=self.use_bias, kernel_init=self.kernel_init)(x)


RESNETS: dict[str, dict[str, Any]] = {
    "resnet18": {"blocks": (2, 2, 2, 2)},
    "resnet50": {"blocks": (3, 4, 6, 3), "bottleneck": True},
    "wrn50_2": {"blocks": (3, 4, 6, 3), "bottleneck": True, "width_factor": 2},
}
