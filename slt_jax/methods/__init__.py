"""Ticket-finding methods on one interface, the ``Method`` protocol.

A method owns a gate tree (gate logits, or scores), shaped like the parameters with None where a
leaf is not gated, and knows neither the model nor the data. Any training loop, ours
(``slt_jax.step.make_train_step``) or a researcher's own, calls, per step::

    masks   = method.train_masks(gates, key, step)        # differentiable w.r.t. gates
    logits  = apply_fn(method.masked_params(frozen, masks), x)   # mostly apply_masks(frozen, masks)
    loss    = CE(logits, y) + penalty,  penalty, aux = method.penalty(gates, state, step)
    gates   <- optax update of grad(loss) w.r.t. gates
    state   = method.update_state(state, aux)              # e.g. the multiplier lambda

and for every evaluation and the final ticket ``method.binary_masks(gates)`` (bool arrays).
Skipping ``penalty`` or ``update_state`` silently drops CRBG's sparsity target. IteRand also
re-draws pruned weights between steps (``is_redraw_step``, ``redraw``).

Each method's dataclass defaults are the recipe ``run.py`` uses: ``configs/default.py`` reads
its sub-config (``crbg``, ``edgepopup``, ``supermask``, ``biprop``, ``iterand``) and the learning rate from these classes.
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Protocol

import jax
import optax

from slt_jax.methods.biprop import Biprop
from slt_jax.methods.crbg import CRBG
from slt_jax.methods.edgepopup import EdgePopup
from slt_jax.methods.iterand import IteRand
from slt_jax.methods.supermask import Supermask

Array = jax.Array
GateTree = Any  # params-shaped: an array per gated leaf, None elsewhere


class Method(Protocol):
    """What a ticket-finding method provides (see the module docstring for the loop)."""

    name: str
    num_steps: int
    sparsity: float
    # None: the network computes with the frozen weights; else a name in slt_jax.frozen.MASKED_WEIGHTS,
    # which the ticket records so that frozen_params() replays it (biprop: "binarized").
    ticket_weights: ClassVar[str | None]

    def init(self, key: Array, shapes: Any) -> GateTree:
        """Initial gate parameters for the template ``slt_jax.masking.gate_shapes`` returns."""

    def init_state(self, gates: GateTree | None = None) -> dict[str, Any]:
        """The method's own state for ``gates``, a dict of arrays; may be empty. CRBG and Supermask:
        the multiplier (scalars, ``gates`` unused); IteRand: each weight's generation (needs ``gates``)."""

    def train_masks(self, gates: GateTree, key: Array, step: Array) -> GateTree:
        """Masks for one training forward pass, differentiable w.r.t. ``gates``."""

    def penalty(self, gates: GateTree, state: dict[str, Array], step: Array) -> tuple[Array, dict[str, Array]]:
        """The term added to the loss, and scalars for ``update_state`` and the logs."""

    def update_state(self, state: dict[str, Array], aux: dict[str, Array]) -> dict[str, Array]:
        """The state after one step, from the ``aux`` that ``penalty`` returned."""

    def masked_params(self, params: Any, masks: GateTree) -> Any:
        """The params the network computes with under ``masks``: ``apply_masks(params, masks)``, or
        for biprop the kept weights binarised (``slt_jax.frozen.binarized_weights``)."""

    def binary_masks(self, gates: GateTree) -> GateTree:
        """The ticket: bool masks shaped like ``gates``."""

    def optimizer(self) -> optax.GradientTransformation:
        """The recipe's optimiser for the gates (any Optax optimiser may be used instead)."""

    # A method that re-draws weights during the search (IteRand) also has ``is_redraw_step(step)``
    # and ``redraw(key, gates, state, params, candidate, event) -> (state, params)``, which a loop
    # calls between steps (``slt_jax.methods.iterand``); the others have neither.


METHODS: dict[str, type] = {"crbg": CRBG, "edgepopup": EdgePopup, "supermask": Supermask, "biprop": Biprop,
                             "iterand": IteRand}
# Fields the harness sets itself; the rest of each dataclass's fields are its config sub-dict.
_HARNESS_FIELDS = ("num_steps", "sparsity", "learning_rate", "lr_schedule", "warmup_steps", "param_shapes", "name")


def method_hyperparameters(name: str) -> dict[str, Any]:
    """The method's own hyperparameters and their defaults: its config sub-dict (``config.<name>``)."""
    return {f.name: f.default for f in dataclasses.fields(METHODS[name]) if f.name not in _HARNESS_FIELDS}


def create_method(config: Any, *, num_steps: int, warmup_steps: int = 0, param_shapes: Any = None) -> Method:
    """Builds the method named ``config.method`` from a run config and the resolved step counts.

    ``config.learning_rate`` / ``config.lr_schedule`` of None mean the method's default.
    ``param_shapes`` (the gated model's parameters, or their shapes) lets CRBG's densities count
    weights rather than gates; edge-popup's per-leaf top-k needs no such weighting.
    """
    if config.method not in METHODS:
        raise ValueError(f"unknown method {config.method!r}; allowed: {', '.join(sorted(METHODS))}")
    cls = METHODS[config.method]
    kwargs = config[config.method].to_dict()
    for key in ("learning_rate", "lr_schedule"):
        if config.get(key) is not None:
            kwargs[key] = config[key]
    if "param_shapes" in {f.name for f in dataclasses.fields(cls)}:
        kwargs["param_shapes"] = param_shapes
    return cls(num_steps=num_steps, sparsity=config.sparsity, warmup_steps=warmup_steps, **kwargs)


__all__ = ["Biprop", "CRBG", "EdgePopup", "IteRand", "METHODS", "Method", "Supermask", "create_method", "method_hyperparameters"]
