"""Edge-popup (Ramanujan et al., CVPR 2020): top-k scores with a straight-through gradient.

Each gated weight w has a score s. Forward: keep the ``1 - sparsity`` fraction of largest |s| in
each gated leaf (``scope="layer"``, the reference) or over all gated leaves together
(``scope="global"``); w_eff = w * m. Backward: straight through the top-k, so through |s|::

    dL/ds = dL/dw_eff * w * sign(s)

The k-th largest |s| is found without a sort: |s| >= 0, so its float32 bit pattern read as an
int32 is monotone in |s|, and 31 steps of bisection on that integer find the exact threshold.
With distinct scores exactly k weights are kept; ties at the threshold are all kept.

Scores start at kaiming_uniform(a=sqrt 5) = U(-1/sqrt(fan_in), 1/sqrt(fan_in)); they are trained
by SGD with momentum and weight decay, cosine-decayed, as the reference recipe.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import optax

from slt_jax.methods.schedules import learning_rate_schedule

Array = jax.Array
GateTree = dict[str, Array]
SCOPES = ("layer", "global")


def kth_largest_threshold(abs_scores: list[Array], k: int | Array) -> Array:
    """The largest t such that at least k of the (non-negative) values are >= t, as float32."""
    bits = [jax.lax.bitcast_convert_type(a.astype(jnp.float32), jnp.int32) for a in abs_scores]

    def count_at_least(t):
        return sum(jnp.sum(b >= t, dtype=jnp.int32) for b in bits)

    def body(_, lo_hi):
        lo, hi = lo_hi  # invariant: count(>= lo) >= k, count(>= hi) < k
        mid = lo + (hi - lo) // 2
        ok = count_at_least(mid) >= k
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

    lo, _ = jax.lax.fori_loop(0, 32, body, (jnp.int32(0), jnp.int32(0x7F800001)))
    return jax.lax.bitcast_convert_type(lo, jnp.float32)


def top_k_masks(scores: GateTree, density: float, scope: str = "layer") -> GateTree:
    """Bool masks keeping round(density * n) largest |scores| per leaf, or over all leaves."""
    if scope == "layer":
        out = {}
        for name, s in scores.items():
            k = max(1, round(density * s.size))
            out[name] = jnp.abs(s) >= kth_largest_threshold([jnp.abs(s)], k)
        return out
    total = sum(s.size for s in scores.values())
    t = kth_largest_threshold([jnp.abs(s) for s in scores.values()], max(1, round(density * total)))
    return {name: jnp.abs(s) >= t for name, s in scores.items()}


@dataclasses.dataclass(frozen=True)
class EdgePopup:
    num_steps: int
    sparsity: float = 0.5
    scope: str = "layer"
    learning_rate: float = 0.1
    lr_schedule: str = "cosine"
    warmup_steps: int = 0
    momentum: float = 0.9
    weight_decay: float = 1e-4
    name: str = "edgepopup"

    def __post_init__(self):
        if self.scope not in SCOPES:
            raise ValueError(f"unknown edge-popup scope {self.scope!r}; allowed: {', '.join(SCOPES)}")

    @classmethod
    def from_config(cls, config: Any, weights_per_gate: dict[str, float] | None = None) -> "EdgePopup":
        # Top-k counts gates. Within one leaf every gate removes the same number of weights, so
        # per layer a fraction of gates is that fraction of weights; ``weights_per_gate`` is unused.
        del weights_per_gate
        c = config.edgepopup
        return cls(num_steps=config.num_steps, sparsity=config.sparsity, scope=c.scope,
                   learning_rate=config.learning_rate, lr_schedule=config.lr_schedule,
                   warmup_steps=config.get("warmup_steps", 0),
                   momentum=c.momentum, weight_decay=c.weight_decay)

    def init(self, key: Array, shapes: dict[str, tuple[int, ...]]) -> GateTree:
        out = {}
        for i, (name, shape) in enumerate(shapes.items()):
            bound = 1.0 / math.sqrt(max(1, math.prod(shape[:-1])))
            out[name] = jax.random.uniform(jax.random.fold_in(key, i), shape, minval=-bound, maxval=bound)
        return out

    def init_state(self) -> dict[str, Array]:
        return {}

    def train_masks(self, gates: GateTree, key: Array, step: Array) -> GateTree:
        del key, step  # deterministic: the mask is recomputed from the scores every forward pass
        hard = top_k_masks(gates, 1.0 - self.sparsity, self.scope)
        # Straight-through: the value is the hard mask, the gradient flows to |s| unchanged. The
        # bracket makes the added term exactly 0; (hard + |s|) - |s| can round 1 to 0.99999994.
        return {n: hard[n].astype(s.dtype) + (jnp.abs(s) - jax.lax.stop_gradient(jnp.abs(s)))
                for n, s in gates.items()}

    def penalty(self, gates: GateTree, state: dict[str, Array], step: Array) -> tuple[Array, dict[str, Array]]:
        return jnp.zeros(()), {}

    def update_state(self, state: dict[str, Array], aux: dict[str, Array]) -> dict[str, Array]:
        return state

    def binary_masks(self, gates: GateTree) -> GateTree:
        return top_k_masks(gates, 1.0 - self.sparsity, self.scope)

    def optimizer(self) -> optax.GradientTransformation:
        lr = learning_rate_schedule(self.lr_schedule, self.learning_rate, self.num_steps, self.warmup_steps)
        return optax.chain(optax.add_decayed_weights(self.weight_decay), optax.sgd(lr, momentum=self.momentum))
