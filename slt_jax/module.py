"""``gated(module, method)``: any Flax Linen module, with its weights frozen and a gate collection.

The wrapped module's variables are ``{"frozen": params, "gates": gate tree, **other collections}``::

    variables = g.init(key, x)                        # frozen = module.init(key, x)["params"]
    logits = g.apply(variables, x, rngs={"gates": k}, step=t)   # a training sample of the gates
    logits = g.apply(variables, x)                    # the binary ticket: where(mask, frozen, 0)

``apply`` computes ``module.apply({"params": method.masked_params(frozen, masks), **other}, x)``
(``apply_masks(frozen, masks)`` for every method but biprop). It stops
gradients at "frozen" (so ``jax.grad`` over all variables computes no weight gradient), and
refuses to make "frozen" or "gates" mutable. The module itself knows nothing of gates. Pair it
with ``slt_jax.gates_only(tx)`` for an optimiser over the whole variables tree, or differentiate
``variables["gates"]`` alone.
"""
from __future__ import annotations

from typing import Any

import jax

from slt_jax import masking
from slt_jax.optim import stop_frozen

FROZEN, GATES = "frozen", "gates"


class Gated:
    """A Linen module's frozen weights and a method's gates; see the module docstring."""

    def __init__(self, module: Any, method: Any, policy: str = masking.DEFAULT_POLICY, structured: bool = False,
                 structured_policy: str = "", structured_inputs: str = ""):
        self.module = module
        self.method = method
        self.policy = policy
        self.structured = structured
        self.structured_policy = structured_policy
        self.structured_inputs = structured_inputs

    def init(self, rngs: jax.Array | dict[str, jax.Array], *args: Any, **kwargs: Any) -> dict[str, Any]:
        """Variables ``{"frozen", "gates", ...}``. ``rngs``: ``{"params": k1, "gates": k2}``, or one
        key k: the weights are then exactly ``module.init(k, ...)``'s and the gates use fold_in(k, 1).

        The module's init runs under jit, as ``slt_jax.init_variables`` (and so ``load_ticket``)
        runs it: an eager init can differ from a jitted one by an ulp. ``kwargs`` are static."""
        if not isinstance(rngs, dict):
            rngs = {"params": rngs, GATES: jax.random.fold_in(rngs, 1)}
        gates_key = rngs[GATES]
        others = {k: v for k, v in rngs.items() if k != GATES}
        variables = dict(jax.jit(lambda r, *a: self.module.init(r, *a, **kwargs))(others, *args))
        if not jax.tree.leaves(variables.get("params")):
            raise ValueError(f"module {type(self.module).__name__} has no parameters to gate (its variables: "
                             f"{sorted(variables) or 'none'}); allowed: a module with at least one parameter")
        frozen = variables.pop("params")
        return {FROZEN: frozen, GATES: self.method.init(gates_key, self.gate_shapes(frozen)), **variables}

    def gate_shapes(self, frozen: Any) -> Any:
        """The gate tree's template for these weights (``slt_jax.masking.gate_shapes``)."""
        return masking.gate_shapes(frozen, self.policy, self.structured, self.structured_policy,
                                   self.structured_inputs)

    def masks(self, gates: Any, key: jax.Array | None = None, step: Any = 0) -> Any:
        """A training sample of the masks with ``key``; without one, the binary ticket's masks."""
        return self.method.binary_masks(gates) if key is None else self.method.train_masks(gates, key, step)

    def apply(self, variables: dict[str, Any], *args: Any, rngs: dict[str, jax.Array] | None = None, step: Any = 0,
              mutable: Any = False, **kwargs: Any) -> Any:
        """``module.apply`` on the gated weights. ``rngs["gates"]`` samples training masks (at
        ``step``, which sets e.g. CRBG's temperature); without it the binary ticket is applied."""
        if mutable is True or (mutable and {FROZEN, GATES} & set([mutable] if isinstance(mutable, str) else mutable)):
            raise ValueError(f"mutable={mutable!r}; allowed: collections other than {FROZEN!r} and {GATES!r}")
        rngs = dict(rngs or {})
        variables = stop_frozen(variables)
        params = self.method.masked_params(variables[FROZEN], self.masks(variables[GATES], rngs.pop(GATES, None), step))
        others = {k: v for k, v in variables.items() if k not in (FROZEN, GATES)}
        return self.module.apply({"params": params, **others}, *args, rngs=rngs or None, mutable=mutable, **kwargs)


def gated(module: Any, method: Any, *, policy: str = masking.DEFAULT_POLICY, structured: bool = False,
          structured_policy: str = "", structured_inputs: str = "") -> Gated:
    """``module`` (any Flax Linen module) with frozen weights and ``method``'s gates; see ``Gated``.

    ``policy`` is a regex over parameter path names (default: every kernel); ``structured`` gives
    one gate per output unit / channel / head (the unit's bias closes with it); ``structured_policy``
    and ``structured_inputs`` pick which leaves get unit and input-feature gates
    (``slt_jax.masking.gate_shapes``).
    """
    return Gated(module, method, policy, structured, structured_policy, structured_inputs)
