"""The product of a run: a strong lottery ticket, stored as seed + bit-packed binary mask.

A ticket directory holds

* ``ticket.json``: model spec, input shape, weight-init seed, gating (policy, structured),
  input preprocessing, the method and the metrics measured on it, and its size in bits;
* ``mask.npz``: for each gated leaf, keyed by the leaf's path name, its shape and its binary
  gates, one bit per gate (``np.packbits``) or Golomb-coded (``slt_jax.mask_coding``; about
  half a bit per gate at 90% sparsity);
* ``state.npz``, only for models with running statistics (BatchNorm): those statistics;
* ``redraws.npz``, only for methods that re-draw weights (IteRand): per gated leaf, each kept
  weight's generation (uint8/uint16; 0 = the seed's own weight, j = its j-th re-draw; 0 for
  pruned weights, whose values the ticket never uses).

``ticket.json`` (format 2) also records ``mask_integrity``: per gated leaf its shape, kept gates
and the sha256 of its packed bits (``np.packbits`` of the flattened mask, whatever the coding),
the sha256 of all leaves' packed bits in name order, the gate count, and the gated-weight count
and sparsity (as ``verify_ticket.py`` counts them; also written to ``size.gated_weights`` and
``metrics.sparsity``), plus ``state_sha256`` when there is a ``state.npz`` and ``redraws_sha256``
when there is a ``redraws.npz``. ``load_ticket``
refuses a ticket that disagrees with it, or that is damaged in any other way, with a one-line
``TicketError`` (a ``ValueError``) naming the file and leaf. Format-1 tickets (written before
``mask_integrity`` existed) still load, with every check but those against the record.

No float weights are stored: ``frozen_params()`` regenerates them from the seed, bit-exact (or
reads the params file the run started from, checking its sha256; a biprop ticket, recorded as
``"weights": "binarized"``, then takes sign(w0) times the kept weights' mean magnitude per leaf, a
function of the seed and the mask; an IteRand ticket's kept weights come from their
generation's draw, ``slt_jax.frozen.redrawn_weights``), and ``masked_params()`` is exactly ``where(mask, frozen, 0)``
on gated leaves. ``ticket.json`` needs ``seed`` and
``input_shape``; ``model`` (a zoo spec) lets a ticket reload alone, any other Flax module is
passed to ``load_ticket(path, model=...)``. This module needs the models, ``slt_jax.masking`` and
``slt_jax.frozen`` only, so a ticket loads without the training stack.
"""
from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import re
import secrets
import shutil
import socket
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from slt_jax import mask_coding, masking
from slt_jax.data.arrays import preprocess
from slt_jax.frozen import (MASKED_WEIGHTS, init_variables, load_params_file, params_by_generation, redrawn_weights,
                             round_frozen, weights_key)
from slt_jax.models import create_model

# 2: ticket.json records ``mask_integrity`` (each gated leaf's shape, kept count and sha256, the
# whole mask's sha256, the gated-weight count and sparsity), which load_ticket checks. Tickets of
# format 1 (written before) still load, without those checks: they record nothing to check against.
FORMAT_VERSION = 2
READABLE_FORMAT_VERSIONS = (1, 2)
# The zoo's models take ``train``; a ticket of another model records its own init arguments.
ZOO_INIT_KWARGS = {"train": False}


MASK_CODINGS = ("packbits", "golomb")
_MASK_KINDS = ("shape", "bits", "golomb", "header")
_TMP_PREFIX = ".ticket-tmp-"
_TMP_NAME = re.compile(r"^\.ticket-tmp-(\d+)-([0-9a-f]{8})-(.+)$")


class TicketError(ValueError):
    """A ticket directory that is damaged or does not fit its model. The message is one line naming
    the ticket's file (and leaf) and what is wrong with it."""


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


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


def _group_mask_arrays(arrays: dict[str, np.ndarray], where: str) -> dict[str, dict[str, np.ndarray]]:
    leaves: dict[str, dict[str, np.ndarray]] = {}
    for key, value in arrays.items():
        name, sep, kind = key.rpartition("::")
        if not sep or not name or kind not in _MASK_KINDS:
            raise TicketError(f"{where}: key {key!r} is not LEAF::shape, LEAF::bits, LEAF::golomb or LEAF::header")
        leaves.setdefault(name, {})[kind] = value
    return leaves


def _leaf_shape(name: str, kinds: dict[str, np.ndarray], where: str) -> tuple[int, ...]:
    if "shape" not in kinds:
        raise TicketError(f"{where}: leaf {name!r} lacks its {name}::shape")
    shape = kinds["shape"]
    if shape.ndim != 1 or shape.dtype.kind not in "iu" or shape.size > 32 or (shape < 0).any():
        raise TicketError(f"{where}: leaf {name!r} has shape {shape.tolist()!r} (dtype {shape.dtype}); "
                          "allowed: a list of non-negative integers")
    return tuple(int(s) for s in shape)


def _decode_leaf(name: str, kinds: dict[str, np.ndarray], shape: tuple[int, ...], where: str) -> np.ndarray:
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
                raise ValueError(f"its {name}::header is not JSON ({_one_line(e)})") from None
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
    leaves = _group_mask_arrays(arrays, where)
    return {name: _decode_leaf(name, kinds, _leaf_shape(name, kinds, where), where) for name, kinds in leaves.items()}


def _mask_sha256(m: np.ndarray) -> str:
    """sha256 of a mask's gates, one bit each, packed (``np.packbits`` of the flattened mask)."""
    return hashlib.sha256(np.packbits(np.asarray(m, bool).ravel()).tobytes()).hexdigest()


def _whole_mask_sha256(named: dict[str, np.ndarray]) -> str:
    """sha256 of every gated leaf's packed bits, concatenated in name order."""
    h = hashlib.sha256()
    for name in sorted(named):
        h.update(np.packbits(np.asarray(named[name], bool).ravel()).tobytes())
    return h.hexdigest()


def _state_sha256(flat: dict[str, np.ndarray]) -> str:
    """sha256 of the model state: each array's name, dtype, shape and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(flat):
        a = np.ascontiguousarray(flat[name])
        h.update(f"{name}\0{a.dtype.str}\0{list(a.shape)}\0".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _redraws_sha256(flat: dict[str, np.ndarray]) -> str:
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


def _variable_shapes(model: Any, meta: dict[str, Any]) -> Any:
    """The model's variables as zero-cost arrays of their shapes (nothing is computed or allocated)."""
    init_kwargs = meta.get("init_kwargs", ZOO_INIT_KWARGS if "model" in meta else {})
    dummy = jnp.zeros((1, *meta["input_shape"]), jnp.float32)
    shapes = jax.eval_shape(lambda: model.init(weights_key(int(meta["seed"])), dummy, **init_kwargs))
    return jax.tree.map(lambda s: np.broadcast_to(np.zeros((), bool), s.shape), shapes)


def _weight_counts(params: Any, named: dict[str, np.ndarray]) -> tuple[int, float]:
    """Gated weights and the fraction of them a binary mask removes, counted as the harness and the
    verifier count them: every leaf with a mask (a structured unit's bias included)."""
    gates = jax.tree_util.tree_map_with_path(lambda p, _: named.get(masking.path_name(p)), params)
    report = masking.sparsity_report(params, gates)
    return int(report["gated_weights"]), float(report["sparsity"])


def _looks_per_unit(shape: tuple[int, ...]) -> bool:
    return len(shape) >= 2 and sum(s != 1 for s in shape) <= 1


def _integrity_record(named: dict[str, np.ndarray], meta: dict[str, Any], model: Any) -> dict[str, Any]:
    """``mask_integrity`` for ticket.json. The gated weights are counted on the model's parameter
    shapes (a zoo spec in ``meta``, or ``model``); without them, on the gates themselves, which is
    the same count when every gate is one weight's. When that cannot be told (a structured mask of a
    module outside the zoo), the weight counts are left out, with a warning."""
    leaves = {name: {"shape": list(np.shape(m)), "kept": int(np.sum(m)), "sha256": _mask_sha256(m)}
              for name, m in sorted(named.items())}
    gates = sum(math.prod(r["shape"]) for r in leaves.values())
    kept = sum(r["kept"] for r in leaves.values())
    record: dict[str, Any] = {"leaves": leaves, "sha256": _whole_mask_sha256(named), "gates": gates,
                              "kept_gates": kept, "gated_weights": None, "sparsity": None}
    if model is None and "model" in meta:
        model = create_model(meta["model"])
    if model is not None:
        params = _variable_shapes(model, meta)["params"]
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
                      "pass save_ticket(..., model=module) to record them (verify_ticket.py checks them)",
                      stacklevel=3)
    return record


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


def _with_counts(meta: dict[str, Any], record: dict[str, Any]) -> dict[str, Any]:
    """``meta`` with ``size.gated_weights`` and ``metrics.sparsity`` (what verify_ticket.py reads)
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


def _host() -> str:
    return socket.gethostname().replace(os.sep, "_") or "localhost"


def _pid_alive(pid: int) -> bool:
    if os.name != "posix":  # no signal 0 to ask with: count it alive, keep its directory
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process: alive
        return True
    return True


def _remove_stale_tmp(parent: str) -> None:
    """Removes the ``.ticket-tmp-*`` directories beside a ticket that no save is writing any more: one
    a killed save left behind (its process, on this host, is gone) or one of an older slt_jax (no
    process recorded). Nothing else is touched; links are never followed."""
    host = _host()
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return
    for entry in entries:
        if not entry.name.startswith(_TMP_PREFIX) or not entry.is_dir(follow_symlinks=False):
            continue
        tag = _TMP_NAME.match(entry.name)
        if tag and (tag.group(3) != host or _pid_alive(int(tag.group(1)))):
            continue  # a save in progress, or one on another host we cannot ask
        shutil.rmtree(entry.path, ignore_errors=True)


def _make_tmp_dir(parent: str) -> str:
    """A fresh ``.ticket-tmp-PID-XXXXXXXX-HOST`` directory, created with the umask's permissions (the
    ticket directory is this directory renamed)."""
    host = _host()
    while True:
        tmp = os.path.join(parent, f"{_TMP_PREFIX}{os.getpid()}-{secrets.token_hex(4)}-{host}")
        try:
            os.mkdir(tmp, 0o777)
            return tmp
        except FileExistsError:
            continue


def save_ticket(path: str, meta: dict[str, Any], masks: Any, model_state: dict[str, Any] | None = None,
                coding: str = "packbits", model: Any = None, generation: Any = None) -> None:
    """Writes a ticket directory atomically: a crash mid-write leaves any previous ticket intact.

    ``masks``: the binary gate masks, shaped like the params (``method.binary_masks(gates)``).
    ``meta`` needs ``seed`` (the weights' seed) and ``input_shape`` (without the batch axis); a
    zoo model adds ``model`` (its spec), any other module its ``init_kwargs`` if it needs some.
    Optional: ``frozen_dtype``, ``frozen_from`` ({"path", "sha256"}), ``preprocessing``, ``metrics``.
    ``model``: the Flax module of a ticket outside the zoo; with it, a structured mask's gated
    weights are counted (without it only an unstructured mask's are). ``generation``: for a method
    that re-draws weights (IteRand), each gated weight's generation (ints shaped like ``masks``);
    the kept weights' are stored in ``redraws.npz`` and replayed by ``frozen_params()``.

    ticket.json also records ``mask_integrity`` (each gated leaf's shape, kept gates and sha256, the
    whole mask's sha256, gates, gated weights and sparsity), and ``size.gated_weights`` and
    ``metrics.sparsity`` measured on the mask; ``load_ticket`` refuses a mask that disagrees. The
    directory follows the umask; ``.ticket-tmp-*`` directories that killed saves left beside it
    are removed.
    """
    missing = [k for k in ("seed", "input_shape") if k not in meta]
    if missing:
        raise ValueError(f"ticket meta lacks {', '.join(missing)}; required: seed, input_shape")
    named = {name: np.asarray(m, bool) for name, m in masking.named_leaves(masks).items()}
    if not named or not sum(m.size for m in named.values()):
        raise ValueError("the masks gate nothing: a ticket needs at least one gated leaf")
    arrays = encode_masks(masks, coding)
    record = _integrity_record(named, meta, model)
    meta = _with_counts(meta, record)
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    _remove_stale_tmp(parent)
    tmp = _make_tmp_dir(parent)
    try:
        np.savez(os.path.join(tmp, "mask.npz"), **arrays)
        if model_state:
            flat = {k: np.asarray(v) for k, v in masking.named_leaves(model_state).items()}
            np.savez(os.path.join(tmp, "state.npz"), **flat)
            record["state_sha256"] = _state_sha256(flat)
        if generation is not None:
            kept = _kept_generations(named, generation)
            np.savez_compressed(os.path.join(tmp, "redraws.npz"), **kept)
            record["redraws_sha256"] = _redraws_sha256(kept)
        with open(os.path.join(tmp, "ticket.json"), "w") as f:
            json.dump({**meta, "format_version": FORMAT_VERSION, "mask_coding": coding, "mask_integrity": record},
                      f, indent=2, sort_keys=True)
        old = path + ".old"
        if os.path.exists(path):
            if os.path.lexists(old):  # a save killed after its rename left it: the ticket at path is newer
                shutil.rmtree(old)
            os.replace(path, old)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _kept_generations(named_masks: dict[str, np.ndarray], generation: Any) -> dict[str, np.ndarray]:
    """Each gated leaf's generations where its mask keeps the weight, 0 elsewhere, in the smallest
    unsigned dtype that holds them."""
    out = {}
    for name, g in masking.named_leaves(generation).items():
        g = np.where(named_masks[name], np.asarray(g), 0)
        if g.min(initial=0) < 0 or g.max(initial=0) > np.iinfo(np.uint16).max:
            raise ValueError(f"generation of {name!r} outside [0, 65535]")
        out[name] = g.astype(np.uint8 if g.max(initial=0) <= np.iinfo(np.uint8).max else np.uint16)
    return out


def _unflatten_like(template: Any, flat: dict[str, np.ndarray]) -> Any:
    return jax.tree_util.tree_map_with_path(lambda p, _: flat[masking.path_name(p)], template)


class Ticket:
    """A loaded ticket on ``model`` (a Flax Linen module).

    ``gate_masks`` holds the stored binary gates and ``mask`` every leaf's mask (a structured
    unit's bias included); both are params-shaped, with None for leaves that are not gated."""

    def __init__(self, meta: dict[str, Any], gate_masks: dict[str, np.ndarray], state: dict[str, np.ndarray] | None,
                 model: Any, frozen_from: str | None = None, generations: dict[str, np.ndarray] | None = None):
        self.meta = meta
        self.model = model
        self._named_gates = gate_masks
        self._flat_state = state
        self._frozen_from = frozen_from
        self._generations = generations

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
        frozen_dtype = self.meta.get("frozen_dtype", "float32")
        params = round_frozen(params, frozen_dtype)
        if self._generations is not None:  # IteRand: each kept weight from its generation's draw
            init_kwargs = self.meta.get("init_kwargs", ZOO_INIT_KWARGS if "model" in self.meta else {})
            draw = params_by_generation(self.model, tuple(self.meta["input_shape"]), self.meta["seed"], init_kwargs,
                                        frozen_dtype)
            generation = jax.tree_util.tree_map_with_path(
                lambda p, _: self._generations.get(masking.path_name(p)), params)
            params = redrawn_weights(lambda g: params if g == 0 else draw(g), generation)
        name = self.meta.get("weights")
        if name is not None:  # e.g. biprop: the kept weights' signs times their mean magnitude, from the mask
            if name not in MASKED_WEIGHTS:
                raise TicketError(f"ticket.json: weights={name!r}; allowed: {', '.join(sorted(MASKED_WEIGHTS))} "
                                  "or none")
            params = MASKED_WEIGHTS[name](params, self.gate_masks)
        return jax.device_get(params)

    def frozen_params(self) -> Any:
        """The network's initial weights: regenerated from the seed (or read from the recorded params
        file, sha256-checked) and rounded to the run's frozen_dtype; an IteRand ticket's kept weights
        from their generations' draws."""
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


def _read_npz(path: str, where: str) -> dict[str, np.ndarray]:
    """Every array of an ``.npz``, or ``TicketError``: not there, not a zip of ``.npy`` files, an
    array whose header claims more data than the archive holds (checked before it is allocated),
    pickled objects, or any other read failure."""
    import zipfile

    if not os.path.isfile(path):
        raise TicketError(f"{where} is missing")
    if not zipfile.is_zipfile(path):
        raise TicketError(f"{where} is not an .npz archive (not a zip file)")
    try:
        with zipfile.ZipFile(path) as z:
            for info in z.infolist():
                if not info.filename.endswith(".npy"):
                    raise ValueError(f"member {info.filename!r} is not an .npy array")
                with z.open(info) as f:
                    version = np.lib.format.read_magic(f)
                    if version == (1, 0):
                        shape, _, dtype = np.lib.format.read_array_header_1_0(f)
                    elif version == (2, 0):
                        shape, _, dtype = np.lib.format.read_array_header_2_0(f)
                    else:
                        raise ValueError(f"member {info.filename!r} is .npy version {version}, not 1.0 or 2.0")
                if dtype.hasobject:
                    raise ValueError(f"member {info.filename!r} holds Python objects")
                if math.prod(shape) * dtype.itemsize > info.file_size:
                    raise ValueError(f"member {info.filename!r} claims shape {list(shape)} of {dtype}, more than "
                                     f"its {info.file_size} bytes")
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}
    except Exception as e:  # zipfile.BadZipFile, zlib.error, OSError, ValueError, EOFError, ...: damaged
        raise TicketError(f"{where} cannot be read ({_one_line(e)})") from None


def _read_meta(path: str) -> dict[str, Any]:
    meta_path = os.path.join(path, "ticket.json")
    if not os.path.isfile(meta_path):
        raise FileNotFoundError(f"{path!r} is not a ticket directory: it has no ticket.json")
    where = f"{meta_path}"
    try:
        with open(meta_path, "rb") as f:
            meta = json.loads(f.read().decode("utf-8"))
    except (OSError, ValueError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise TicketError(f"{where} cannot be read as JSON ({_one_line(e)})") from None
    if not isinstance(meta, dict):
        raise TicketError(f"{where} holds a JSON {type(meta).__name__}, not an object")
    version = meta.get("format_version")
    if version not in READABLE_FORMAT_VERSIONS:
        raise TicketError(f"{where}: format_version {version!r}; this slt_jax reads "
                          f"{', '.join(map(str, READABLE_FORMAT_VERSIONS))}")
    missing = [k for k in ("seed", "input_shape") if k not in meta]
    if missing:
        raise TicketError(f"{where} lacks {', '.join(missing)}")
    seed, shape = meta["seed"], meta["input_shape"]
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TicketError(f"{where}: seed {seed!r} is not an integer")
    if (not isinstance(shape, list) or not shape or len(shape) > 8
            or not all(isinstance(d, int) and not isinstance(d, bool) and 0 < d <= 1 << 20 for d in shape)):
        raise TicketError(f"{where}: input_shape {shape!r} is not a list of positive integers")
    if version >= 2:
        record = meta.get("mask_integrity")
        if not (isinstance(record, dict) and isinstance(record.get("leaves"), dict) and record["leaves"]
                and all(isinstance(r, dict) and isinstance(r.get("shape"), list) and isinstance(r.get("sha256"), str)
                        for r in record["leaves"].values())):
            raise TicketError(f"{where}: format_version {version} needs mask_integrity with each gated leaf's "
                              "shape and sha256; it is missing or damaged")
    return meta


def _check_masks(path: str, arrays: dict[str, np.ndarray], params: Any, meta: dict[str, Any]) -> dict[str, np.ndarray]:
    """The gate masks of ``mask.npz``, each checked before it is decoded (its leaf is the model's, its
    shape fits its parameter and is the recorded one, its code is as long as its shape needs) and
    after (its sha256 and the whole mask's are the recorded ones, and so are the weight counts)."""
    where = os.path.join(path, "mask.npz")
    record = meta.get("mask_integrity")
    leaves = _group_mask_arrays(arrays, where)
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
        shape = _leaf_shape(name, kinds, where)
        if record is not None and list(shape) != recorded[name]["shape"]:
            raise TicketError(f"{where}: leaf {name!r} has shape {list(shape)}, ticket.json records "
                              f"{recorded[name]['shape']}")
        if not _fits(shape, shapes[name]):
            raise TicketError(f"{where}: leaf {name!r} has shape {list(shape)}, which does not fit its "
                              f"parameter of shape {list(shapes[name])}")
        masks[name] = _decode_leaf(name, kinds, shape, where)
        if record is not None and _mask_sha256(masks[name]) != recorded[name]["sha256"]:
            raise TicketError(f"{where}: the mask of leaf {name!r} is not the one saved (its sha256 differs from "
                              "ticket.json's): the file is damaged")
    if record is not None:
        if record.get("sha256") not in (None, _whole_mask_sha256(masks)):
            raise TicketError(f"{where}: the whole mask's sha256 differs from ticket.json's: the file is damaged")
        counted = _weight_counts(params, masks)
        for key, value in zip(("gated_weights", "sparsity"), counted):
            if record.get(key) is not None and (record[key] != value if key == "gated_weights"
                                                 else abs(record[key] - value) > 1e-12):
                raise TicketError(f"{where}: the mask gates {counted[0]} weights at sparsity {counted[1]:.6f} of this "
                                  f"model, ticket.json records {record.get('gated_weights')} at "
                                  f"{record.get('sparsity')}: another model, or a damaged ticket")
    return masks


def _check_state(path: str, state: dict[str, np.ndarray], template: dict[str, Any], meta: dict[str, Any]) -> None:
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
    if recorded is not None and _state_sha256(state) != recorded:
        raise TicketError(f"{where} is not the state saved (its sha256 differs from ticket.json's): "
                          "the file is damaged")


def _check_redraws(path: str, generations: dict[str, np.ndarray], masks: dict[str, np.ndarray],
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
    if recorded is None or _redraws_sha256(generations) != recorded:
        raise TicketError(f"{where} is not the one saved (its sha256 differs from ticket.json's, or ticket.json "
                          "records none): the file is damaged")


def load_ticket(path: str, model: Any = None, frozen_from: str | None = None) -> Ticket:
    """Loads a ticket directory written by ``save_ticket`` (any run's ``WORKDIR/ticket``).

    ``model``: the Flax module the ticket was made on; needed unless the ticket records a zoo
    spec. ``frozen_from``: where the recorded params file lies now, if it moved (its sha256 must
    still match).

    A damaged ticket is refused with a one-line ``TicketError`` (a ``ValueError``) naming the file
    and leaf: bad JSON, missing or unreadable ``mask.npz``, missing keys, codes or shapes that do
    not fit the model (checked before anything is allocated), a ``state.npz`` that does not fit,
    and, for tickets of format 2, a mask whose sha256, leaves or weight counts differ from
    ``mask_integrity``. Tickets of format 1 load without the sha256 checks.
    """
    meta = _read_meta(path)
    if model is None:
        if "model" not in meta:
            raise ValueError(f"ticket {path!r} is of a model outside the zoo; pass it: load_ticket(path, model=module)")
        try:
            model = create_model(meta["model"])
        except Exception as e:
            raise TicketError(f"{os.path.join(path, 'ticket.json')}: its model {meta['model']!r} cannot be built "
                              f"({_one_line(e)})") from None
    try:
        variables = _variable_shapes(model, meta)
    except Exception as e:
        raise TicketError(f"{os.path.join(path, 'ticket.json')}: the model cannot be initialised on input_shape "
                          f"{meta['input_shape']} ({_one_line(e)[:300]})") from None
    masks = _check_masks(path, _read_npz(os.path.join(path, "mask.npz"), os.path.join(path, "mask.npz")),
                         variables["params"], meta)
    state = None
    state_path = os.path.join(path, "state.npz")
    if os.path.lexists(state_path):
        state = _read_npz(state_path, state_path)
        _check_state(path, state, {k: v for k, v in variables.items() if k != "params"}, meta)
    generations = None
    redraws_path = os.path.join(path, "redraws.npz")
    if os.path.lexists(redraws_path) or (meta.get("mask_integrity") or {}).get("redraws_sha256"):
        generations = _read_npz(redraws_path, redraws_path)
        _check_redraws(path, generations, masks, meta)
    return Ticket(meta, masks, state, model, frozen_from, generations)
