"""Parameter-level gating: which leaves of a Flax parameter tree are gated, and how masks apply.

A *gate tree* is a flat dict ``{"Dense_0/kernel": array, ...}`` keyed by the '/'-joined path of
each gated parameter leaf. Gate arrays broadcast against their leaf:

* unstructured: one gate per weight, shape == leaf shape;
* structured: one gate per output unit / channel, shape (1, ..., 1, out). The unit's bias, when
  the module has one, is multiplied by the same gate, so a closed gate removes the whole unit.
  Attention projections (3-D kernels of modules named query, key, value, out, as Flax's
  ``MultiHeadDotProductAttention`` names them) get one gate per head instead: shape (1, heads, 1)
  for the (in, heads, head_dim) query/key/value kernels (and (heads, 1) on their biases), shape
  (heads, 1, 1) for the (heads, head_dim, out) output kernel (whose bias, shared by all heads,
  stays ungated).

Models never see gates: ``apply_masks(params, masks)`` returns an ordinary parameter tree that
goes straight into ``model.apply``.
"""
from __future__ import annotations

import math
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
Params = Any  # a nested dict of arrays, as Flax makes them
GateTree = dict[str, Array]

DEFAULT_POLICY = r"(^|/)kernel$"

# Head axis of the attention projection kernels: query/key/value (in, heads, head_dim), out
# (heads, head_dim, out). Structured gating gates these per head, not per last-axis unit.
ATTENTION_HEAD_AXIS = {"query": 1, "key": 1, "value": 1, "out": 0}


def path_name(path: tuple) -> str:
    """'/'-joined key names of a tree path, e.g. ('Dense_0', 'kernel') -> 'Dense_0/kernel'."""
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def named_leaves(params: Params) -> dict[str, Array]:
    """Every leaf of ``params`` keyed by its path name, in tree order."""
    return {path_name(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}


def gate_shapes(params: Params, policy: str = DEFAULT_POLICY, structured: bool = False,
                structured_policy: str = "") -> dict[str, tuple[int, ...]]:
    """Shapes of the gate arrays for the leaves whose path name matches the regex ``policy``.

    The default policy gates every kernel (Dense, Conv, attention), first and last layer included.
    Structured gates have shape (1, ..., 1, out): one per output unit or channel; attention
    projections get one per head (see the module docstring). With ``structured``, the regex
    ``structured_policy`` picks the gated leaves that get them ("" = all); the other gated leaves
    keep one gate per weight (e.g. the classifier, whose units cannot be removed without removing
    a class, but whose weights can).
    """
    pattern = _regex("gate_policy", policy)
    unit_pattern = _regex("structured_policy", structured_policy)
    shapes = {}
    for name, leaf in named_leaves(params).items():
        if pattern.search(name) and np.ndim(leaf) >= 1:
            shape = tuple(np.shape(leaf))
            per_unit = structured and unit_pattern.search(name)
            shapes[name] = _structured_shape(name, shape) if per_unit else shape
    if not shapes:
        raise ValueError(f"gate policy {policy!r} matches no parameter; parameters are: {', '.join(named_leaves(params))}")
    return shapes


def _regex(key: str, pattern: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except re.error as e:
        raise ValueError(f"{key}={pattern!r} is not a valid regular expression ({e}); allowed: a Python regex") from None


def _structured_shape(name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    parts = name.split("/")
    axis = ATTENTION_HEAD_AXIS.get(parts[-2]) if len(shape) == 3 and len(parts) >= 2 else None
    if axis is None:
        return (1,) * (len(shape) - 1) + shape[-1:]
    return tuple(n if i == axis else 1 for i, n in enumerate(shape))


def _bias_partner(name: str, masks: GateTree, leaves: dict[str, Array]) -> Array | None:
    """The structured gate of the kernel beside bias ``name``, without the kernel's input axes
    (so it broadcasts against the bias), if any."""
    if not name.endswith("bias") or name in masks:
        return None
    kernel = name[: -len("bias")] + "kernel"
    gate = masks.get(kernel)
    if gate is None or gate.size == leaves[kernel].size:
        return None
    lead = gate.ndim - np.ndim(leaves[name])  # the kernel's input axes, which the bias lacks
    if lead < 0 or any(n != 1 for n in gate.shape[:lead]):
        return None  # gates that vary over input axes (per-head out projection): the bias is shared
    return gate.reshape(gate.shape[lead:])


def full_masks(params: Params, masks: GateTree) -> dict[str, Array | None]:
    """Every leaf's mask by path name: its gate, its kernel's structured gate (biases), or None."""
    leaves = named_leaves(params)
    return {name: masks[name] if name in masks else _bias_partner(name, masks, leaves) for name in leaves}


def weights_per_gate(params: Params, shapes: dict[str, tuple[int, ...]]) -> dict[str, float]:
    """How many weights one gate of each gated leaf removes: 1 per weight unstructured; a unit's
    fan-in (plus its bias, if gated with it) structured. Densities weighted by it count weights."""
    leaves = named_leaves(params)
    out = {name: float(np.size(leaves[name]) / math.prod(shape)) for name, shape in shapes.items()}
    ones = {name: np.ones(shape, bool) for name, shape in shapes.items()}
    for name, m in full_masks(params, ones).items():
        if m is not None and name not in shapes:  # a bias closed by its kernel's structured gate
            out[name[: -len("bias")] + "kernel"] += float(np.size(leaves[name]) / m.size)
    return out


def apply_masks(params: Params, masks: GateTree) -> Params:
    """``params`` with every gated leaf multiplied by its mask (soft gates or a binary ticket).

    With a bool mask this is exactly ``where(mask, w, 0)``: kept weights are bit-identical to the
    frozen ones, never rescaled.
    """
    per_leaf = full_masks(params, masks)

    def gate(path, w):
        m = per_leaf[path_name(path)]
        if m is None:
            return w
        if m.dtype == jnp.bool_:
            return jnp.where(m, w, jnp.zeros((), w.dtype))
        return w * m.astype(w.dtype)

    return jax.tree_util.tree_map_with_path(gate, params)


def mask_tree(params: Params, masks: GateTree) -> Params:
    """The params-shaped tree of masks: a bool array per gated leaf (biases of structured units
    included), None for leaves that are not gated."""
    per_leaf = full_masks(params, masks)
    return jax.tree_util.tree_map_with_path(
        lambda path, w: None if per_leaf[path_name(path)] is None else np.asarray(per_leaf[path_name(path)], bool),
        params,
    )


def sparsity_report(params: Params, binary: GateTree) -> dict[str, Any]:
    """Fraction of gated weights that are zero in a binary ticket, in total and per gated leaf."""
    leaves = named_leaves(params)
    layers, kept_total, size_total = {}, 0, 0
    for name, m in full_masks(params, binary).items():
        if m is None:
            continue
        size = int(np.size(leaves[name]))
        kept = int(np.sum(np.broadcast_to(np.asarray(m), np.shape(leaves[name]))))
        layers[name] = 1.0 - kept / size
        kept_total, size_total = kept_total + kept, size_total + size
    return {"sparsity": 1.0 - kept_total / size_total, "gated_weights": size_total, "layers": layers}
