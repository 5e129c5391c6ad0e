"""CRBG: continuously relaxed Bernoulli gates (Tsayag & Lindenbaum 2026).

Loss, with d = mean over gates of P(z > 0) (the expected density, see ``slt_jax.gates``)::

    L = CE(f(x; W0 * z)) + lambda * (d - d_target) + beta_t * mean g (1 - g)

Densities count weights: a gate weighs as many weights as it removes (``weights_per_gate``; 1
per gate unstructured, a unit's fan-in structured), so ``sparsity`` means the fraction of gated
weights removed either way.

* ``lambda_mode="dual"``: the ticket's density b (the fraction of weights the binary rule keeps)
  must not exceed d_target = 1 - sparsity, and lambda >= 0 is the multiplier. b is piecewise
  constant in the gates, so the gates' gradient comes from the smooth expected density d (a
  proxy constraint, Cotter et al. 2019; Gallego-Posada et al. 2022) while the multiplier answers
  to b itself, so the ticket lands on the requested sparsity rather than on a surrogate of it.
  The multiplier is a PI controller of the violation e = b - d_target
  (``slt_jax.methods.multiplier``); with ``dual_kp = 0`` (plain dual ascent) it overshot the
  target by several points.
  ``"fixed"``: lambda = ``lam`` throughout (d_target only shifts the loss).
* The temperature (sigma for the Gaussian gate) anneals geometrically from ``temp_start`` to
  ``temp_end``: less noise late in training lets gates settle.
* The decision term (g = deterministic gate) ramps linearly from 0 to ``decision_weight`` over
  the second half of training; it pushes gates to exactly 0 or 1 so that the binary ticket
  computes what the trained stochastic network computed.
* The ticket (``binary_rule``): ``"threshold"`` keeps a weight iff its deterministic gate exceeds
  1/2; ``"rank"`` keeps the round((1 - sparsity) n) gates with the largest parameters over all
  gated leaves (counting gates, so meant for one gate per weight), which hits the target exactly.
  The multiplier answers to the threshold rule's density either way.

Only the gate parameters are optimised, by Adam. The defaults are the recipe ``run.py`` uses
(``configs/default.py`` reads them from this class).
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import optax

from slt_jax import gates as gates_lib
from slt_jax import masking
from slt_jax.methods.edgepopup import top_k_masks
from slt_jax.methods.multiplier import init_multiplier, update_multiplier
from slt_jax.methods.schedules import learning_rate_schedule

Array = jax.Array
GateTree = Any  # params-shaped: an array per gated leaf, None elsewhere
LAMBDA_MODES = ("dual", "fixed")
BINARY_RULES = ("threshold", "rank")


@dataclasses.dataclass(frozen=True)
class CRBG:
    """CRBG over a gate tree of mu (Gaussian family) or logits; see the module docstring.

    ``num_steps`` sets the temperature anneal, the decision term's ramp and the learning-rate
    schedule. ``weights_per_gate`` (``slt_jax.masking.weights_per_gate``, shaped like the gates)
    makes densities count weights for structured gates; None counts gates.
    """

    num_steps: int
    sparsity: float = 0.9
    family: str = "gaussian"
    lambda_mode: str = "dual"
    lam: float = 0.0
    dual_lr: float = 0.05
    dual_kp: float = 100.0
    temp_start: float = 0.5
    temp_end: float = 0.5  # no anneal by default: the penalty keeps its gradient for open gates
    decision_weight: float = 1.0
    binary_rule: str = "threshold"
    learning_rate: float = 0.05
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    weights_per_gate: Any = dataclasses.field(default=None, compare=False)
    name: str = "crbg"
    ticket_weights: ClassVar[str | None] = None  # the ticket computes with the frozen weights themselves

    def __post_init__(self):
        gates_lib.get_family(self.family)
        if self.lambda_mode not in LAMBDA_MODES:
            raise ValueError(f"unknown lambda_mode {self.lambda_mode!r}; allowed: {', '.join(LAMBDA_MODES)}")
        if self.binary_rule not in BINARY_RULES:
            raise ValueError(f"unknown binary_rule {self.binary_rule!r}; allowed: {', '.join(BINARY_RULES)}")
        if not (self.temp_start > 0 and self.temp_end > 0):
            raise ValueError(f"temperatures must be > 0, got temp_start={self.temp_start}, temp_end={self.temp_end}")

    def temp(self, step: Array) -> Array:
        """The gate temperature (sigma for the Gaussian gate) at ``step``: geometric anneal."""
        frac = jnp.clip(step / max(self.num_steps - 1, 1), 0.0, 1.0)
        return self.temp_start * (self.temp_end / self.temp_start) ** frac

    def init(self, key: Array, shapes: Any) -> GateTree:
        """Gate parameters for ``shapes`` (``slt_jax.masking.gate_shapes``): mu ~ 0.5 + 0.01 N(0, 1)."""
        return gates_lib.init_gates(key, shapes, family=self.family)

    def init_state(self, gates: GateTree | None = None) -> dict[str, Array]:
        """The multiplier: ``lambda`` and its controller's ``integral``, both ``lam`` at the start."""
        return init_multiplier(self.lam)

    def train_masks(self, gates: GateTree, key: Array, step: Array) -> GateTree:
        """One noisy gate sample z in [0, 1] per gate (differentiable w.r.t. the gates)."""
        return gates_lib.sample_gates(key, gates, self.temp(step), family=self.family)

    def penalty(self, gates: GateTree, state: dict[str, Array], step: Array) -> tuple[Array, dict[str, Array]]:
        """``lambda (d - d_target) + beta_t indecision`` and the values ``update_state`` and logs need."""
        density = gates_lib.expected_density(gates, self.temp(step), family=self.family, weights=self.weights_per_gate)
        indecision = gates_lib.indecision(gates, family=self.family)
        ramp = jnp.clip(2.0 * step / max(self.num_steps, 1) - 1.0, 0.0, 1.0)
        total = state["lambda"] * (density - (1.0 - self.sparsity)) + self.decision_weight * ramp * indecision
        binary = gates_lib.weighted_density(gates_lib.binary_mask(gates, family=self.family), self.weights_per_gate)
        return total, {"expected_density": density, "binary_density": binary, "indecision": indecision,
                       "lambda": state["lambda"], "temp": self.temp(step)}

    def update_state(self, state: dict[str, Array], aux: dict[str, Array]) -> dict[str, Array]:
        """One step of the multiplier's PI controller on the binary density (``fixed``: unchanged)."""
        if self.lambda_mode == "fixed":
            return state
        return update_multiplier(state, aux["binary_density"] - (1.0 - self.sparsity), self.dual_lr, self.dual_kp)

    def masked_params(self, params: Any, masks: GateTree) -> Any:
        """``params`` times ``masks`` on gated leaves (``slt_jax.masking.apply_masks``)."""
        return masking.apply_masks(params, masks)

    def binary_masks(self, gates: GateTree) -> GateTree:
        """The ticket (bool, shaped like ``gates``): deterministic gate > 1/2, or the top-ranked gates."""
        if self.binary_rule == "threshold":
            return gates_lib.binary_mask(gates, family=self.family)
        # Every family's deterministic gate rises with its parameter, so rank the parameters
        # (shifted to >= 0, which the bisection on float bits needs; the order is unchanged).
        low = min(jnp.min(g) for g in jax.tree.leaves(gates))
        return top_k_masks(jax.tree.map(lambda g: g - low, gates), 1.0 - self.sparsity, "global")

    def optimizer(self) -> optax.GradientTransformation:
        """The recipe's optimiser for the gates: Adam with the learning-rate schedule."""
        return optax.adam(learning_rate_schedule(self.lr_schedule, self.learning_rate, self.num_steps, self.warmup_steps))
