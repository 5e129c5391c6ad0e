"""The product of a run: a strong lottery ticket, stored as seed + bit-packed binary mask.

A ticket directory holds

* ``ticket.json``: model spec, input shape, weight-init seed, gating (policy, structured),
  input preprocessing, the method and the metrics measured on it, and its size in bits;
* ``mask.npz``: for each gated leaf, keyed by the leaf's path name, its shape and its binary
  gates, one bit per gate (``np.packbits``) or Golomb-coded (``slt_jax.mask_coding``; about
  half a bit per gate at 90% sparsity);
* ``state.npz``, only for models with running statistics (BatchNorm): those statistics.

No float weights are stored: ``frozen_params()`` regenerates them from the seed, bit-exact, and
``masked_params()`` is exactly ``where(mask, frozen, 0)`` on gated leaves. This module needs the
models and ``slt_jax.masking`` only, so a ticket loads without the training stack.
"""
from __future__ import annotations

import functools
import json
import os
import shutil
import tempfile
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from slt_jax import mask_coding, masking
from slt_jax.data.arrays import preprocess
from slt_jax.models import create_model

FORMAT_VERSION = 1


def init_variables(model_spec: dict[str, Any], input_shape: tuple[int, ...], seed: int) -> dict[str, Any]:
    """The model's initial variables from the seed: the frozen weights of every ticket.

    Computed under jit, as a run that regenerates them inside its jitted step does: XLA's
    simplifications can move an eager init by an ulp (seen for kaiming_normal), a jitted one not.
    """
    model = create_model(model_spec)
    dummy = jnp.zeros((1, *input_shape), jnp.float32)
    init = jax.jit(lambda key: model.init(key, dummy, train=False))
    return jax.device_get(init(jax.random.PRNGKey(seed)))


FROZEN_DTYPES = ("float32", "bfloat16")


def round_frozen(params: Any, frozen_dtype: str = "float32") -> Any:
    """``params`` rounded to ``frozen_dtype`` and cast back to float32 (traceable).

    These are the weights a run that stores its frozen weights in ``frozen_dtype`` computes with,
    so they are the weights its ticket is defined on: with "bfloat16" a kept weight is
    ``float32(bfloat16(w0))``, not ``w0``. The ticket records ``frozen_dtype`` and
    ``Ticket.frozen_params`` applies the same rounding. "float32" changes nothing.
    """
    if frozen_dtype not in FROZEN_DTYPES:
        raise ValueError(f"frozen_dtype={frozen_dtype!r}; allowed: {', '.join(FROZEN_DTYPES)}")
    return jax.tree.map(lambda w: jnp.asarray(w, frozen_dtype).astype(jnp.float32), params)


MASK_CODINGS = ("packbits", "golomb")


def encode_masks(masks: dict[str, Any], coding: str = "packbits") -> dict[str, np.ndarray]:
    """Arrays for ``mask.npz``: per gated leaf its shape and its bits, packed or Golomb-coded."""
    if coding not in MASK_CODINGS:
        raise ValueError(f"unknown mask coding {coding!r}; allowed: {', '.join(MASK_CODINGS)}")
    out = {}
    for name, m in masks.items():
        m = np.asarray(m, bool)
        out[f"{name}::shape"] = np.asarray(m.shape, np.int64)
        if coding == "packbits":
            out[f"{name}::bits"] = np.packbits(m.ravel())
        else:
            data, header = mask_coding.golomb_encode(m)
            out[f"{name}::golomb"] = np.frombuffer(data, np.uint8)
            out[f"{name}::header"] = np.asarray(json.dumps(header))
    return out


def decode_masks(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Inverse of ``encode_masks``."""
    out = {}
    for key in arrays:
        name, _, kind = key.rpartition("::")
        shape = tuple(int(s) for s in arrays.get(f"{name}::shape", ()))
        if kind == "bits":
            flat = np.unpackbits(arrays[key], count=int(np.prod(shape))).astype(bool)
        elif kind == "golomb":
            flat = mask_coding.golomb_decode(arrays[key].tobytes(), json.loads(str(arrays[f"{name}::header"])))
        else:
            continue
        out[name] = flat.reshape(shape)
    return out


def ticket_size(masks: dict[str, Any], gated_weights: int) -> dict[str, float]:
    """Bits of the mask per gated weight, bit-packed and Golomb-coded, beside float32 weights' 32."""
    gates = sum(int(np.size(m)) for m in masks.values())
    golomb = sum(mask_coding.golomb_encode(np.asarray(m))[1]["nbits"] for m in masks.values())
    return {"gates": gates, "gated_weights": gated_weights,
            "packbits_bits_per_weight": gates / gated_weights,
            "golomb_bits_per_weight": golomb / gated_weights,
            "entropy_bits_per_weight": sum(np.size(m) * mask_coding.binary_entropy(float(np.mean(m)))
                                           for m in masks.values()) / gated_weights,
            "dense_float32_bits_per_weight": 32}


def save_ticket(path: str, meta: dict[str, Any], masks: dict[str, Any], model_state: dict[str, Any] | None = None,
                coding: str = "packbits") -> None:
    """Writes a ticket directory atomically: a crash mid-write leaves any previous ticket intact."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".ticket-tmp-", dir=parent)
    np.savez(os.path.join(tmp, "mask.npz"), **encode_masks(masks, coding))
    if model_state:
        flat = masking.named_leaves(model_state)
        np.savez(os.path.join(tmp, "state.npz"), **{k: np.asarray(v) for k, v in flat.items()})
    with open(os.path.join(tmp, "ticket.json"), "w") as f:
        json.dump({"format_version": FORMAT_VERSION, "mask_coding": coding, **meta}, f, indent=2, sort_keys=True)
    old = path + ".old"
    if os.path.exists(path):
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def _unflatten_like(template: Any, flat: dict[str, np.ndarray]) -> Any:
    return jax.tree_util.tree_map_with_path(lambda p, _: flat[masking.path_name(p)], template)


class Ticket:
    """A loaded ticket. ``mask`` is params-shaped: a bool array broadcastable to each gated leaf,
    None for leaves that are not gated."""

    def __init__(self, meta: dict[str, Any], gate_masks: dict[str, np.ndarray], state: dict[str, np.ndarray] | None):
        self.meta = meta
        self.gate_masks = gate_masks
        self._flat_state = state

    @functools.cached_property
    def _variables(self) -> dict[str, Any]:
        return init_variables(self.meta["model"], tuple(self.meta["input_shape"]), self.meta["seed"])

    def frozen_params(self) -> Any:
        """The network's initial weights, regenerated from the seed and rounded to the run's frozen_dtype."""
        return jax.device_get(round_frozen(self._variables["params"], self.meta.get("frozen_dtype", "float32")))

    @functools.cached_property
    def mask(self) -> Any:
        return masking.mask_tree(self.frozen_params(), self.gate_masks)

    def masked_params(self) -> Any:
        """``where(mask, frozen, 0)`` on gated leaves; frozen values elsewhere."""
        return jax.device_get(masking.apply_masks(self.frozen_params(), self.gate_masks))

    def model_state(self) -> dict[str, Any]:
        """Non-parameter collections (BatchNorm running statistics), from the ticket if stored."""
        state = {k: v for k, v in self._variables.items() if k != "params"}
        if self._flat_state is not None:
            state = _unflatten_like(state, self._flat_state)
        return state

    @functools.cached_property
    def _apply(self):
        model = create_model(self.meta["model"])
        variables = {"params": self.masked_params(), **self.model_state()}
        # The weights go in as an argument: closed over, they would be baked into every compiled
        # program as constants (34 MB of HLO for Conv2, recompiled per batch shape).
        predict = jax.jit(lambda v, x: jnp.argmax(model.apply(v, x, train=False), -1))
        return functools.partial(predict, variables)

    def predict(self, images: Any) -> np.ndarray:
        """Class ids for raw images as the dataset stores them (e.g. uint8 28x28)."""
        return np.asarray(self._apply(preprocess(np.asarray(images), self.meta["preprocessing"])))


def load_ticket(path: str) -> Ticket:
    """Loads a ticket directory written by ``save_ticket`` (any run's ``WORKDIR/ticket``)."""
    meta_path = os.path.join(path, "ticket.json")
    if not os.path.isfile(meta_path):
        raise FileNotFoundError(f"{path!r} is not a ticket directory: it has no ticket.json")
    with open(meta_path) as f:
        meta = json.load(f)
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"ticket format_version {meta.get('format_version')!r}; this slt_jax reads {FORMAT_VERSION}")
    with np.load(os.path.join(path, "mask.npz")) as f:
        masks = decode_masks({k: f[k] for k in f.files})
    state = None
    if os.path.exists(os.path.join(path, "state.npz")):
        with np.load(os.path.join(path, "state.npz")) as f:
            state = {k: f[k] for k in f.files}
    return Ticket(meta, masks, state)
