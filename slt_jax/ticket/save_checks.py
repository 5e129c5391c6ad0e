"""What ``save_ticket`` checks of its arguments, so that a ticket from one's own loop computes what
the loop computed, or is not written: the method that made the mask, and the mask and gates' values.

* ``with_method``: ``ticket.json`` records the method's name, and what the network computes with
  when it is not the seed's weights: biprop's ``"weights": "binarized"`` (sign(w0) times the kept
  weights' mean magnitude, replayed by ``frozen_params()``); a method that re-draws weights
  (IteRand) needs each weight's ``generation``. Without the method a biprop ticket would predict
  with the raw weights, so it is required (``method=`` or ``meta["method"]``).
* ``binary_leaves``: each gated leaf's mask as bool, refusing values other than 0 and 1 (NaN and
  inf among them), which ``bool()`` would turn into kept weights.
* ``check_finite_gates``: the gate values the masks came from, refused if any is NaN or infinite:
  every method prunes a NaN gate (NaN > 0 is false) without a word.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from slt_jax import masking


def _method_class(name: str) -> type:
    from slt_jax.methods import METHODS  # the methods load optax: only when a ticket is saved

    if name not in METHODS:
        raise ValueError(f"save_ticket: method {name!r} is not known; allowed: a Method, or one of "
                         f"{', '.join(METHODS)}")
    return METHODS[name]


def with_method(meta: dict[str, Any], method: Any, generation: Any) -> dict[str, Any]:
    """``meta`` with ``method`` (its name) and, for a method that computes with other weights than
    the seed's, ``weights``. ``method``: a ``Method``, its name, or None to take ``meta["method"]``."""
    given = meta.get("method")
    name = method if isinstance(method, str) or method is None else getattr(method, "name", None)
    if method is not None and not isinstance(name, str):
        raise ValueError(f"save_ticket: method={method!r} has no name; allowed: a slt_jax Method or its name")
    if name is None and given is None:
        from slt_jax.methods import METHODS

        raise ValueError("save_ticket needs the method that made the mask: save_ticket(..., method=method) with the "
                         f"Method or its name ({', '.join(METHODS)}); biprop's and IteRand's tickets compute with "
                         "other weights than the seed's")
    if name is not None and given is not None and name != given:
        raise ValueError(f"save_ticket: meta records method {given!r} but method={name!r}; allowed: the same method")
    name = name or given
    cls = _method_class(name) if method is None or isinstance(method, str) else method
    weights = getattr(cls, "ticket_weights", None)
    if "weights" in meta and meta["weights"] != weights:
        raise ValueError(f"save_ticket: meta records weights={meta['weights']!r} but method {name!r} computes with "
                         f"{weights!r}; allowed: leave weights out, save_ticket records the method's")
    if hasattr(cls, "redraw") and generation is None:
        raise ValueError(f"save_ticket: method {name!r} re-draws pruned weights, so the ticket needs each weight's "
                         "generation: save_ticket(..., generation=state['generation']); without it the ticket "
                         "would compute with the seed's weights")
    meta = {**meta, "method": name}
    if weights is not None:
        meta["weights"] = weights
    return meta


def binary_leaves(masks: Any) -> dict[str, np.ndarray]:
    """Each gated leaf's mask (by path name) as bool; a value other than 0 and 1 is refused with one
    line naming the leaf."""
    out = {}
    for name, m in masking.named_leaves(masks).items():
        m = np.asarray(m)
        if m.dtype != bool:
            if not (np.issubdtype(m.dtype, np.number)):
                raise ValueError(f"save_ticket: the mask of {name!r} holds {m.dtype} values; allowed: bool or 0/1 "
                                 "numbers (method.binary_masks(gates))")
            bad = ~np.isfinite(m) if np.issubdtype(m.dtype, np.inexact) else np.zeros(m.shape, bool)
            if bad.any():
                what = "NaN" if np.isnan(m).any() else "inf"
                raise ValueError(f"save_ticket: the mask of {name!r} holds {what} ({int(bad.sum())} of {m.size} "
                                 "values); allowed: bool or 0/1 (method.binary_masks(gates) of finite gates)")
            other = (m != 0) & (m != 1)
            if other.any():
                raise ValueError(f"save_ticket: the mask of {name!r} holds values other than 0 and 1 (e.g. "
                                 f"{m[other].flat[0]!r}); allowed: bool or 0/1 (method.binary_masks(gates))")
        out[name] = m.astype(bool)
    return out


def check_finite_gates(gates: Any) -> None:
    """Refuses gate values with a NaN or infinite entry, naming the leaf and the count."""
    for name, g in masking.named_leaves(gates).items():
        g = np.asarray(g)
        if np.issubdtype(g.dtype, np.inexact) and not np.isfinite(g).all():
            what = "NaN" if np.isnan(g).any() else "inf"
            raise ValueError(f"save_ticket: the gates of {name!r} hold {what} ({int((~np.isfinite(g)).sum())} of "
                             f"{g.size} values), which every method prunes silently; allowed: finite gates")
