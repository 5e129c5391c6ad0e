"""Edge-popup (Ramanujan et al., CVPR 2020): top-k scores with a straight-through gradient.

Each gated weight w has a score s. Forward: keep the ``1 - sparsity`` fraction of largest |s| in
each gated leaf (``scope="layer"``, the reference) or over all gated leaves together
(``scope="global"``); w_eff = w * m. Backward: straight through the top-k, so through |s|::

    dL/ds = dL/dw_eff * w * sign(s)

The k-th largest |s| is found without a sort: |s| >= 0, so its float32 bit pattern read as an
int32 is monotone in |s|, and 31 steps of bisection on that integer find the exact threshold.
With distinct scores exactly k weights are kept; ties at the threshold are all kept.

Scores start at kaiming_uniform(a=sqrt 5) = U(-1/sqrt(fan_in), 1/sqrt(fan_in)). A 1-D leaf (a
bias, a norm's scale) is scored on its layer's scale: the fan-in of the kernel beside it, else its
own length, so a global top-k ranks every gated leaf on one scale. Scores are trained by SGD with
momentum and weight decay, cosine-decayed, as the reference recipe; these are the defaults, and
the recipe ``run.py`` uses (``configs/default.py`` reads them from this class).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import optax

from slt_jax import masking
from slt_jax.methods.schedules import learning_rate_schedule

Array = jax.Array
GateTree = Any  # params-shaped: an array per gated leaf, None elsewhere
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
        return jax.tree.map(lambda s: jnp.abs(s) >= kth_largest_threshold([jnp.abs(s)], max(1, round(density * s.size))),
                            scores)
    leaves = jax.tree.leaves(scores)
    total = sum(s.size for s in leaves)
    t = kth_largest_threshold([jnp.abs(s) for s in leaves], max(1, round(density * total)))
    return jax.tree.map(lambda s: jnp.abs(s) >= t, scores)


def _score_bounds(shapes: Any) -> dict[str, float]:
    """1/sqrt(fan_in) per gated leaf; a 1-D leaf takes its sibling kernel's fan-in, else its length."""
    named = {name: tuple(s.shape) for name, s in masking.named_leaves(shapes).items()}

    def fan_in(name, shape):
        if len(shape) >= 2:
            return math.prod(shape[:-1])
        kernel = named.get(name.rpartition("/")[0] + "/kernel" if "/" in name else "kernel")
        return math.prod(kernel[:-1]) if kernel and len(kernel) >= 2 else shape[0]

    return {name: 1.0 / math.sqrt(max(1, fan_in(name, shape))) for name, shape in named.items()}


@dataclasses.dataclass(frozen=True)
class EdgePopup:
    """Edge-popup over a gate tree of scores; see the module docstring. ``num_steps`` sets the
    learning-rate schedule."""

    num_steps: int
    sparsity: float = 0.5
    scope: str = "layer"
    learning_rate: float = 0.1
    lr_schedule: str = "cosine"
    warmup_steps: int = 0
    momentum: float = 0.9
    weight_decay: float = 1e-4
    name: str = "edgepopup"
    ticket_weights: ClassVar[str | None] = None  # the ticket computes with the frozen weights themselves

    def __post_init__(self):
        if self.scope not in SCOPES:
            raise ValueError(f"unknown edge-popup scope {self.scope!r}; allowed: {', '.join(SCOPES)}")

    def init(self, key: Array, shapes: Any) -> GateTree:
        """Scores for ``shapes`` (``slt_jax.masking.gate_shapes``): U(-b, b), b = 1/sqrt(fan_in)."""
        bounds = _score_bounds(shapes)
        index = {name: i for i, name in enumerate(bounds)}  # leaf i draws from fold_in(key, i)

        def init_leaf(path, s):
            name = masking.path_name(path)
            return jax.random.uniform(jax.random.fold_in(key, index[name]), s.shape, minval=-bounds[name],
                                      maxval=bounds[name])

        return jax.tree_util.tree_map_with_path(init_leaf, shapes)

    def init_state(self, gates: GateTree | None = None) -> dict[str, Array]:
        """No state: the top-k needs none."""
        return {}

    def train_masks(self, gates: GateTree, key: Array, step: Array) -> GateTree:
        """The hard top-k mask in the forward pass, straight-through to |s| in the backward pass."""
        del key, step  # deterministic: the mask is recomputed from the scores every forward pass
        hard = top_k_masks(gates, 1.0 - self.sparsity, self.scope)
        # Straight-through: the value is the hard mask, the gradient flows to |s| unchanged. The
        # bracket makes the added term exactly 0; (hard + |s|) - |s| can round 1 to 0.99999994.
        return jax.tree.map(lambda m, s: m.astype(s.dtype) + (jnp.abs(s) - jax.lax.stop_gradient(jnp.abs(s))),
                            hard, gates)

    def penalty(self, gates: GateTree, state: dict[str, Array], step: Array) -> tuple[Array, dict[str, Array]]:
        """None: the top-k fixes the sparsity."""
        return jnp.zeros(()), {}

    def update_state(self, state: dict[str, Array], aux: dict[str, Array]) -> dict[str, Array]:
        """Unchanged (no state)."""
        return state

    def masked_params(self, params: Any, masks: GateTree) -> Any:
        """``params`` times ``masks`` on gated leaves (``slt_jax.masking.apply_masks``)."""
        return masking.apply_masks(params, masks)

    def binary_masks(self, gates: GateTree) -> GateTree:
        """The ticket: the same top-k as the forward pass (bool, shaped like ``gates``)."""
        return top_k_masks(gates, 1.0 - self.sparsity, self.scope)

    def optimizer(self) -> optax.GradientTransformation:
        """The recipe's optimiser for the scores: SGD with momentum and weight decay, scheduled."""
        lr = learning_rate_schedule(self.lr_schedule, self.learning_rate, self.num_steps, self.warmup_steps)
        return optax.chain(optax.add_decayed_weights(self.weight_decay), optax.sgd(lr, momentum=self.momentum))
