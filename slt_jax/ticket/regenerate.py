"""The network a ticket is defined on, which it does not store: regenerated from its seed.

No float weights are stored: ``network_weights`` regenerates them from the seed, bit-exact, and
rounds them to the run's ``frozen_dtype`` (or reads the params file the run started from, checking
its sha256); an IteRand ticket's kept weights come from their generation's draw
(``slt_jax.frozen.redrawn_weights``). ``kept_weights_digest`` is what ticket.json's
``weights_fingerprint`` records of them. A biprop ticket, recorded as ``"weights": "binarized"``,
then computes with sign(w0) times the kept weights' mean magnitude per leaf (``ticket_weights``),
a function of the seed and the mask.
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
from slt_jax.weights_fingerprint import weights_digest

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


def network_weights(meta: dict[str, Any], model: Any, params: Any, frozen_from: str | None,
                    generations: dict[str, np.ndarray] | None) -> Any:
    """The network the ticket's gates were trained on, on the host: the params file (sha256-checked)
    or ``params`` (the model's parameters initialised from the seed), rounded to the run's
    ``frozen_dtype``, an IteRand ticket's kept weights from their generations' draws.

    ``frozen_from``: where the recorded params file lies now, if it moved; ``generations``:
    ``redraws.npz``'s arrays, for a method that re-draws weights."""
    source = meta.get("frozen_from")
    if source:
        params = load_params_file(frozen_from or source["path"], params, source["sha256"])
    frozen_dtype = meta.get("frozen_dtype", "float32")
    params = round_frozen(params, frozen_dtype)
    if generations is not None:  # IteRand: each kept weight from its generation's draw
        draw = params_by_generation(model, tuple(meta["input_shape"]), meta["seed"], init_kwargs(meta), frozen_dtype)
        generation = jax.tree_util.tree_map_with_path(lambda p, _: generations.get(masking.path_name(p)), params)
        params = redrawn_weights(lambda g: params if g == 0 else draw(g), generation)
    return jax.device_get(params)


def ticket_weights(meta: dict[str, Any], network: Any, gate_masks: Any) -> Any:
    """The weights the ticket computes with: ``network`` itself, or, for a ticket that records
    ``"weights"`` (biprop: ``"binarized"``), the kept weights' signs times their mean magnitude."""
    name = meta.get("weights")
    if name is None:
        return network
    if name not in MASKED_WEIGHTS:
        raise TicketError(f"ticket.json: weights={name!r}; allowed: {', '.join(sorted(MASKED_WEIGHTS))} or none")
    return jax.device_get(MASKED_WEIGHTS[name](network, gate_masks))


def kept_weights_digest(network: Any, named_masks: dict[str, np.ndarray]) -> dict[str, Any]:
    """``weights_digest`` of every weight the ticket keeps: ``where(mask, w, 0)`` on gated leaves
    (a structured unit's bias with its unit), other leaves whole. Pruned weights count as 0, so the
    digest is the same for any value a pruned weight had (an IteRand re-draw the ticket drops)."""
    unknown = sorted(set(named_masks) - set(masking.named_leaves(network)))
    if unknown:
        raise ValueError(f"the mask names {', '.join(map(repr, unknown))}, which the weights do not have")
    masks = jax.tree_util.tree_map_with_path(lambda p, _: named_masks.get(masking.path_name(p)), network)
    return weights_digest(jax.device_get(masking.apply_masks(network, masks)))
