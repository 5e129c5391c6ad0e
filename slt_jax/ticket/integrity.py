"""``mask_integrity``: what ticket.json records to tell a damaged ticket, and the checks against it.

``save_ticket`` records (format 2), per gated leaf, its shape, kept gates and the sha256 of its
packed bits (``np.packbits`` of the flattened mask, whatever the coding); the sha256 of all
leaves' packed bits in name order; the gate count; the gated-weight count and sparsity (as
the independent verifier (tests/independent_verifier.py) counts them; also written to ``size.gated_weights`` and
``metrics.sparsity``); ``state_sha256`` when there is a ``state.npz`` and ``redraws_sha256`` when
there is a ``redraws.npz``. ``load_ticket`` checks each file against the model and the record
with ``check_masks``, ``check_state`` and ``check_redraws``, and refuses a ticket that disagrees
with a one-line ``TicketError`` naming the file and leaf. A format-1 ticket records nothing to
check against: it gets every check but those against the record.
"""
from __future__ import annotations

import hashlib
import math
import os
import warnings
from typing import Any

import jax
import numpy as np

from slt_jax import masking
from slt_jax.models import create_model
from slt_jax.ticket.coding import decode_leaf, group_mask_arrays, leaf_shape
from slt_jax.ticket.errors import TicketError
from slt_jax.ticket.regenerate import variable_shapes


def mask_sha256(m: np.ndarray) -> str:
    """sha256 of a mask's gates, one bit each, packed (``np.packbits`` of the flattened mask)."""
    return hashlib.sha256(np.packbits(np.asarray(m, bool).ravel()).tobytes()).hexdigest()


def whole_mask_sha256(named: dict[str, np.ndarray]) -> str:
    """sha256 of every gated leaf's packed bits, concatenated in name order."""
    h = hashlib.sha256()
    for name in sorted(named):
        h.update(np.packbits(np.asarray(named[name], bool).ravel()).tobytes())
    return h.hexdigest()


def state_sha256(flat: dict[str, np.ndarray]) -> str:
    """sha256 of the model state: each array's name, dtype, shape and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(flat):
        a = np.ascontiguousarray(flat[name])
        h.update(f"{name}\0{a.dtype.str}\0{list(a.shape)}\0".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def redraws_sha256(flat: dict[str, np.ndarray]) -> str:
    """sha256 of the generations: each leaf's name and values as uint16, in name order."""
    h = hashlib.sha256()
    for name in sorted(flat):
        h.update(f"{name}\0".encode())
        h.update(np.ascontiguousarray(flat[name], np.uint16).tobytes())
    return h.hexdigest()


def _fits(gate: tuple[int, ...], leaf: tuple[int, ...]) -> bool:
    """A gate array of shape ``gate`` broadcasts against a parameter of shape ``leaf`` (one gate per
    weight, per unit or per head)."""
    return len(gate) == len(leaf) and all(g in (1, w) for g, w in zip(gate, leaf))


def _weight_counts(params: Any, named: dict[str, np.ndarray]) -> tuple[int, float]:
    """Gated weights and the fraction of them a binary mask removes, counted as the harness and the
    verifier count them: every leaf with a mask (a structured unit's bias included)."""
    gates = jax.tree_util.tree_map_with_path(lambda p, _: named.get(masking.path_name(p)), params)
    report = masking.sparsity_report(params, gates)
    return int(report["gated_weights"]), float(report["sparsity"])


def _looks_per_unit(shape: tuple[int, ...]) -> bool:
    return len(shape) >= 2 and sum(s != 1 for s in shape) <= 1


def integrity_record(named: dict[str, np.ndarray], meta: dict[str, Any], model: Any) -> dict[str, Any]:
    """``mask_integrity`` for ticket.json. The gated weights are counted on the model's parameter
    shapes (a zoo spec in ``meta``, or ``model``); without them, on the gates themselves, which is
    the same count when every gate is one weight's. When that cannot be told (a structured mask of a
    module outside the zoo), the weight counts are left out, with a warning."""
    leaves = {name: {"shape": list(np.shape(m)), "kept": int(np.sum(m)), "sha256": mask_sha256(m)}
              for name, m in sorted(named.items())}
    gates = sum(math.prod(r["shape"]) for r in leaves.values())
    kept = sum(r["kept"] for r in leaves.values())
    record: dict[str, Any] = {"leaves": leaves, "sha256": whole_mask_sha256(named), "gates": gates,
                              "kept_gates": kept, "gated_weights": None, "sparsity": None}
    if model is None and "model" in meta:
        model = create_model(meta["model"])
    if model is not None:
        params = variable_shapes(model, meta)["params"]
        shapes = {n: np.shape(p) for n, p in masking.named_leaves(params).items()}
        for name, m in named.items():
            if name not in shapes or not _fits(np.shape(m), shapes[name]):
                where = ("which the model does not have" if name not in shapes
                         else f"whose parameter is {list(shapes[name])}")
                raise ValueError(f"the mask of {name!r} (shape {list(np.shape(m))}) does not fit the model: "
                                 f"a leaf {where}")
        record["gated_weights"], record["sparsity"] = _weight_counts(params, named)
    elif not meta.get("structured") and not any(_looks_per_unit(np.shape(m)) for m in named.values()):
        record["gated_weights"], record["sparsity"] = gates, 1.0 - kept / gates
    else:
        warnings.warn("save_ticket: the gated weights of a structured mask cannot be counted without its module; "
                      "pass save_ticket(..., model=module) to record them (the independent verifier checks them)",
                      stacklevel=3)
    return record


def with_counts(meta: dict[str, Any], record: dict[str, Any]) -> dict[str, Any]:
    """``meta`` with ``size.gated_weights`` and ``metrics.sparsity`` (what the independent verifier reads)
    set to the counts measured on the mask; a caller's other value is replaced, with a warning."""
    meta = dict(meta)
    for section, key in (("size", "gated_weights"), ("metrics", "sparsity")):
        value = record[key]
        if value is None:
            continue
        given = (meta.get(section) or {}).get(key)
        if given is not None and (given != value if key == "gated_weights" else abs(given - value) > 1e-12):
            warnings.warn(f"save_ticket: meta's {section}.{key}={given!r}, but the mask gives {value!r}; "
                          "the ticket records the mask's", stacklevel=3)
        meta[section] = {**(meta.get(section) or {}), key: value}
    return meta


def check_masks(path: str, arrays: dict[str, np.ndarray], params: Any, meta: dict[str, Any]) -> dict[str, np.ndarray]:
    """The gate masks of ``mask.npz``, each checked before it is decoded (its leaf is the model's, its
    shape fits its parameter and is the recorded one, its code is as long as its shape needs) and
    after (its sha256 and the whole mask's are the recorded ones, and so are the weight counts)."""
    where = os.path.join(path, "mask.npz")
    record = meta.get("mask_integrity")
    leaves = group_mask_arrays(arrays, where)
    shapes = {n: np.shape(p) for n, p in masking.named_leaves(params).items()}
    if record is not None:
        recorded = record["leaves"]
        missing = sorted(set(recorded) - set(leaves))
        if missing:
            raise TicketError(f"{where} lacks gated leaf {missing[0]!r}, which ticket.json records"
                              + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                              + "; without it the layer would run dense")
        extra = sorted(set(leaves) - set(recorded))
        if extra:
            raise TicketError(f"{where} has leaf {extra[0]!r}, which ticket.json does not record")
    unknown = sorted(set(leaves) - set(shapes))
    if unknown:
        raise TicketError(f"{where} names {', '.join(map(repr, unknown))}, which the model does not have; "
                          "load it with the model it was made with")
    if not leaves:
        raise TicketError(f"{where} holds no gated leaf")
    masks = {}
    for name, kinds in leaves.items():
        shape = leaf_shape(name, kinds, where)
        if record is not None and list(shape) != recorded[name]["shape"]:
            raise TicketError(f"{where}: leaf {name!r} has shape {list(shape)}, ticket.json records "
                              f"{recorded[name]['shape']}")
        if not _fits(shape, shapes[name]):
            raise TicketError(f"{where}: leaf {name!r} has shape {list(shape)}, which does not fit its "
                              f"parameter of shape {list(shapes[name])}")
        masks[name] = decode_leaf(name, kinds, shape, where)
        if record is not None and mask_sha256(masks[name]) != recorded[name]["sha256"]:
            raise TicketError(f"{where}: the mask of leaf {name!r} is not the one saved (its sha256 differs from "
                              "ticket.json's): the file is damaged")
    if record is not None:
        if record.get("sha256") not in (None, whole_mask_sha256(masks)):
            raise TicketError(f"{where}: the whole mask's sha256 differs from ticket.json's: the file is damaged")
        counted = _weight_counts(params, masks)
        for key, value in zip(("gated_weights", "sparsity"), counted):
            if record.get(key) is not None and (record[key] != value if key == "gated_weights"
                                                 else abs(record[key] - value) > 1e-12):
                raise TicketError(f"{where}: the mask gates {counted[0]} weights at sparsity {counted[1]:.6f} of this "
                                  f"model, ticket.json records {record.get('gated_weights')} at "
                                  f"{record.get('sparsity')}: another model, or a damaged ticket")
    return masks


def check_state(path: str, state: dict[str, np.ndarray], template: dict[str, Any], meta: dict[str, Any]) -> None:
    """``state.npz`` holds exactly the model's non-parameter variables, with their shapes (and, where
    recorded, the saved values)."""
    where = os.path.join(path, "state.npz")
    expected = {n: np.shape(v) for n, v in masking.named_leaves(template).items()}
    missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or extra:
        what = f"lacks {', '.join(missing)}" if missing else f"has {', '.join(extra)}, which the model does not have"
        raise TicketError(f"{where} does not fit the model: it {what}")
    for name, shape in expected.items():
        if state[name].shape != shape or state[name].dtype.kind not in "fiub":
            raise TicketError(f"{where}: {name!r} is {state[name].dtype} {list(state[name].shape)}, the model's is "
                              f"{list(shape)}")
    recorded = (meta.get("mask_integrity") or {}).get("state_sha256")
    if recorded is not None and state_sha256(state) != recorded:
        raise TicketError(f"{where} is not the state saved (its sha256 differs from ticket.json's): "
                          "the file is damaged")


def check_redraws(path: str, generations: dict[str, np.ndarray], masks: dict[str, np.ndarray],
                  meta: dict[str, Any]) -> None:
    """``redraws.npz`` holds an unsigned generation per weight of gated leaves only, shaped like their
    masks, 0 where the mask prunes, and (where recorded) the values saved."""
    where = os.path.join(path, "redraws.npz")
    for name, g in generations.items():
        if name not in masks:
            raise TicketError(f"{where} names {name!r}, which is not a gated leaf of mask.npz")
        if g.dtype not in (np.uint8, np.uint16) or g.shape != masks[name].shape:
            raise TicketError(f"{where}: {name!r} is {g.dtype} {list(g.shape)}; allowed: uint8 or uint16 shaped like "
                              f"its mask {list(masks[name].shape)}")
        if np.any(g[~masks[name]]):
            raise TicketError(f"{where}: {name!r} gives pruned weights a generation: the file is damaged")
    recorded = (meta.get("mask_integrity") or {}).get("redraws_sha256")
    if recorded is None or redraws_sha256(generations) != recorded:
        raise TicketError(f"{where} is not the one saved (its sha256 differs from ticket.json's, or ticket.json "
                          "records none): the file is damaged")
