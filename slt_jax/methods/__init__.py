"""Ticket-finding methods on one interface.

A method owns a gate tree (gate logits, or scores) over the gated leaves and knows neither the
model nor the data. The harness in ``slt_jax.train`` calls, per step::

    masks   = method.train_masks(gates, key, step)        # differentiable w.r.t. gates
    penalty, aux = method.penalty(gates, state, step)     # added to the cross-entropy
    state   = method.update_state(state, aux)             # e.g. dual ascent on lambda

and for every evaluation and the final ticket ``method.binary_masks(gates)`` (bool arrays).
"""
from __future__ import annotations

from typing import Any, Protocol

import jax
import optax

from slt_jax.methods.crbg import CRBG
from slt_jax.methods.edgepopup import EdgePopup

Array = jax.Array
GateTree = dict[str, Array]


class Method(Protocol):
    name: str

    def init(self, key: Array, shapes: dict[str, tuple[int, ...]]) -> GateTree: ...
    def init_state(self) -> dict[str, Array]: ...
    def train_masks(self, gates: GateTree, key: Array, step: Array) -> GateTree: ...
    def penalty(self, gates: GateTree, state: dict[str, Array], step: Array) -> tuple[Array, dict[str, Array]]: ...
    def update_state(self, state: dict[str, Array], aux: dict[str, Array]) -> dict[str, Array]: ...
    def binary_masks(self, gates: GateTree) -> GateTree: ...
    def optimizer(self) -> optax.GradientTransformation: ...


METHODS = {"crbg": CRBG, "edgepopup": EdgePopup}


def create_method(config: Any, weights_per_gate: dict[str, float] | None = None) -> Method:
    """Builds the method named ``config.method`` from a run config; ``weights_per_gate`` (from
    ``slt_jax.masking.weights_per_gate``) lets densities count weights rather than gates."""
    if config.method not in METHODS:
        raise ValueError(f"unknown method {config.method!r}; allowed: {', '.join(sorted(METHODS))}")
    return METHODS[config.method].from_config(config, weights_per_gate)
