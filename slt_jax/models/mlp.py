"""Multi-layer perceptrons: LeNet-300-100 and a digits-sized MLP. ReLU, no biases by default.

``activation`` picks the hidden layers' nonlinearity:

* ``relu`` (the default, and what a ticket recorded without the key means);
* ``leaky_relu``: x for x > 0, ``negative_slope * x`` otherwise, the slope a fixed constant (never
  trained; default 0.25, PReLU's usual initial value). Our reading of the "PreReLU" the structured
  CRBG authors used "to avoid unintentional sparsification", which they do not define further: a
  unit whose pre-activation is negative still passes a signal on, so a random network's hidden
  layer is not half zeros before any gate closes.

Both are positively homogeneous (act(z * v) = z * act(v) for z >= 0), so a structured gate z on a
unit, which multiplies the unit's incoming column and its outgoing row (``slt_jax.masking``),
acts as h = z * act(W h_prev) also for relaxed gates between 0 and 1, and a closed unit outputs
act(0) = 0, which compaction deletes. An activation without that property (e.g. GELU) would not
make the two forms agree.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax

ACTIVATIONS = ("relu", "leaky_relu")
DEFAULT_NEGATIVE_SLOPE = 0.25  # PReLU's usual initial value (He et al. 2015), here fixed


def negative_slope_of(name: str, negative_slope: float | None = None) -> float | None:
    """The slope activation ``name`` computes with: None for relu, leaky_relu's (None: 0.25);
    a ValueError names a bad activation or slope and what is allowed."""
    if name == "relu":
        if negative_slope is not None:
            raise ValueError(f"negative_slope={negative_slope!r} with activation='relu'; allowed: None, or "
                             "activation='leaky_relu'")
        return None
    if name == "leaky_relu":
        slope = DEFAULT_NEGATIVE_SLOPE if negative_slope is None else negative_slope
        if isinstance(slope, bool) or not isinstance(slope, (int, float)) or not 0 <= slope < 1:
            raise ValueError(f"negative_slope={slope!r}; allowed: a number in [0, 1)")
        return float(slope)
    raise ValueError(f"unknown activation {name!r}; allowed: {', '.join(ACTIVATIONS)}")


def activation_fn(name: str, negative_slope: float | None = None) -> Callable[[jax.Array], jax.Array]:
    """The hidden layers' nonlinearity ``name``; ``negative_slope`` (leaky_relu only; None: 0.25)."""
    slope = negative_slope_of(name, negative_slope)
    return nn.relu if slope is None else (lambda x: nn.leaky_relu(x, negative_slope=slope))


class MLP(nn.Module):
    """Flatten, then Dense + activation (ReLU by default) for each hidden width, then a Dense classifier."""

    hidden: Sequence[int]
    num_classes: int
    use_bias: bool = False
    kernel_init: Callable[..., Any] = nn.initializers.lecun_normal()
    activation: str = "relu"
    negative_slope: float | None = None  # leaky_relu only; None: 0.25

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        del train  # no dropout or batch statistics
        act = activation_fn(self.activation, self.negative_slope)
        x = x.reshape(x.shape[0], -1)
        for width in self.hidden:
            x = act(nn.Dense(width, use_bias=self.use_bias, kernel_init=self.kernel_init)(x))
        return nn.Dense(self.num_classes, use_bias=self.use_bias, kernel_init=self.kernel_init)(x)
