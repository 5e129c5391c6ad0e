"""The Lagrange multiplier that holds a ticket at its target density, shared by the methods.

The constraint is on the binary ticket's density b (the fraction of gated weights it keeps):
b <= d_target. lambda >= 0 is a PI controller of the violation e = b - d_target (Sohrabi et al.
2024)::

    I <- max(0, I + dual_lr * e),    lambda = max(0, I + dual_kp * e)

``dual_kp = 0`` is plain projected dual ascent; the proportional term lets lambda fall as soon as
the density undershoots, instead of after the integral has unwound. With several constraints (one
per gated leaf, ``CRBG(density_constraint="per_layer")``) lambda, I and e are vectors and the
controller runs elementwise.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def init_multiplier(lam: float, shape: tuple[int, ...] = ()) -> dict[str, Array]:
    """``lambda`` and its controller's ``integral``, both ``lam``; ``shape``: one per constraint."""
    # Two separate buffers: the train step donates its state, and one buffer cannot be donated twice.
    return {"lambda": jnp.full(shape, lam, jnp.float32), "integral": jnp.full(shape, lam, jnp.float32)}


def update_multiplier(state: dict[str, Array], violation: Array, dual_lr: float, dual_kp: float) -> dict[str, Array]:
    """One controller step on the violation e = b - d_target."""
    integral = jnp.maximum(0.0, state["integral"] + dual_lr * violation)
    return {"lambda": jnp.maximum(0.0, integral + dual_kp * violation), "integral": integral}
