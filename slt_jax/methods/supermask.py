"""Supermask (Zhou, Lan, Liu & Yosinski, NeurIPS 2019, "Deconstructing Lottery Tickets").

Each gated weight has a score s. Training samples a Bernoulli mask with a straight-through
gradient to the keep probability p = sigmoid(s)::

    m = 1[u < p] + p - stop_gradient(p),   u ~ U(0, 1)      (value: m in {0, 1}; dm/ds = p (1 - p))

The reference code (uber-research/deconstructing-lottery-tickets) starts every score at 0
(p = 1/2), trains them by plain SGD with learning rate 100, and samples the mask at test time
too. Our ticket is deterministic: keep a weight iff p > 1/2, i.e. s > 0, so it is one fixed
network, evaluated binary like every other method's.

The paper does not control sparsity (its masks keep about half the weights):
``sparsity_control="none"``. ``"dual"`` (the default, so ``--config.sparsity`` means what it means
for CRBG) adds lambda * (mean p - d_target) to the loss, lambda being the PI multiplier CRBG uses
(``slt_jax.methods.multiplier``), answering to the binary ticket's density.
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import optax

from slt_jax import gates as gates_lib
from slt_jax import masking
from slt_jax import threefry
from slt_jax.methods.multiplier import init_multiplier, update_multiplier
from slt_jax.methods.schedules import learning_rate_schedule

Array = jax.Array
GateTree = Any  # params-shaped: an array per gated leaf, None elsewhere
SPARSITY_CONTROLS = ("dual", "none")


@dataclasses.dataclass(frozen=True)
class Supermask:
    """Supermask over a gate tree of scores; see the module docstring."""

    num_steps: int
    sparsity: float = 0.5
    sparsity_control: str = "dual"
    score_init: float = 0.0
    lam: float = 0.0
    dual_lr: float = 0.05
    dual_kp: float = 100.0
    learning_rate: float = 100.0
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    name: str = "supermask"
    ticket_weights: ClassVar[str | None] = None  # the ticket computes with the frozen weights themselves

    def __post_init__(self):
        if self.sparsity_control not in SPARSITY_CONTROLS:
            raise ValueError(f"unknown supermask sparsity_control {self.sparsity_control!r}; "
                             f"allowed: {', '.join(SPARSITY_CONTROLS)}")

    def init(self, key: Array, shapes: Any) -> GateTree:
        """Every score at ``score_init`` (the reference: 0, a keep probability of 1/2)."""
        del key  # the Bernoulli samples break the symmetry
        return jax.tree.map(lambda s: jnp.full(s.shape, self.score_init, jnp.float32), shapes)

    def init_state(self, gates: GateTree | None = None) -> dict[str, Array]:
        """The multiplier (unused with ``sparsity_control="none"``)."""
        return init_multiplier(self.lam)

    def train_masks(self, gates: GateTree, key: Array, step: Array) -> GateTree:
        """A Bernoulli(sigmoid(s)) sample, straight-through to sigmoid(s)."""
        del step

        def sample(k, s):
            p = jax.nn.sigmoid(s)
            hard = (threefry.uniform(k, s.shape) < p).astype(s.dtype)
            return hard + (p - jax.lax.stop_gradient(p))

        return jax.tree.map(sample, gates_lib.leaf_keys(key, gates), gates)

    def penalty(self, gates: GateTree, state: dict[str, Array], step: Array) -> tuple[Array, dict[str, Array]]:
        """``lambda (mean sigmoid(s) - d_target)`` with ``"dual"``; 0 with ``"none"``."""
        density = gates_lib.gate_mean(jax.tree.map(jax.nn.sigmoid, gates))
        binary = gates_lib.gate_mean(self.binary_masks(gates))
        aux = {"expected_density": density, "binary_density": binary, "lambda": state["lambda"]}
        if self.sparsity_control == "none":
            return jnp.zeros(()), aux
        return state["lambda"] * (density - (1.0 - self.sparsity)), aux

    def update_state(self, state: dict[str, Array], aux: dict[str, Array]) -> dict[str, Array]:
        """One step of the multiplier's controller (``"none"``: unchanged)."""
        if self.sparsity_control == "none":
            return state
        return update_multiplier(state, aux["binary_density"] - (1.0 - self.sparsity), self.dual_lr, self.dual_kp)

    def masked_params(self, params: Any, masks: GateTree) -> Any:
        """``params`` times ``masks`` on gated leaves (``slt_jax.masking.apply_masks``)."""
        return masking.apply_masks(params, masks)

    def binary_masks(self, gates: GateTree) -> GateTree:
        """The ticket: keep a weight iff sigmoid(s) > 1/2, i.e. s > 0."""
        return jax.tree.map(lambda s: s > 0, gates)

    def optimizer(self) -> optax.GradientTransformation:
        """Plain SGD, as the reference (learning rate 100)."""
        return optax.sgd(learning_rate_schedule(self.lr_schedule, self.learning_rate, self.num_steps,
                                                self.warmup_steps))
