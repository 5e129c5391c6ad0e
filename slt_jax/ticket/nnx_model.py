"""An NNX model as a ticket sees it: ``NNXModel(model_factory)``, drawn from the ticket's seed.

A ticket stores no weights, so an NNX ticket's weights are ``model_factory(nnx.Rngs(weights_key(seed)))``'s
``nnx.Param``s: the user's own constructor, called with the recorded seed (``nnx.Rngs(seed)`` is the
same key). ``GatedModel.save_ticket`` checks, bit for bit, that the model it gated was drawn so.
``NNXModel`` gives the ticket the two calls it makes of a Linen module, on plain nested dicts shaped
like ``nnx.to_pure_dict``:

* ``init(key, x)``: ``{"params": the Params, "batch_stats": the BatchStats}`` of
  ``model_factory(nnx.Rngs(key))`` (``x`` is unused: an NNX model is built without an input);
* ``apply(variables, x)``: the model with those Params and BatchStats, in eval mode (BatchNorm on its
  running statistics, dropout off), called on ``x``.

``variables_from_seed(seed)`` draws the weights eagerly, as the user's own ``MLP(nnx.Rngs(seed))``
does, rather than inside ``jax.jit``.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import jax
from flax import nnx

from slt_jax.frozen import weights_key


def _pure(module: nnx.Module) -> dict[str, Any]:
    variables = {"params": nnx.to_pure_dict(nnx.state(module, nnx.Param))}
    stats = nnx.to_pure_dict(nnx.state(module, nnx.BatchStat))
    if stats:
        variables["batch_stats"] = stats
    return variables


class NNXModel:
    """``model_factory`` (``rngs -> nnx.Module``) with the Linen calls a ticket makes; see the module
    docstring."""

    def __init__(self, model_factory: Callable[[nnx.Rngs], nnx.Module]):
        if not callable(model_factory) or isinstance(model_factory, nnx.Module):
            raise ValueError(f"model_factory={model_factory!r}; allowed: a function rngs -> your NNX module, e.g. "
                             "lambda rngs: MyModel(..., rngs=rngs)")
        self.model_factory = model_factory

    def build(self, key: Any) -> nnx.Module:
        module = self.model_factory(nnx.Rngs(key))
        if not isinstance(module, nnx.Module):
            raise ValueError(f"model_factory returned a {type(module).__name__}; allowed: an nnx.Module")
        return module

    def init(self, key: jax.Array, x: Any = None, **kwargs: Any) -> dict[str, Any]:
        del x, kwargs  # an NNX module is built without an input
        return _pure(self.build(key))

    def variables_from_seed(self, seed: int) -> dict[str, Any]:
        """The ticket's variables, drawn eagerly from ``weights_key(seed)``, as host arrays."""
        return jax.device_get(_pure(self.build(weights_key(seed))))

    @functools.cached_property
    def _template(self) -> nnx.Module:
        return self.build(weights_key(0))

    def apply(self, variables: dict[str, Any], x: Any, **kwargs: Any) -> Any:
        graphdef, params, stats, rest = nnx.split(self._template, nnx.Param, nnx.BatchStat, ...)
        nnx.replace_by_pure_dict(params, variables["params"])
        if variables.get("batch_stats"):
            nnx.replace_by_pure_dict(stats, variables["batch_stats"])
        module = nnx.merge(graphdef, params, stats, rest)
        module.eval()
        return module(x, **kwargs)
