"""Parameter-level gating: which leaves of a Flax parameter tree are gated, and how masks apply.

A *gate tree* (and a mask tree) is shaped like the parameter tree: an array for each gated leaf,
``None`` for a leaf that is not gated (as jaxpruner does), so ``jax.tree.map`` over gates skips the
ungated leaves. A leaf's *name* is the '/'-joined path of its keys, e.g. ``Dense_0/kernel``; the
policy regexes match names. Gate arrays broadcast against their leaf:

* unstructured: one gate per weight, shape == leaf shape;
* structured: one gate per output unit / channel, shape (1, ..., 1, out). The unit's bias, when
  the module has one, is multiplied by the same gate, so a closed gate removes the whole unit.
  Attention projections (3-D kernels of modules named query, key, value, out, as Flax's
  ``MultiHeadDotProductAttention`` names them) get one gate per head instead: shape (1, heads, 1)
  for the (in, heads, head_dim) query/key/value kernels (and (heads, 1) on their biases), shape
  (heads, 1, 1) for the (heads, head_dim, out) output kernel (whose bias, shared by all heads,
  stays ungated).
* input gates (``structured_inputs``): one gate per input feature / channel of a Dense or Conv
  kernel, shape (1, ..., 1, in, 1): a closed gate removes the feature's outgoing weights (a row
  of the kernel), e.g. a pixel on the first layer. Where the feature is a unit of the layer
  before, named as Flax names a sequence of layers (the gate on ``Dense_k`` feeds back to
  ``Dense_{k-1}``, ``Conv_k`` to ``Conv_{k-1}``, in one scope, widths equal, the earlier kernel
  gated), the gate closes that unit whole, as in h = z * act(W h_prev): its row here, and its
  column and bias there (multiplied into that layer's own mask), so that the mask counts every
  weight the closed unit takes with it.

Models never see gates: ``apply_masks(params, masks)`` returns an ordinary parameter tree that
goes straight into ``model.apply``. Every function here is jit-safe except ``sparsity_report``.
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
GateTree = Any  # params-shaped: an array per gated leaf, None elsewhere

DEFAULT_POLICY = r"(^|/)kernel$"

# Head axis of the attention projection kernels: query/key/value (in, heads, head_dim), out
# (heads, head_dim, out). Structured gating gates these per head, not per last-axis unit.
ATTENTION_HEAD_AXIS = {"query": 1, "key": 1, "value": 1, "out": 0}


def path_name(path: tuple) -> str:
    """'/'-joined key names of a tree path, e.g. ('Dense_0', 'kernel') -> 'Dense_0/kernel'.

    An ``nnx.State`` leaf's trailing ``.value`` attribute is not part of its name."""
    keys = [k for k in path if getattr(k, "name", None) != "value"]
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in keys)


def named_leaves(tree: Any) -> dict[str, Any]:
    """Every leaf of ``tree`` keyed by its path name, in tree order (None leaves are skipped)."""
    return {path_name(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _like_params(params: Params, by_name: dict[str, Any]) -> Any:
    """A tree shaped like ``params`` holding ``by_name[name]`` at each leaf (None where absent)."""
    return jax.tree_util.tree_map_with_path(lambda path, _: by_name.get(path_name(path)), params)


def gate_shapes(params: Params, policy: str = DEFAULT_POLICY, structured: bool = False,
                structured_policy: str = "", structured_inputs: str = "") -> Any:
    """The gate tree's template: shaped like ``params``, a float32 ``jax.ShapeDtypeStruct`` for each
    leaf whose path name matches the regex ``policy``, None elsewhere.

    The default policy gates every kernel (Dense, Conv, attention), first and last layer included.
    Structured gates have shape (1, ..., 1, out): one per output unit or channel; attention
    projections get one per head (see the module docstring). With ``structured``, the regex
    ``structured_policy`` picks the gated leaves that get them ("" = all); the other gated leaves
    keep one gate per weight (e.g. the classifier, whose units cannot be removed without removing
    a class, but whose weights can). The regex ``structured_inputs`` ("" = none; needs
    ``structured``) picks gated Dense / Conv kernels that get one gate per input feature or
    channel instead, shape (1, ..., 1, in, 1). A bias the policy matches gets no gate of its own
    where its kernel has one per unit: it closes with its unit (``leaf_masks``), so a closed unit
    leaves no bias behind and the density counts it.
    """
    pattern = _regex("gate_policy", policy)
    unit_pattern = _regex("structured_policy", structured_policy)
    input_pattern = _regex("structured_inputs", structured_inputs) if structured_inputs else None
    if input_pattern is not None and not structured:
        raise ValueError(f"structured_inputs={structured_inputs!r} with structured=False; allowed: "
                         "structured_inputs='' or structured=True")
    shapes = {}
    for name, leaf in named_leaves(params).items():
        if pattern.search(name) and np.ndim(leaf) >= 1:
            shape = tuple(np.shape(leaf))
            if input_pattern is not None and input_pattern.search(name):
                shape = _input_shape(name, shape)
            elif structured and unit_pattern.search(name):
                shape = _structured_shape(name, shape)
            shapes[name] = jax.ShapeDtypeStruct(shape, jnp.float32)
    leaves = named_leaves(params)
    for name in [n for n in shapes if n.endswith("bias") and n[: -len("bias")] + "kernel" in shapes]:
        if _bias_lead(name, shapes[name[: -len("bias")] + "kernel"].shape, leaves) is not None:
            del shapes[name]  # a gate of its own would keep a closed unit's bias: it closes with the unit
    if not shapes:
        raise ValueError(f"gate policy {policy!r} matches no parameter; parameters are: {', '.join(named_leaves(params))}")
    if input_pattern is not None and not any(input_pattern.search(name) for name in shapes):
        raise ValueError(f"structured_inputs={structured_inputs!r} matches no gated parameter; gated: {', '.join(shapes)}")
    return _like_params(params, shapes)


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


def _input_shape(name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    if len(shape) not in (2, 4) or name.split("/")[-1] != "kernel":
        raise ValueError(f"structured_inputs matches {name!r} (shape {list(shape)}); allowed: Dense kernels "
                         "(in, out) and Conv kernels (h, w, in, out)")
    return (1,) * (len(shape) - 2) + (shape[-2], 1)


def _bias_lead(name: str, kernel_gate: tuple[int, ...], leaves: dict[str, Any]) -> int | None:
    """How many leading axes (the kernel's input axes) the gate of shape ``kernel_gate`` on the
    kernel beside bias ``name`` has that the bias lacks, when it is one gate per unit (or head) the
    bias can share; None when it is not."""
    kernel = name[: -len("bias")] + "kernel"
    if math.prod(kernel_gate) == np.size(leaves[kernel]):
        return None  # one gate per weight
    lead = len(kernel_gate) - np.ndim(leaves[name])
    if lead < 0 or any(n != 1 for n in kernel_gate[:lead]):
        return None  # gates that vary over input axes (per-head out projection): the bias is shared
    return lead


def _bias_partner(name: str, masks: dict[str, Array], leaves: dict[str, Array]) -> Array | None:
    """The structured gate of the kernel beside bias ``name``, without the kernel's input axes
    (so it broadcasts against the bias), if any."""
    if not name.endswith("bias") or name in masks:
        return None
    gate = masks.get(name[: -len("bias")] + "kernel")
    lead = None if gate is None else _bias_lead(name, gate.shape, leaves)
    return None if lead is None else gate.reshape(gate.shape[lead:])


_SEQUENTIAL = re.compile(r"^(.*?)(Dense|Conv)_(\d+)/kernel$")


def _unit_links(named: dict[str, Array], leaves: dict[str, Array]) -> dict[str, Array]:
    """Producer kernel name -> the consumer's input gates as one gate per producer output unit
    (a 1-D array): the links the module docstring describes."""
    links = {}
    for name, gate in named.items():
        shape, found = np.shape(leaves[name]), _SEQUENTIAL.match(name)
        if not found or int(found[3]) == 0 or np.ndim(gate) != len(shape) or len(shape) < 2:
            continue
        if gate.shape[-1] != 1 or shape[-1] == 1 or any(n != 1 for n in gate.shape[:-2]):
            continue  # not an input gate
        producer = f"{found[1]}{found[2]}_{int(found[3]) - 1}/kernel"
        if producer in named and np.shape(leaves[producer])[-1] == gate.shape[-2] > 1:
            links[producer] = gate.reshape(-1)
    return links


def _leaf_masks_by_name(params: Params, masks: GateTree) -> dict[str, Array]:
    leaves, named = named_leaves(params), named_leaves(masks)
    links = _unit_links(named, leaves)
    out = {}
    for name in leaves:
        m = named[name] if name in named else _bias_partner(name, named, leaves)
        kernel = name[: -len("bias")] + "kernel" if name.endswith("bias") else name
        if kernel in links and (m is not None or name != kernel):
            link = links[kernel]  # the unit's gate, on the last axis (a kernel's outputs, a bias)
            m = link if m is None else m * link.reshape((1,) * (np.ndim(m) - 1) + link.shape)
        if m is not None:
            out[name] = m
    return out


def leaf_masks(params: Params, masks: GateTree) -> Any:
    """Every leaf's mask, shaped like ``params``: its own gate, its kernel's structured gate (the
    bias of a gated unit), or None. Each mask broadcasts against its leaf."""
    return _like_params(params, _leaf_masks_by_name(params, masks))


def kept_fraction(params: Params, per_gate: GateTree) -> Array:
    """sum over gated weights of their mask value / their number, with ``per_gate`` a tree of
    values in [0, 1] shaped like the gates: the binary ticket's density for bool gates, the
    expected density E[L0] / n for P(z > 0) of independent gates (a weight two gates touch keeps
    the product). Counts weights as the harness and the verifier do (``leaf_masks``); jit-safe."""
    leaves = named_leaves(params)
    kept, total = 0.0, 0
    for name, m in _leaf_masks_by_name(params, jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), per_gate)).items():
        size = math.prod(np.shape(leaves[name]))
        kept, total = kept + jnp.sum(m) * (size // m.size), total + size
    return kept / total


def weights_per_gate(params: Params, shapes: Any) -> Any:
    """How many weights one gate of each gated leaf removes, a tree of floats shaped like ``shapes``:
    1 per weight unstructured; a unit's fan-in (plus its bias, if gated with it) structured.
    Densities weighted by it count weights."""
    leaves, named = named_leaves(params), named_leaves(shapes)
    out = {name: float(np.size(leaves[name]) / math.prod(s.shape)) for name, s in named.items()}
    ones = {name: np.ones(s.shape, bool) for name, s in named.items()}
    for name, m in _leaf_masks_by_name(params, _like_params(params, ones)).items():
        if name not in named:  # a bias closed by its kernel's structured gate
            out[name[: -len("bias")] + "kernel"] += float(np.size(leaves[name]) / m.size)
    return _like_params(params, out)


def apply_masks(params: Params, masks: GateTree) -> Params:
    """``params`` with every gated leaf multiplied by its mask (soft gates or a binary ticket).

    With a bool mask this is exactly ``where(mask, w, 0)``: kept weights are bit-identical to the
    frozen ones, never rescaled.
    """
    per_leaf = _leaf_masks_by_name(params, masks)

    def gate(path, w):
        m = per_leaf.get(path_name(path))
        if m is None:
            return w
        if m.dtype == jnp.bool_:
            return jnp.where(m, w, jnp.zeros((), w.dtype))
        return w * m.astype(w.dtype)

    return jax.tree_util.tree_map_with_path(gate, params)


def sparsity_report(params: Params, binary: GateTree) -> dict[str, Any]:
    """Fraction of gated weights that are zero in a binary ticket, in total and per gated leaf."""
    leaves = named_leaves(params)
    layers, kept_total, size_total = {}, 0, 0
    for name, m in _leaf_masks_by_name(params, binary).items():
        size = int(np.size(leaves[name]))
        kept = int(np.sum(np.broadcast_to(np.asarray(m), np.shape(leaves[name]))))
        layers[name] = 1.0 - kept / size
        kept_total, size_total = kept_total + kept, size_total + size
    return {"sparsity": 1.0 - kept_total / size_total, "gated_weights": size_total, "layers": layers}
