"""The network a ticket is defined on, which it does not store: regenerated from its seed.

No float weights are stored: ``frozen_weights`` regenerates them from the seed, bit-exact, and
rounds them to the run's ``frozen_dtype`` (or reads the params file the run started from, checking
its sha256). A biprop ticket, recorded as ``"weights": "binarized"``, then takes sign(w0) times the
kept weights' mean magnitude per leaf, a function of the seed and the mask; an IteRand ticket's
kept weights come from their generation's draw (``slt_jax.frozen.redrawn_weights``).
``variable_shapes`` gives the same network's shapes without computing anything, for the checks
made before a ticket's arrays are decoded.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from slt_jax import masking
from slt_jax.frozen import (MASKED_WEIGHTS, load_params_file, params_by_generation, redrawn_weights, round_frozen,
                             weights_key)
from slt_jax.ticket.errors import TicketError

# The zoo's models take ``train``; a ticket of another model records its own init arguments.
ZOO_INIT_KWARGS = {"train": False}


def init_kwargs(meta: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments the ticket's model is initialised and applied with."""
    return meta.get("init_kwargs", ZOO_INIT_KWARGS if "model" in meta else {})


def variable_shapes(model: Any, meta: dict[str, Any]) -> Any:
    """The model's variables as zero-cost arrays of their shapes (nothing is computed or allocated)."""
    dummy = jnp.zeros((1, *meta["input_shape"]), jnp.float32)
    shapes = jax.eval_shape(lambda: model.init(weights_key(int(meta["seed"])), dummy, **init_kwargs(meta)))
    return jax.tree.map(lambda s: np.broadcast_to(np.zeros((), bool), s.shape), shapes)


def frozen_weights(meta: dict[str, Any], model: Any, params: Any, gate_masks: Any, frozen_from: str | None,
                   generations: dict[str, np.ndarray] | None) -> Any:
    """The ticket's frozen weights, on the host.

    ``params``: the model's parameters initialised from the seed; ``gate_masks``: the ticket's
    params-shaped binary gates; ``frozen_from``: where the recorded params file lies now, if it
    moved; ``generations``: ``redraws.npz``'s arrays, for a method that re-draws weights."""
    source = meta.get("frozen_from")
    if source:
        params = load_params_file(frozen_from or source["path"], params, source["sha256"])
    frozen_dtype = meta.get("frozen_dtype", "float32")
    params = round_frozen(params, frozen_dtype)
    if generations is not None:  # IteRand: each kept weight from its generation's draw
        draw = params_by_generation(model, tuple(meta["input_shape"]), meta["seed"], init_kwargs(meta), frozen_dtype)
        generation = jax.tree_util.tree_map_with_path(lambda p, _: generations.get(masking.path_name(p)), params)
        params = redrawn_weights(lambda g: params if g == 0 else draw(g), generation)
    name = meta.get("weights")
    if name is not None:  # e.g. biprop: the kept weights' signs times their mean magnitude, from the mask
        if name not in MASKED_WEIGHTS:
            raise TicketError(f"ticket.json: weights={name!r}; allowed: {', '.join(sorted(MASKED_WEIGHTS))} "
                              "or none")
        params = MASKED_WEIGHTS[name](params, gate_masks)
    return jax.device_get(params)
