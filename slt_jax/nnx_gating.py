"""``GatedModel(model, method)``: any Flax NNX model, with its weights frozen and ``Gate`` variables.

The NNX counterpart of ``slt_jax.gated`` (Linen), and the same pattern as NNX's own LoRA: the
trainable state is a variable type of its own, ``Gate``, that an optimiser selects with
``wrt=Gate``; the model's ``nnx.Param`` weights are never differentiated nor updated.

Data flow of one call ``gated(x, key=k, step=t)``::

    graphdef, W, rest = nnx.split(model, nnx.Param, ...)       # W: the frozen weights
    m      = method.train_masks(g, k, t)     with key k (a noisy training sample of the gates g)
           = method.binary_masks(g)          without a key (the ticket: bool, where(m, W, 0))
    W'     = method.masked_params(stop_gradient(W), m)         # = apply_masks(W, m), as with Linen
    logits = nnx.merge(graphdef, W', rest)(x)

``nnx.merge`` reuses ``rest``'s variables, so the model's other state (BatchNorm statistics,
dropout RNG counts) is updated in place as if the model had been called directly; ``W'`` lives in
fresh variables, so the model's own weights are never overwritten. Gates, masks and ``W`` are
plain nested dicts shaped like ``nnx.to_pure_dict(nnx.state(model, nnx.Param))``, with None where a
leaf is not gated: path names (``l1/kernel``) are the Linen ones, so ``policy`` and structured
gating (one gate per output unit that also closes the unit's bias) behave exactly as with Linen.

One step of a ticket search (CRBG's multiplier state ``s`` included)::

    gated = GatedModel(model, method, rngs=nnx.Rngs(1))
    optimizer = nnx.Optimizer(gated, optax.adam(0.05), wrt=Gate)

    def loss_fn(gated):
        ce = cross_entropy(gated(x, key=k, step=t), y)
        penalty, aux = method.penalty(gated.gate_tree(), s, t)
        return ce + penalty, aux

    grads, aux = nnx.grad(loss_fn, argnums=nnx.DiffState(0, Gate), has_aux=True)(gated)
    optimizer.update(gated, grads)
    s = method.update_state(s, aux)

The ticket (``gated.save_ticket(path, {"seed": seed, "input_shape": [...]}, model_factory=MLP)``)
stores the seed and the binary gates; ``slt_jax.load_ticket(path, model_factory=MLP)`` draws the
weights again as ``MLP(nnx.Rngs(seed))``. So the model must be built that way, from the seed the
ticket records: ``save_ticket`` draws it again and refuses weights that differ in any bit.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import numpy as np
from flax import nnx

from slt_jax import masking
from slt_jax.methods import Method

Array = jax.Array
GateTree = Any  # params-shaped: an array per gated leaf, None elsewhere


class Gate(nnx.Variable):
    """A method's gate parameters (CRBG's mu, edge-popup's scores): the only variables a ticket
    search trains. Select them with ``wrt=Gate`` / ``nnx.DiffState(0, Gate)``."""


def _is_gate(x: Any) -> bool:
    return isinstance(x, Gate)


class GatedModel(nnx.Module):
    """An NNX model's frozen weights and a method's gates; see the module docstring.

    Args:
      model: any NNX module; it knows nothing of gates, and its ``nnx.Param`` weights stay frozen.
      method: a ``slt_jax.methods.Method`` (CRBG, EdgePopup, ...).
      rngs: the gates' initialisation key comes from its ``gates`` stream (else its default one;
        an ``nnx.Rngs`` with neither is refused, rather than drawing the gates from the weights' stream).
      policy: regex over parameter path names (default: every kernel).
      structured: one gate per output unit / channel / head; the unit's bias closes with it.
      structured_policy: regex picking the gated leaves that get structured gates ("" = all).
      structured_inputs: regex picking Dense/Conv kernels that get one gate per input feature instead.
    """

    def __init__(self, model: nnx.Module, method: Method, *, rngs: nnx.Rngs, policy: str = masking.DEFAULT_POLICY,
                 structured: bool = False, structured_policy: str = "", structured_inputs: str = ""):
        if "gates" not in rngs and "default" not in rngs:
            raise ValueError("GatedModel: rngs has no 'gates' stream (nor a default one) to draw the gates from; "
                             "allowed: rngs=nnx.Rngs(gates=SEED) or nnx.Rngs(SEED)")
        self.model = model
        self.method = method
        self.structured = structured
        shapes = masking.gate_shapes(self.frozen(), policy, structured, structured_policy, structured_inputs)
        # nnx.data: NNX refuses Variables inside a plain dict attribute unless it is marked as data.
        # tree.map keeps the None leaves, so the stored tree is still shaped like the params.
        self.gates = nnx.data(jax.tree.map(Gate, method.init(rngs.gates(), shapes)))

    def frozen(self) -> masking.Params:
        """The frozen weights, a plain nested dict (``nnx.to_pure_dict`` of the model's ``nnx.Param``s)."""
        return nnx.to_pure_dict(nnx.state(self.model, nnx.Param))

    def gate_tree(self) -> GateTree:
        """The gates as the plain params-shaped tree the ``Method`` functions take (penalty, ...)."""
        return jax.tree.map(lambda g: g[...], self.gates, is_leaf=_is_gate)

    def masks(self, key: Array | None = None, step: int | Array = 0) -> GateTree:
        """A training sample of the masks with ``key``; without one, the binary ticket's masks."""
        gates = self.gate_tree()
        return self.method.binary_masks(gates) if key is None else self.method.train_masks(gates, key, step)

    def __call__(self, *args: Any, key: Array | None = None, step: int | Array = 0, **kwargs: Any) -> Any:
        """The model called on its gated weights. ``key`` samples training masks (at ``step``, which
        sets e.g. CRBG's temperature); without it the binary ticket is applied."""
        graphdef, weights, rest = nnx.split(self.model, nnx.Param, ...)
        # stop_gradient: even a gradient taken w.r.t. nnx.Param is zero for the frozen weights.
        masked = self.method.masked_params(jax.lax.stop_gradient(weights), self.masks(key, step))
        return nnx.merge(graphdef, masked, rest)(*args, **kwargs)

    def save_ticket(self, path: str, meta: dict[str, Any], model_factory: Callable[[nnx.Rngs], nnx.Module], *,
                    coding: str = "packbits") -> None:
        """Writes the binary ticket (``masks()``) to ``path`` with ``slt_jax.save_ticket``: the method,
        the BatchNorm running statistics, and ``"framework": "nnx"``; reload it with
        ``slt_jax.load_ticket(path, model_factory=model_factory)``.

        ``meta`` needs ``seed`` and ``input_shape`` (without the batch axis), as for Linen.
        ``model_factory``: ``rngs -> module``; the gated model must be ``model_factory(nnx.Rngs(seed))``,
        bit for bit (drawn again here; other weights are refused with one line naming a leaf), since
        the ticket regenerates them so. NaN or infinite gates are refused."""
        from slt_jax.ticket import save_ticket
        from slt_jax.ticket.nnx_model import NNXModel

        seed = meta.get("seed")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"GatedModel.save_ticket: meta's seed={seed!r}; required: the integer seed the model was "
                             "built from, model_factory(nnx.Rngs(seed))")
        model = NNXModel(model_factory)
        drawn = masking.named_leaves(model.variables_from_seed(seed)["params"])
        held = masking.named_leaves(jax.device_get(self.frozen()))
        differ = sorted(n for n in held.keys() | drawn.keys()
                        if n not in held or n not in drawn or np.shape(held[n]) != np.shape(drawn[n])
                        or np.asarray(held[n]).tobytes() != np.asarray(drawn[n]).tobytes())
        if differ:
            raise ValueError("GatedModel.save_ticket: the gated weights are not "
                             f"model_factory(nnx.Rngs({seed})) "
                             f"(leaf {differ[0]} differs{f' and {len(differ) - 1} more' if len(differ) > 1 else ''}); "
                             "allowed: the model built as model_factory(nnx.Rngs(seed)) with the seed the ticket "
                             "records")
        stats = nnx.to_pure_dict(nnx.state(self.model, nnx.BatchStat))
        save_ticket(path, {"structured": self.structured, **meta, "framework": "nnx"}, jax.device_get(self.masks()),
                    {"batch_stats": jax.device_get(stats)} if stats else None, coding=coding, model=model,
                    method=self.method, gates=jax.device_get(self.gate_tree()))
