"""The method's penalty and multiplier inside an Optax transformation, as jaxpruner's ``wrap_optax``.

``with_penalty(method, tx)`` is a ``GradientTransformation`` over the gate tree. Each update, at
the gates g before the step and its own step count t::

    penalty, aux = method.penalty(g, s, t)                 # CRBG: lambda (d - d_target) + beta_t indecision
    updates      = tx(grads + d penalty / d g)             # grads: the data loss's gradient alone
    s            = method.update_state(s, aux)             # CRBG: the multiplier's PI controller on b
    t            = t + 1

so a loop's loss is the data loss and the loop cannot forget the penalty or the multiplier's
update: both live in the optimiser state (``PenaltyState``). The sum is the one the explicit form
(``loss = CE + method.penalty(...)``, then ``method.update_state``) differentiates, so both forms
give the same ticket. ``params`` (the third argument of ``update``) is required: the penalty is a
function of the gates. It may be the gate tree itself, or a variables dict holding it under
"gates" (``slt_jax.gated(...).init``'s, whole or as ``slt_jax.gates_only`` hands it on); the
penalty's gradient then goes to "gates" only.

Methods whose penalty is zero (edge-popup, biprop) pass the gradient through unchanged. IteRand is
refused: its state is each weight's generation, which the loop's re-draw updates, not the optimiser.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from slt_jax.optim import gate_tree

class PenaltyState(NamedTuple):
    """What ``with_penalty`` carries: its update count, the method's state (CRBG: ``lambda`` and its
    controller's ``integral``), the last update's ``aux`` (densities, lambda, temperature: the
    values a log wants) and the inner optimiser's state."""

    step: jax.Array
    method_state: dict[str, jax.Array]
    aux: dict[str, jax.Array]
    inner: optax.OptState


def _added(updates: Any, grads: Any) -> Any:
    # Leaf by leaf in the updates' own structure: a gradient through nnx.State containers can come
    # back with other container types around the same leaves, in the same order.
    leaves, treedef = jax.tree.flatten(updates)
    return treedef.unflatten([u + g.astype(u.dtype) for u, g in zip(leaves, jax.tree.leaves(grads), strict=True)])


def with_penalty(method: Any, tx: optax.GradientTransformation | None = None) -> optax.GradientTransformation:
    """``tx`` (default: ``method.optimizer()``, the recipe's) with ``method``'s penalty gradient added
    and its state carried; see the module docstring. A ``tx`` of your own replaces the whole recipe
    optimiser: CRBG's ``constraints()`` (the shift onto the target that makes its default land, the
    bound on mu) follow it only as ``optax.chain(tx, *method.constraints())``.

    Raises:
      ValueError: for IteRand (its state is the weights' generations; use ``tx`` with the explicit form).
    """
    if hasattr(method, "redraw"):
        raise ValueError(f"with_penalty({method.name}): its state is each weight's generation, which the loop's "
                         "re-draw updates, and it adds no penalty; allowed: methods whose state is the penalty's "
                         "(crbg, supermask) or empty (edgepopup, biprop)")
    inner = method.optimizer() if tx is None else tx

    def init(params: Any) -> PenaltyState:
        gates = gate_tree(params)
        method_state = method.init_state(gates)
        step = jnp.zeros((), jnp.int32)
        aux_shapes = jax.eval_shape(lambda g, s: method.penalty(g, s, step)[1], gates, method_state)
        aux = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), aux_shapes)
        return PenaltyState(step, method_state, aux, inner.init(params))

    def update(updates: Any, state: PenaltyState, params: Any = None) -> tuple[Any, PenaltyState]:
        if params is None:
            raise ValueError("with_penalty's update needs params (the gates): tx.update(grads, opt_state, gates)")
        # Differentiated w.r.t. all of params (zero outside "gates"), so the gradient has the updates' structure.
        (_, aux), grads = jax.value_and_grad(lambda p: method.penalty(gate_tree(p), state.method_state, state.step),
                                             has_aux=True)(params)
        updates, inner_state = inner.update(_added(updates, grads), state.inner, params)
        return updates, PenaltyState(state.step + 1, method.update_state(state.method_state, aux), aux, inner_state)

    return optax.GradientTransformation(init, update)


def penalty_state(opt_state: Any) -> PenaltyState | None:
    """The ``PenaltyState`` inside an optimiser state (``with_penalty``'s, alone or within
    ``optax.chain``, ``gates_only``, ...), or None if the optimiser carries no method."""
    found = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda s: isinstance(s, PenaltyState))
             if isinstance(s, PenaltyState)]
    return found[0] if found else None
