"""``mask.npz``: the binary gates of a ticket, coded per gated leaf, and what they cost in bits.

For each gated leaf, keyed by the leaf's path name (``slt_jax.masking.path_name``): ``LEAF::shape``
and either ``LEAF::bits``, one bit per gate (``np.packbits`` of the flattened mask), or
``LEAF::golomb`` with its JSON ``LEAF::header`` (``slt_jax.mask_coding``; about half a bit per
gate at 90% sparsity). Decoding checks every code against its shape before anything of that size
is allocated, and refuses what ``encode_masks`` would not write with a ``TicketError``.
"""
from __future__ import annotations

import json
import math
from typing import Any

import numpy as np

from slt_jax import mask_coding, masking
from slt_jax.ticket.errors import TicketError, one_line

MASK_CODINGS = ("packbits", "golomb")
_MASK_KINDS = ("shape", "bits", "golomb", "header")


def encode_masks(masks: Any, coding: str = "packbits") -> dict[str, np.ndarray]:
    """Arrays for ``mask.npz``: per gated leaf (of a params-shaped mask tree) its shape and its
    bits, packed or Golomb-coded, keyed by the leaf's path name."""
    if coding not in MASK_CODINGS:
        raise ValueError(f"unknown mask coding {coding!r}; allowed: {', '.join(MASK_CODINGS)}")
    out = {}
    for name, m in masking.named_leaves(masks).items():
        m = np.asarray(m, bool)
        out[f"{name}::shape"] = np.asarray(m.shape, np.int64)
        if coding == "packbits":
            out[f"{name}::bits"] = np.packbits(m.ravel())
        else:
            data, header = mask_coding.golomb_encode(m)
            out[f"{name}::golomb"] = np.frombuffer(data, np.uint8)
            out[f"{name}::header"] = np.asarray(json.dumps(header))
    return out


def group_mask_arrays(arrays: dict[str, np.ndarray], where: str) -> dict[str, dict[str, np.ndarray]]:
    """``mask.npz``'s arrays per leaf name: {leaf: {"shape" | "bits" | "golomb" | "header": array}}."""
    leaves: dict[str, dict[str, np.ndarray]] = {}
    for key, value in arrays.items():
        name, sep, kind = key.rpartition("::")
        if not sep or not name or kind not in _MASK_KINDS:
            raise TicketError(f"{where}: key {key!r} is not LEAF::shape, LEAF::bits, LEAF::golomb or LEAF::header")
        leaves.setdefault(name, {})[kind] = value
    return leaves


def leaf_shape(name: str, kinds: dict[str, np.ndarray], where: str) -> tuple[int, ...]:
    """A leaf's recorded shape, checked to be a short list of non-negative integers."""
    if "shape" not in kinds:
        raise TicketError(f"{where}: leaf {name!r} lacks its {name}::shape")
    shape = kinds["shape"]
    if shape.ndim != 1 or shape.dtype.kind not in "iu" or shape.size > 32 or (shape < 0).any():
        raise TicketError(f"{where}: leaf {name!r} has shape {shape.tolist()!r} (dtype {shape.dtype}); "
                          "allowed: a list of non-negative integers")
    return tuple(int(s) for s in shape)


def decode_leaf(name: str, kinds: dict[str, np.ndarray], shape: tuple[int, ...], where: str) -> np.ndarray:
    """One leaf's mask, its code checked against ``shape`` before anything of that size is allocated."""
    n = math.prod(shape)
    if "bits" in kinds:
        if "golomb" in kinds or "header" in kinds:
            raise TicketError(f"{where}: leaf {name!r} has both {name}::bits and a Golomb code")
        bits = kinds["bits"]
        need = -(-n // 8)
        if bits.ndim != 1 or bits.dtype != np.uint8 or bits.size != need:
            raise TicketError(f"{where}: leaf {name!r} has {bits.size} bytes of {bits.dtype} bits, its shape "
                              f"{list(shape)} needs {need} uint8 (truncated or damaged)")
        flat = np.unpackbits(bits, count=n).astype(bool)
    elif "golomb" in kinds:
        if "header" not in kinds:
            raise TicketError(f"{where}: leaf {name!r} lacks its {name}::header")
        code, header = kinds["golomb"], kinds["header"]
        if code.ndim != 1 or code.dtype != np.uint8:
            raise TicketError(f"{where}: leaf {name!r} has a Golomb code of {code.dtype} {list(code.shape)}, "
                              "not a uint8 vector")
        try:
            if header.dtype.kind != "U" or header.ndim != 0:
                raise ValueError(f"the header is {header.dtype} {list(header.shape)}, not a JSON string")
            try:
                header = json.loads(str(header))
            except ValueError as e:
                raise ValueError(f"its {name}::header is not JSON ({one_line(e)})") from None
            mask_coding.check_header(header, code.size)
            if header["n"] != n:
                raise ValueError(f"the Golomb header's n={header['n']} does not match the shape's {n} gates")
            flat = mask_coding.golomb_decode(code.tobytes(), header)
        except ValueError as e:  # json.JSONDecodeError is one
            raise TicketError(f"{where}: leaf {name!r}: {' '.join(str(e).split())}") from None
    else:
        raise TicketError(f"{where}: leaf {name!r} has a shape but no {name}::bits or {name}::golomb")
    return flat.reshape(shape)


def decode_masks(arrays: dict[str, np.ndarray], where: str = "mask.npz") -> dict[str, np.ndarray]:
    """Inverse of ``encode_masks``, keyed by path name. A key, shape or code that ``encode_masks``
    would not write raises ``TicketError`` naming ``where`` and the leaf."""
    leaves = group_mask_arrays(arrays, where)
    return {name: decode_leaf(name, kinds, leaf_shape(name, kinds, where), where) for name, kinds in leaves.items()}


def ticket_size(masks: Any, gated_weights: int) -> dict[str, float]:
    """Bits of the mask per gated weight, bit-packed and Golomb-coded, beside float32 weights' 32."""
    masks = masking.named_leaves(masks)
    gates = sum(int(np.size(m)) for m in masks.values())
    golomb = sum(mask_coding.golomb_encode(np.asarray(m))[1]["nbits"] for m in masks.values())
    return {"gates": gates, "gated_weights": gated_weights,
            "packbits_bits_per_weight": gates / gated_weights,
            "golomb_bits_per_weight": golomb / gated_weights,
            "entropy_bits_per_weight": sum(np.size(m) * mask_coding.binary_entropy(float(np.mean(m)))
                                           for m in masks.values()) / gated_weights,
            "dense_float32_bits_per_weight": 32}
