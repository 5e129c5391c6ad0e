"""Weight initialisations for random (never trained) networks. fan_in = prod(kernel.shape[:-1]).

* ``signed_kaiming``: w = sign(n) * sqrt(2 / fan_in), n ~ N(0, 1) (edge-popup's best).
* ``kaiming_normal``: w ~ N(0, 2 / fan_in), untruncated.
* ``uniform``: w ~ U[-a, a]; a = ``scale`` if given, else sqrt(6 / fan_in) (Kaiming uniform).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

WEIGHT_INITS = ("signed_kaiming", "kaiming_normal", "uniform")


def _fan_in(shape) -> int:
    return max(1, math.prod(shape[:-1]))


def weight_init(name: str, scale: float | None = None):
    """A Flax kernel initializer ``init(key, shape, dtype)`` for the scheme called ``name``."""
    if name == "signed_kaiming":
        def init(key, shape, dtype=jnp.float32):
            sign = jnp.where(jax.random.bernoulli(key, 0.5, shape), 1.0, -1.0)
            return (sign * math.sqrt(2.0 / _fan_in(shape))).astype(dtype)
    elif name == "kaiming_normal":
        def init(key, shape, dtype=jnp.float32):
            return (jax.random.normal(key, shape) * math.sqrt(2.0 / _fan_in(shape))).astype(dtype)
    elif name == "uniform":
        def init(key, shape, dtype=jnp.float32):
            a = scale if scale is not None else math.sqrt(6.0 / _fan_in(shape))
            return jax.random.uniform(key, shape, minval=-a, maxval=a).astype(dtype)
    else:
        raise ValueError(f"unknown weight_init {name!r}; allowed: {', '.join(WEIGHT_INITS)}")
    return init
