"""The Lagrange multiplier that holds a ticket at its target density, shared by the methods.

The constraint is on the binary ticket's density b (the fraction of gated weights it keeps):
b <= d_target. lambda >= 0 is a PI controller of the violation e = b - d_target (Sohrabi et al.
2024)::

    I <- max(0, I + dual_lr * e),    lambda = max(0, I + dual_kp * e)

``dual_kp = 0`` is plain projected dual ascent; the proportional term lets lambda fall as soon as
the density undershoots, instead of after the integral has unwound. With several constraints (one
per gated leaf, ``CRBG(density_constraint="per_layer")``) lambda, I and e are vectors and the
controller runs elementwise.

The geometric controller (``CRBG(controller="geometric")``) runs the integral on log lambda and on
the relative violation r = (b - d_target) / d_target::

    I <- max(LOG_FLOOR, I + gain * r),    lambda = exp(I + kp * r)

The force that closes a gate must outweigh the data loss's pull on it, whose scale spans orders of
magnitude across models and over training; a PI controller in lambda's own units, sized for one
model, crawls on another (CRBG on the digits at a 0.95 target: lambda doubled over 700 steps while
the density moved from 8.7% to 7.9%). On log lambda each step multiplies lambda by exp(gain * r),
whatever its scale. ``LOG_FLOOR`` keeps lambda >= e^-7 ~ 1e-3 while the density is below target,
so that it climbs back within a few dozen steps instead of from -infinity.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

Array = jax.Array
LOG_FLOOR = -7.0


def init_multiplier(lam: float, shape: tuple[int, ...] = ()) -> dict[str, Array]:
    """``lambda`` and its controller's ``integral``, both ``lam``; ``shape``: one per constraint."""
    # Two separate buffers: the train step donates its state, and one buffer cannot be donated twice.
    return {"lambda": jnp.full(shape, lam, jnp.float32), "integral": jnp.full(shape, lam, jnp.float32)}


def update_multiplier(state: dict[str, Array], violation: Array, dual_lr: float, dual_kp: float) -> dict[str, Array]:
    """One controller step on the violation e = b - d_target."""
    integral = jnp.maximum(0.0, state["integral"] + dual_lr * violation)
    return {"lambda": jnp.maximum(0.0, integral + dual_kp * violation), "integral": integral}


def init_log_multiplier(lam: float, shape: tuple[int, ...] = ()) -> dict[str, Array]:
    """The geometric controller's state: ``lambda`` = ``lam`` (1 if ``lam`` <= 0) and ``integral`` =
    log lambda."""
    integral = jnp.full(shape, max(LOG_FLOOR, math.log(lam)) if lam > 0 else 0.0, jnp.float32)
    return {"lambda": jnp.exp(integral), "integral": integral}


def update_log_multiplier(state: dict[str, Array], relative_violation: Array, gain: float,
                          kp: float) -> dict[str, Array]:
    """One geometric step on r = (b - d_target) / d_target: I += gain r (floored), lambda = exp(I + kp r)."""
    integral = jnp.maximum(LOG_FLOOR, state["integral"] + gain * relative_violation)
    return {"lambda": jnp.exp(integral + kp * relative_violation), "integral": integral}
