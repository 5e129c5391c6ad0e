"""The product of a run: a strong lottery ticket, stored as seed + bit-packed binary mask.

A ticket directory holds

* ``ticket.json``: model spec, input shape, weight-init seed, gating (policy, structured),
  input preprocessing, the method and the metrics measured on it, and its size in bits;
* ``mask.npz``: for each gated leaf, keyed by the leaf's path name, its shape and its binary
  gates, one bit per gate (``np.packbits``) or Golomb-coded (``slt_jax.mask_coding``; about
  half a bit per gate at 90% sparsity);
* ``state.npz``, only for models with running statistics (BatchNorm): those statistics.

No float weights are stored: ``frozen_params()`` regenerates them from the seed, bit-exact (or
reads the params file the run started from, checking its sha256), and ``masked_params()`` is
exactly ``where(mask, frozen, 0)`` on gated leaves. ``ticket.json`` needs ``seed`` and
``input_shape``; ``model`` (a zoo spec) lets a ticket reload alone, any other Flax module is
passed to ``load_ticket(path, model=...)``. This module needs the models, ``slt_jax.masking`` and
``slt_jax.frozen`` only, so a ticket loads without the training stack.
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
from slt_jax.frozen import init_variables, load_params_file, round_frozen
from slt_jax.models import create_model

FORMAT_VERSION = 1
# The zoo's models take ``train``; a ticket of another model records its own init arguments.
ZOO_INIT_KWARGS = {"train": False}


MASK_CODINGS = ("packbits", "golomb")


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


def decode_masks(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Inverse of ``encode_masks``, keyed by path name."""
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


def save_ticket(path: str, meta: dict[str, Any], masks: Any, model_state: dict[str, Any] | None = None,
                coding: str = "packbits") -> None:
    """Writes a ticket directory atomically: a crash mid-write leaves any previous ticket intact.

    ``masks``: the binary gate masks, shaped like the params (``method.binary_masks(gates)``).
    ``meta`` needs ``seed`` (the weights' seed) and ``input_shape`` (without the batch axis); a
    zoo model adds ``model`` (its spec), any other module its ``init_kwargs`` if it needs some.
    Optional: ``frozen_dtype``, ``frozen_from`` ({"path", "sha256"}), ``preprocessing``, ``metrics``.
    """
    missing = [k for k in ("seed", "input_shape") if k not in meta]
    if missing:
        raise ValueError(f"ticket meta lacks {', '.join(missing)}; required: seed, input_shape")
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
    """A loaded ticket on ``model`` (a Flax Linen module).

    ``gate_masks`` holds the stored binary gates and ``mask`` every leaf's mask (a structured
    unit's bias included); both are params-shaped, with None for leaves that are not gated."""

    def __init__(self, meta: dict[str, Any], gate_masks: dict[str, np.ndarray], state: dict[str, np.ndarray] | None,
                 model: Any, frozen_from: str | None = None):
        self.meta = meta
        self.model = model
        self._named_gates = gate_masks
        self._flat_state = state
        self._frozen_from = frozen_from

    @functools.cached_property
    def _variables(self) -> dict[str, Any]:
        init_kwargs = self.meta.get("init_kwargs", ZOO_INIT_KWARGS if "model" in self.meta else {})
        variables = init_variables(self.model, tuple(self.meta["input_shape"]), self.meta["seed"], init_kwargs)
        unknown = sorted(set(self._named_gates) - set(masking.named_leaves(variables["params"])))
        if unknown:
            raise ValueError(f"the ticket's mask names {', '.join(unknown)}, which the model does not have; "
                             "load it with the model it was made with")
        return variables

    @functools.cached_property
    def _frozen(self) -> Any:
        params = self._variables["params"]
        source = self.meta.get("frozen_from")
        if source:
            params = load_params_file(self._frozen_from or source["path"], params, source["sha256"])
        return jax.device_get(round_frozen(params, self.meta.get("frozen_dtype", "float32")))

    def frozen_params(self) -> Any:
        """The network's initial weights: regenerated from the seed (or read from the recorded params
        file, sha256-checked) and rounded to the run's frozen_dtype."""
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
        kwargs = self.meta.get("init_kwargs", ZOO_INIT_KWARGS if "model" in self.meta else {})
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


def load_ticket(path: str, model: Any = None, frozen_from: str | None = None) -> Ticket:
    """Loads a ticket directory written by ``save_ticket`` (any run's ``WORKDIR/ticket``).

    ``model``: the Flax module the ticket was made on; needed unless the ticket records a zoo
    spec. ``frozen_from``: where the recorded params file lies now, if it moved (its sha256 must
    still match).
    """
    meta_path = os.path.join(path, "ticket.json")
    if not os.path.isfile(meta_path):
        raise FileNotFoundError(f"{path!r} is not a ticket directory: it has no ticket.json")
    with open(meta_path) as f:
        meta = json.load(f)
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"ticket format_version {meta.get('format_version')!r}; this slt_jax reads {FORMAT_VERSION}")
    if model is None:
        if "model" not in meta:
            raise ValueError(f"ticket {path!r} is of a model outside the zoo; pass it: load_ticket(path, model=module)")
        model = create_model(meta["model"])
    with np.load(os.path.join(path, "mask.npz")) as f:
        masks = decode_masks({k: f[k] for k in f.files})
    state = None
    if os.path.exists(os.path.join(path, "state.npz")):
        with np.load(os.path.join(path, "state.npz")) as f:
            state = {k: f[k] for k in f.files}
    return Ticket(meta, masks, state, model, frozen_from)
