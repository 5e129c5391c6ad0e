"""A loaded ticket, ``Ticket``: the network it defines, its masked weights and its predictions.

``frozen_params()`` is the never-trained network (``slt_jax.ticket.regenerate``), ``gate_masks``
the stored binary gates and ``mask`` every leaf's mask, ``masked_params()`` exactly
``where(mask, frozen, 0)`` on gated leaves, ``model_state()`` the stored running statistics, and
``predict(images)`` class ids for raw images, preprocessed as the run recorded. It needs the
models, ``slt_jax.masking`` and ``slt_jax.frozen`` only, so a ticket loads without the training
stack.
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from slt_jax import masking
from slt_jax.data.arrays import preprocess
from slt_jax.frozen import init_variables
from slt_jax.ticket.errors import TicketError
from slt_jax.ticket.regenerate import init_kwargs, kept_weights_digest, network_weights, ticket_weights
from slt_jax.weights_fingerprint import current_settings, drawn_under, mismatch_cause


def _unflatten_like(template: Any, flat: dict[str, np.ndarray]) -> Any:
    return jax.tree_util.tree_map_with_path(lambda p, _: flat[masking.path_name(p)], template)


class Ticket:
    """A loaded ticket on ``model`` (a Flax Linen module, or an NNX model's ``NNXModel``).

    ``gate_masks`` holds the stored binary gates and ``mask`` every leaf's mask (a structured
    unit's bias included); both are params-shaped, with None for leaves that are not gated."""

    def __init__(self, meta: dict[str, Any], gate_masks: dict[str, np.ndarray], state: dict[str, np.ndarray] | None,
                 model: Any, frozen_from: str | None = None, generations: dict[str, np.ndarray] | None = None,
                 path: str = "ticket"):
        self.meta = meta
        self.model = model
        self.path = path
        self._named_gates = gate_masks
        self._flat_state = state
        self._frozen_from = frozen_from
        self._generations = generations
        # The jax flags the weights were drawn under; none recorded (an older ticket): the process's own.
        self._drawn_under = (meta.get("weights_fingerprint") or {}).get("settings")

    @functools.cached_property
    def _variables(self) -> dict[str, Any]:
        draw = getattr(self.model, "variables_from_seed", None)  # an NNX model: drawn as its user draws it
        with drawn_under(self._drawn_under):
            variables = draw(self.meta["seed"]) if draw is not None else init_variables(
                self.model, tuple(self.meta["input_shape"]), self.meta["seed"], init_kwargs(self.meta))
        unknown = sorted(set(self._named_gates) - set(masking.named_leaves(variables["params"])))
        if unknown:
            raise ValueError(f"the ticket's mask names {', '.join(unknown)}, which the model does not have; "
                             "load it with the model it was made with")
        return variables

    @functools.cached_property
    def _network(self) -> Any:
        """The weights the gates were trained on, checked against ``weights_fingerprint``."""
        with drawn_under(self._drawn_under):
            network = network_weights(self.meta, self.model, self._variables["params"], self._frozen_from,
                                      self._generations)
        recorded = self.meta.get("weights_fingerprint")
        if recorded is not None:
            digest = kept_weights_digest(network, self._named_gates)
            if digest["sha256"] != recorded.get("sha256") or digest["leaves"] != recorded.get("leaves"):
                settings = recorded.get("settings") or {}
                # Drawn under the recorded flags (those this jax has): the jax version, the seed or the model differ.
                now = current_settings(settings.get("frozen_dtype", "float32"), settings.get("frozen_from_sha256"))
                now.update({k: settings[k] for k in now if k.startswith("jax_") and now[k] is not None and k in settings})
                what = (f"seed {self.meta['seed']} draws other weights on this model than the ticket's gates were "
                        "trained on: load it with the model it was made with (another init draws others), or save "
                        "it with the seed its weights were drawn from")
                raise TicketError(f"{self.path}: the ticket is not on these weights ({mismatch_cause(recorded, digest, now, what)})")
        return network

    @functools.cached_property
    def _frozen(self) -> Any:
        return ticket_weights(self.meta, self._network, self.gate_masks)

    def frozen_params(self) -> Any:
        """The network's initial weights: regenerated from the seed (or read from the recorded params
        file, sha256-checked) and rounded to the run's frozen_dtype; an IteRand ticket's kept weights
        from their generations' draws; biprop's binarised. Drawn under the jax flags the ticket
        records (x64, threefry partitionable), whatever this process set, and refused with a
        one-line ``TicketError`` when they are not the weights its ``weights_fingerprint`` records."""
        return self._frozen

    @functools.cached_property
    def gate_masks(self) -> Any:
        return jax.tree_util.tree_map_with_path(lambda p, _: self._named_gates.get(masking.path_name(p)),
                                                self._variables["params"])

    @functools.cached_property
    def mask(self) -> Any:
        return jax.tree.map(lambda m: np.asarray(m, bool), masking.leaf_masks(self._frozen, self.gate_masks))

    def masked_params(self) -> Any:
        """``where(mask, frozen, 0)`` on gated leaves; frozen values elsewhere."""
        return jax.device_get(masking.apply_masks(self._frozen, self.gate_masks))

    def model_state(self) -> dict[str, Any]:
        """Non-parameter collections (BatchNorm running statistics), from the ticket if stored."""
        state = {k: v for k, v in self._variables.items() if k != "params"}
        if self._flat_state is not None:
            state = _unflatten_like(state, self._flat_state)
        return state

    @functools.cached_property
    def _apply(self):
        variables = {"params": self.masked_params(), **self.model_state()}
        kwargs = init_kwargs(self.meta)
        # The weights go in as an argument: closed over, they would be baked into every compiled
        # program as constants (34 MB of HLO for Conv2, recompiled per batch shape).
        predict = jax.jit(lambda v, x: jnp.argmax(self.model.apply(v, x, **kwargs), -1))
        return functools.partial(predict, variables)

    def predict(self, images: Any) -> np.ndarray:
        """Class ids for raw images as the dataset stores them (e.g. uint8 28x28), preprocessed as
        the run recorded (no preprocessing recorded: the images go in as they are)."""
        x = np.asarray(images)
        x = preprocess(x, self.meta["preprocessing"]) if self.meta.get("preprocessing") else jnp.asarray(x, jnp.float32)
        return np.asarray(self._apply(x))
