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
  The multiplier is a PI controller of the violation e = b - d_target (Sohrabi et al. 2024)::

      I <- max(0, I + dual_lr * e),    lambda = max(0, I + dual_kp * e)

  ``dual_kp = 0`` is plain projected dual ascent; the proportional term lets lambda fall as soon
  as the density undershoots, instead of after the integral has unwound, which is what made
  plain dual ascent overshoot the target by several points.
  ``"fixed"``: lambda = ``lam`` throughout (d_target only shifts the loss).
* The temperature (sigma for the Gaussian gate) anneals geometrically from ``temp_start`` to
  ``temp_end``: less noise late in training lets gates settle.
* The decision term (g = deterministic gate) ramps linearly from 0 to ``decision_weight`` over
  the second half of training; it pushes gates to exactly 0 or 1 so that the binary ticket
  computes what the trained stochastic network computed.

Only the gate parameters are optimised, by Adam.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax

from slt_jax import gates as gates_lib
from slt_jax.methods.schedules import learning_rate_schedule

Array = jax.Array
GateTree = dict[str, Array]
LAMBDA_MODES = ("dual", "fixed")


@dataclasses.dataclass(frozen=True)
class CRBG:
    num_steps: int
    sparsity: float = 0.9
    family: str = "gaussian"
    lambda_mode: str = "dual"
    lam: float = 0.0
    dual_lr: float = 0.05
    dual_kp: float = 0.0
    temp_start: float = 0.5
    temp_end: float = 0.5
    decision_weight: float = 0.0
    learning_rate: float = 0.01
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    weights_per_gate: dict[str, float] | None = None
    name: str = "crbg"

    def __post_init__(self):
        gates_lib.get_family(self.family)
        if self.lambda_mode not in LAMBDA_MODES:
            raise ValueError(f"unknown lambda_mode {self.lambda_mode!r}; allowed: {', '.join(LAMBDA_MODES)}")
        if not (self.temp_start > 0 and self.temp_end > 0):
            raise ValueError(f"temperatures must be > 0, got temp_start={self.temp_start}, temp_end={self.temp_end}")

    @classmethod
    def from_config(cls, config: Any, weights_per_gate: dict[str, float] | None = None) -> "CRBG":
        c = config.crbg
        return cls(num_steps=config.num_steps, sparsity=config.sparsity, family=c.family,
                   lambda_mode=c.lambda_mode, lam=c.lam, dual_lr=c.dual_lr, dual_kp=c.dual_kp, temp_start=c.temp_start,
                   temp_end=c.temp_end, decision_weight=c.decision_weight,
                   learning_rate=config.learning_rate, lr_schedule=config.lr_schedule,
                   warmup_steps=config.get("warmup_steps", 0),
                   weights_per_gate=weights_per_gate)

    def temp(self, step: Array) -> Array:
        frac = jnp.clip(step / max(self.num_steps - 1, 1), 0.0, 1.0)
        return self.temp_start * (self.temp_end / self.temp_start) ** frac

    def init(self, key: Array, shapes: dict[str, tuple[int, ...]]) -> GateTree:
        return gates_lib.init_gates(key, shapes, self.family)

    def init_state(self) -> dict[str, Array]:
        # Two separate buffers: the train step donates its state, and one buffer cannot be donated twice.
        return {"lambda": jnp.full((), self.lam, jnp.float32), "integral": jnp.full((), self.lam, jnp.float32)}

    def train_masks(self, gates: GateTree, key: Array, step: Array) -> GateTree:
        return gates_lib.sample_gates(key, gates, self.temp(step), self.family)

    def penalty(self, gates: GateTree, state: dict[str, Array], step: Array) -> tuple[Array, dict[str, Array]]:
        density = gates_lib.expected_density(gates, self.temp(step), self.family, self.weights_per_gate)
        indecision = gates_lib.indecision(gates, self.family)
        ramp = jnp.clip(2.0 * step / max(self.num_steps, 1) - 1.0, 0.0, 1.0)
        total = state["lambda"] * (density - (1.0 - self.sparsity)) + self.decision_weight * ramp * indecision
        binary = gates_lib.weighted_density(self.binary_masks(gates), self.weights_per_gate)
        return total, {"expected_density": density, "binary_density": binary, "indecision": indecision,
                       "lambda": state["lambda"], "temp": self.temp(step)}

    def update_state(self, state: dict[str, Array], aux: dict[str, Array]) -> dict[str, Array]:
        if self.lambda_mode == "fixed":
            return state
        violation = aux["binary_density"] - (1.0 - self.sparsity)
        integral = jnp.maximum(0.0, state["integral"] + self.dual_lr * violation)
        return {"lambda": jnp.maximum(0.0, integral + self.dual_kp * violation), "integral": integral}

    def binary_masks(self, gates: GateTree) -> GateTree:
        return gates_lib.binary_mask(gates, self.family)

    def optimizer(self) -> optax.GradientTransformation:
        return optax.adam(learning_rate_schedule(self.lr_schedule, self.learning_rate, self.num_steps, self.warmup_steps))
