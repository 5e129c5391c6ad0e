"""Gate noise from JAX's own Threefry-2x32 stream, written so that XLA:CPU fuses it into one pass.

``bits``, ``uniform`` and ``normal`` return exactly what ``jax.random.bits``, ``jax.random.uniform``
and ``jax.random.normal`` return for the same (default, Threefry) key, bit for bit; only the
program that computes them differs. JAX lowers Threefry on the CPU as a rolled ``while`` loop of
five iterations, each a separate pass that reads and writes two uint32 arrays of the output's
size; drawn that way, a fresh Gaussian for every gate was the largest single cost of a CRBG step
on LeNet-300-100. Here the 20 rounds are plain ``jax.numpy`` integer ops, which XLA fuses with
the uniform and erf_inv transforms into one loop, and on the CPU the draw is written to memory
once (see ``_materialized``).

Keys of other implementations (``rbg``, ``unsafe_rbg``, raw or typed) are passed to ``jax.random``
itself: the fused program is used only where it is bit-identical to it.

Threefry-2x32 with 20 rounds (Salmon et al. 2011, "Parallel random numbers: as easy as 1, 2, 3"),
as ``jax.random`` uses it: the element at flat index i of the output is ``x0 ^ x1``, where
``(x0, x1) = threefry2x32(key, (0, i))``.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

Array = jax.Array

_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
_KEY_PARITY = np.uint32(0x1BD11BDA)


def _rotate_left(x: Array, d: int) -> Array:
    return (x << np.uint32(d)) | (x >> np.uint32(32 - d))


def threefry2x32(k0: Array, k1: Array, x0: Array, x1: Array) -> tuple[Array, Array]:
    """Threefry-2x32-20 of the counter pair (x0, x1) under the key (k0, k1), all uint32."""
    ks = (k0, k1, k0 ^ k1 ^ _KEY_PARITY)
    x0, x1 = x0 + ks[0], x1 + ks[1]
    for i in range(5):
        for r in _ROTATIONS[i % 2]:
            x0 = x0 + x1
            x1 = _rotate_left(x1, r) ^ x0
        x0, x1 = x0 + ks[(i + 1) % 3], x1 + ks[(i + 2) % 3] + np.uint32(i + 1)
    return x0, x1


def is_threefry(key: Array) -> bool:
    """Whether ``key`` (raw or typed) is a single Threefry-2x32 key, i.e. the fused draw applies."""
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        return key.shape == () and str(jax.random.key_impl(key)) == "threefry2x32"
    return (key.shape == (2,) and key.dtype == jnp.uint32
            and str(jax.config.jax_default_prng_impl) == "threefry2x32")


def _key_words(key: Array) -> Array:
    if not is_threefry(key):
        raise ValueError(f"a Threefry key (uint32[2] or a typed threefry key) is needed, got {key.dtype}{list(key.shape)}")
    return jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key


def bits(key: Array, shape: tuple[int, ...]) -> Array:
    """Random uint32 of ``shape``; equals ``jax.random.bits(key, shape)``."""
    size = int(np.prod(shape, dtype=np.int64))
    if size >= 2**32:
        raise ValueError(f"at most 2**32 - 1 elements per draw, got shape {shape}")
    k = _key_words(key)
    counter = lax.iota(jnp.uint32, size).reshape(shape)
    x0, x1 = threefry2x32(k[0], k[1], jnp.zeros_like(counter), counter)
    return x0 ^ x1


def _uniform(key: Array, shape: tuple[int, ...], minval: float, maxval: float) -> Array:
    # The 23 high bits become the mantissa of a float in [1, 2).
    mantissa = (bits(key, shape) >> np.uint32(32 - 23)) | np.uint32(0x3F800000)
    floats = lax.bitcast_convert_type(mantissa, jnp.float32) - np.float32(1.0)
    lo, hi = np.float32(minval), np.float32(maxval)
    return lax.max(lo, floats * (hi - lo) + lo)


def uniform(key: Array, shape: tuple[int, ...], minval: float = 0.0, maxval: float = 1.0) -> Array:
    """float32 uniform on [minval, maxval); equals ``jax.random.uniform(key, shape, jnp.float32, minval, maxval)``."""
    if not is_threefry(key):
        return jax.random.uniform(key, shape, jnp.float32, minval, maxval)
    return _materialized(lambda k: _uniform(k, shape, minval, maxval), key)


def normal(key: Array, shape: tuple[int, ...]) -> Array:
    """float32 standard normal; equals ``jax.random.normal(key, shape, jnp.float32)``: sqrt(2) erf^-1(u),
    u uniform on (-1, 1)."""
    if not is_threefry(key):
        return jax.random.normal(key, shape, jnp.float32)

    def draw(k):
        u = _uniform(k, shape, np.nextafter(np.float32(-1.0), np.float32(0.0)), 1.0)
        return np.float32(np.sqrt(2)) * lax.erf_inv(u)

    return _materialized(draw, key)


def _materialized(draw: Callable[[Array], Array], key: Array) -> Array:
    """``draw(key)``, written to memory once on the CPU.

    A gate sample's noise has several consumers (the sample in the forward pass, its derivative in
    the backward pass), and XLA:CPU fuses an elementwise producer into each consumer, recomputing
    the 20 rounds and erf_inv every time; ``lax.optimization_barrier`` does not stop it. A
    conditional does: XLA cannot fuse across one. Both branches are the same draw, so the result
    does not depend on the (key-dependent, hence not constant-foldable) predicate. Elsewhere the
    draw is left to the compiler: a conditional would cost a device-to-host sync on a GPU.
    """
    if jax.default_backend() != "cpu":
        return draw(key)
    return lax.cond((_key_words(key)[0] & 1) == 0, draw, draw, key)
