"""``gated(module, method)``: any Flax Linen module, as a Linen module with frozen weights and gates.

The gated module's variables are the collections ``"frozen"`` (the module's weights, never
trained), ``"gates"`` (the method's gate tree, shaped like "frozen", None where a leaf is not
gated), ``"params"`` (leaves named by ``trainable``, ordinary trainable weights: a head, a norm's
scale) and the module's other collections (``batch_stats``)::

    model = slt_jax.gated(CNN(), method, seed=0)        # weights: CNN().init(weights_key(0), x)["params"]
    variables = model.init(key, x)                      # {"frozen": ..., "gates": ...}
    logits = model.apply(variables, x, deterministic=False, rngs={"gates": k}, step=t)  # a sample
    logits = model.apply(variables, x, deterministic=True)                              # the ticket

Each call computes ``module.apply({"params": method.masked_params(frozen, masks) | trainable,
**other}, x)`` with ``masks = method.train_masks(gates, make_rng("gates"), step)`` (a training
sample) or ``method.binary_masks(gates)`` (the binary ticket); ``masked_params`` is
``apply_masks(frozen, masks)`` for every method but biprop. The choice is explicit, as
``nn.Dropout``'s: ``deterministic`` at call time or on the module; neither is a one-line error,
never a silent ticket with zero gradient. ``deterministic`` is passed on to the module when its
``__call__`` takes one (its Dropout), with every rng stream but "gates" and "params" ("dropout").

Gradients stop at "frozen" (``jax.grad`` over all variables computes no weight gradient), and
"frozen" and "gates" cannot be made mutable outside init. The module itself knows nothing of gates,
and the gated module nests in a larger Linen model like any submodule. With ``seed`` the frozen
weights are the seed's, ``module.init(weights_key(seed), x)`` under jit wherever the module sits,
i.e. what ``slt_jax.load_ticket(path, model=module)`` regenerates; without one they come from
Linen's "params" stream as any submodule's. The gates come from the "gates" stream (else "params").
"""
from __future__ import annotations

import inspect
import re
from typing import Any

import flax.linen as nn
import jax

from slt_jax import masking
from slt_jax.frozen import weights_key

FROZEN, GATES, PARAMS = "frozen", "gates", "params"


def _subtree(tree: dict[str, Any], keep: Any, prefix: str = "") -> dict[str, Any]:
    """The nested dict of ``tree``'s leaves whose path name satisfies ``keep``; empty dicts pruned."""
    out = {}
    for name, value in tree.items():
        path = f"{prefix}{name}"
        if hasattr(value, "items"):
            sub = _subtree(value, keep, path + "/")
            if sub:
                out[name] = sub
        elif keep(path):
            out[name] = value
    return out


def _merged(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Two nested dicts with disjoint leaves as one."""
    out = dict(a)
    for name, value in b.items():
        out[name] = _merged(out[name], value) if name in out else value
    return out


class Gated(nn.Module):
    """A Linen module's frozen weights and a method's gates, itself a Linen module; see the module
    docstring. Build it with ``slt_jax.gated``."""

    module: Any
    method: Any
    policy: str = masking.DEFAULT_POLICY
    structured: bool = False
    structured_policy: str = ""
    structured_inputs: str = ""
    trainable: str = ""
    seed: int | None = None
    deterministic: bool | None = None

    def gate_shapes(self, frozen: Any) -> Any:
        """The gate tree's template for these weights (``slt_jax.masking.gate_shapes``)."""
        return masking.gate_shapes(frozen, self.policy, self.structured, self.structured_policy,
                                   self.structured_inputs)

    def _inner(self) -> nn.Module:
        # The user's module, applied as a function of the variables this module holds: unbound,
        # so its variables live in our collections rather than under a child scope of its own.
        return self.module.clone(parent=None)

    def _initialise(self, args: tuple, kwargs: dict[str, Any]) -> None:
        inner = self._inner()
        key = weights_key(self.seed) if self.seed is not None else self.make_rng(PARAMS)
        # Under jit, as slt_jax.init_variables (and so load_ticket) draws them: an eager init can
        # differ from a jitted one by an ulp.
        variables = dict(jax.jit(lambda k, *a: inner.init(k, *a, **kwargs))(key, *args))
        params = variables.pop(PARAMS, {})
        if not params:
            raise ValueError(f"gated({type(self.module).__name__}): the module has no parameters to gate")
        pattern = re.compile(self.trainable) if self.trainable else None
        trainable = _subtree(params, lambda p: bool(pattern.search(p))) if pattern else {}
        if pattern and not trainable:
            raise ValueError(f"trainable={self.trainable!r} matches no parameter; allowed: a regex over path names "
                             f"such as {', '.join(sorted(masking.named_leaves(params))[:3])}")
        frozen = _subtree(params, lambda p: not (pattern and pattern.search(p)))
        gates = self.method.init(self.make_rng(GATES), self.gate_shapes(frozen))
        for collection, tree in ((FROZEN, frozen), (GATES, gates), (PARAMS, trainable), *variables.items()):
            for name, value in tree.items():
                self.put_variable(collection, name, value)

    @nn.compact
    def __call__(self, *args: Any, deterministic: bool | None = None, step: Any = 0, **kwargs: Any) -> Any:
        """The module on its gated weights: the binary ticket with ``deterministic=True``, a training
        sample of the gates (a "gates" rng, at ``step``, which sets e.g. CRBG's temperature) with
        ``deterministic=False``."""
        if deterministic is not None and self.deterministic is not None:
            raise ValueError(f"deterministic given twice (on the module: {self.deterministic}, at call time: "
                             f"{deterministic}); allowed: one of them")
        deterministic = self.deterministic if deterministic is None else deterministic
        if "deterministic" in inspect.signature(type(self.module).__call__).parameters:
            # The module's own Dropout follows the same choice; at init without one, the ticket's.
            kwargs = {"deterministic": deterministic is not False, **kwargs}
        if self.is_initializing():
            if FROZEN not in self.variables:  # a module called twice in one init is initialised once
                self._initialise(args, kwargs)
        elif self.is_mutable_collection(FROZEN) or self.is_mutable_collection(GATES):
            raise ValueError(f"mutable collections include {FROZEN!r} or {GATES!r}; allowed: the module's other "
                             "collections (e.g. mutable=['batch_stats'])")
        if deterministic is None and not self.is_initializing():
            raise ValueError("gated module applied without deterministic=; allowed: deterministic=True (the binary "
                             "ticket) or deterministic=False with rngs={'gates': key} (a training sample)")
        if deterministic is False and not (self.has_rng(GATES) or self.is_initializing()):  # init: "params"
            raise ValueError("deterministic=False samples the gates, which needs rngs={'gates': key}; allowed: "
                             "that rng, or deterministic=True for the binary ticket")
        variables = self.variables
        gates = variables[GATES]
        frozen = jax.lax.stop_gradient(variables[FROZEN])
        if deterministic is False:
            masks = self.method.train_masks(gates, self.make_rng(GATES), step)
        else:
            masks = self.method.binary_masks(gates)
        params = _merged(self.method.masked_params(frozen, masks), variables.get(PARAMS, {}))
        others = {c: tree for c, tree in variables.items() if c not in (FROZEN, GATES, PARAMS)}
        mutable = [c for c in others if self.is_mutable_collection(c)]
        rngs = {name: self.make_rng(name) for name in self.scope.rngs if name not in (GATES, PARAMS)}
        out = self._inner().apply({PARAMS: params, **others}, *args, rngs=rngs, mutable=mutable or False, **kwargs)
        if not mutable:
            return out
        out, updates = out
        for collection, tree in updates.items():
            for name, value in tree.items():
                self.put_variable(collection, name, value)
        return out


def gated(module: Any, method: Any, *, policy: str = masking.DEFAULT_POLICY, structured: bool = False,
          structured_policy: str = "", structured_inputs: str = "", trainable: str = "", seed: int | None = None,
          deterministic: bool | None = None, name: str | None = None) -> Gated:
    """``module`` (any Flax Linen module) with frozen weights and ``method``'s gates; see ``Gated``.

    ``policy`` is a regex over parameter path names (default: every kernel); ``structured`` gives
    one gate per output unit / channel / head (the unit's bias closes with it); ``structured_policy``
    and ``structured_inputs`` pick which leaves get unit and input-feature gates
    (``slt_jax.masking.gate_shapes``). ``trainable`` is a regex naming leaves that stay ordinary
    trainable params (neither frozen nor gated). ``seed`` draws the frozen weights from
    ``weights_key(seed)``; ``deterministic`` fixes the sample/ticket choice on the module;
    ``name`` names it inside a parent module.
    """
    return Gated(module, method, policy, structured, structured_policy, structured_inputs, trainable, seed,
                 deterministic, name=name)
