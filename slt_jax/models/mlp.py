"""Multi-layer perceptrons: LeNet-300-100 and a digits-sized MLP. ReLU, no biases by default."""
from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax


class MLP(nn.Module):
    """Flatten, then Dense + ReLU for each hidden width, then a Dense classifier."""

    hidden: Sequence[int]
    num_classes: int
    use_bias: bool = False
    kernel_init: Callable[..., Any] = nn.initializers.lecun_normal()

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        del train  # no dropout or batch statistics
        x = x.reshape(x.shape[0], -1)
        for width in self.hidden:
            x = nn.relu(nn.Dense(width, use_bias=self.use_bias, kernel_init=self.kernel_init)(x))
        return nn.Dense(self.num_classes, use_bias=self.use_bias, kernel_init=self.kernel_init)(x)
