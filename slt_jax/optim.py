"""Optax on a combined variables tree: updates on the gates, never on the frozen weights.

``gates_only(tx)`` wraps any optimiser for a tree ``{"frozen": ..., "gates": ..., ...}`` (what
``slt_jax.gated(...).init`` returns)::

    updates["gates"]  = tx(grads["gates"])
    updates[other]    = -0.0                   (no optimiser state either)

built on ``optax.multi_transform``. ``optax.masked(tx, mask)`` alone would not do: it passes the
unmasked leaves' gradients through unchanged as updates, so frozen weights would move.

``on_gate_tree(t)`` applies a transformation that needs the gates themselves (CRBG's shift onto its
target, its bound on mu) to the gate tree whether it is given alone or inside a variables dict.

``stop_frozen(variables)`` stops gradients at the frozen weights, so ``jax.grad`` over the combined
tree computes no weight gradient at all (XLA removes the dead computation); ``Gated.apply`` does it
itself.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

GATES = "gates"


def _labels(variables: Any) -> dict[str, Any]:
    # Called on the params at init and on the updates at every step: a tree without a "gates"
    # collection would get -0.0 everywhere, a run that trains nothing.
    if not isinstance(variables, Mapping) or GATES not in variables:
        got = (f"a {type(variables).__name__} with keys {list(variables)}" if isinstance(variables, Mapping)
               else f"a {type(variables).__name__}")
        raise ValueError(f"gates_only(tx) got {got}; allowed: a variables dict with a {GATES!r} collection (what "
                         f"slt_jax.gated(...).init returns); for the gate tree alone use tx itself")
    return {name: jax.tree.map(lambda _: GATES if name == GATES else "frozen", tree)
            for name, tree in variables.items()}


def _negative_zero() -> optax.GradientTransformation:
    # optax.set_to_zero, but -0.0: optax.apply_updates adds the update, and w + (-0.0) is w bit for bit
    # for every w, while w + 0.0 turns a frozen -0.0 (e.g. a pruned pretrained weight) into +0.0.
    def update(updates, state, params=None):
        del params
        return jax.tree.map(lambda u: jnp.full_like(u, -0.0), updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def gates_only(tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """``tx`` on the "gates" collection of a variables dict; updates of -0.0 (``apply_updates``
    leaves those leaves bit-identical) and no optimiser state elsewhere. A tree without a "gates"
    key (the gate tree itself, a tuple) is refused with a ValueError at ``init`` and ``update``."""
    return optax.multi_transform({GATES: tx, "frozen": _negative_zero()}, _labels)


def stop_frozen(variables: dict[str, Any]) -> dict[str, Any]:
    """``variables`` with ``jax.lax.stop_gradient`` on every collection but "gates"."""
    return {name: tree if name == GATES else jax.lax.stop_gradient(tree) for name, tree in variables.items()}


def gate_tree(params: Any) -> Any:
    """The gate tree in ``params``: ``params["gates"]`` of a variables dict, else ``params`` itself."""
    return params[GATES] if isinstance(params, Mapping) and GATES in params else params


def on_gate_tree(t: optax.GradientTransformation) -> optax.GradientTransformation:
    """``t`` on the gates of a Linen variables dict (a plain ``dict`` with a "gates" collection; its
    other updates pass unchanged), else on the whole tree (a gate tree, or NNX's state of the ``Gate``
    variables an ``nnx.Optimizer(..., wrt=Gate)`` updates)."""
    def update(updates, state, params=None):
        if isinstance(params, dict) and GATES in params:
            gate_updates, state = t.update(updates[GATES], state, params[GATES])
            return type(updates)({**updates, GATES: gate_updates}), state
        return t.update(updates, state, params)

    def init(params):
        return t.init(params[GATES] if isinstance(params, dict) and GATES in params else params)

    return optax.GradientTransformation(init, update)
