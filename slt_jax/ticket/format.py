"""The ticket directory: its files, ``ticket.json``'s schema and versions; ``save_ticket``, ``load_ticket``.

A ticket directory holds

* ``ticket.json``: model spec, input shape, weight-init seed, gating (policy, structured),
  input preprocessing, the method and the metrics measured on it, its size in bits, and
  ``mask_integrity`` (``slt_jax.ticket.integrity``);
* ``mask.npz``: each gated leaf's shape and binary gates, bit-packed or Golomb-coded
  (``slt_jax.ticket.coding``);
* ``state.npz``, only for models with running statistics (BatchNorm): those statistics;
* ``redraws.npz``, only for methods that re-draw weights (IteRand): per gated leaf, each kept
  weight's generation (uint8/uint16; 0 = the seed's own weight, j = its j-th re-draw; 0 for
  pruned weights, whose values the ticket never uses).

``ticket.json`` needs ``seed`` and ``input_shape``; ``model`` (a zoo spec) lets a ticket reload
alone, any other Flax module is passed to ``load_ticket(path, model=...)``; an NNX model's ticket
(``"framework": "nnx"``, ``slt_jax.nnx_gating.GatedModel.save_ticket``) is passed the function that
builds it, ``load_ticket(path, model_factory=...)``. ``method`` names the method that made the
mask. ``load_ticket`` refuses a damaged ticket with a one-line ``TicketError`` (a ``ValueError``) naming the file and
leaf. Format-1 tickets (written before ``mask_integrity`` existed) still load, with every check but
those against the record.
"""
from __future__ import annotations

import json
import math
import os
import warnings
from typing import Any

import jax
import numpy as np

from slt_jax import masking
from slt_jax.frozen import init_variables, round_frozen
from slt_jax.models import create_model
from slt_jax.ticket.atomic_directory import replaced_atomically
from slt_jax.ticket.coding import encode_masks
from slt_jax.ticket.destination import check_destination
from slt_jax.ticket.errors import TicketError, one_line
from slt_jax.ticket.integrity import (check_masks, check_redraws, check_state, integrity_record, redraws_sha256,
                                      state_sha256, with_counts)
from slt_jax.ticket.predict import Ticket
from slt_jax.ticket.regenerate import init_kwargs, kept_weights_digest, network_weights, variable_shapes
from slt_jax.ticket.save_checks import binary_leaves, check_finite_gates, with_method
from slt_jax.weights_fingerprint import current_settings, mismatch_cause

# 2: ticket.json records ``mask_integrity`` (each gated leaf's shape, kept count and sha256, the
# whole mask's sha256, the gated-weight count and sparsity), which load_ticket checks. Tickets of
# format 1 (written before) still load, without those checks: they record nothing to check against.
# 3: ticket.json records ``weights_fingerprint`` (slt_jax.weights_fingerprint): the weights are
# redrawn under the jax flags it records and checked against its digest. Tickets of format 1 and 2
# still load, drawn under this process's flags, without that check: they record neither.
FORMAT_VERSION = 3
READABLE_FORMAT_VERSIONS = (1, 2, 3)


def save_ticket(path: str, meta: dict[str, Any], masks: Any, model_state: dict[str, Any] | None = None,
                coding: str = "packbits", model: Any = None, generation: Any = None, frozen: Any = None, *,
                method: Any = None, gates: Any = None) -> None:
    """Writes a ticket directory atomically: a crash mid-write leaves any previous ticket intact.

    ``masks``: the binary gate masks, shaped like the params (``method.binary_masks(gates)``).
    ``meta`` needs ``seed`` (the weights' seed) and ``input_shape`` (without the batch axis); a
    zoo model adds ``model`` (its spec), any other module its ``init_kwargs`` if it needs some.
    Optional: ``frozen_dtype``, ``frozen_from`` ({"path", "sha256"}), ``preprocessing``, ``metrics``.
    ``model``: the Flax module of a ticket outside the zoo; with it, a structured mask's gated
    weights are counted (without it only an unstructured mask's are). ``generation``: for a method
    that re-draws weights (IteRand), each gated weight's generation (ints shaped like ``masks``);
    the kept weights' are stored in ``redraws.npz`` and replayed by ``frozen_params()``.
    ``method``: the ``Method`` that made the mask, or its name (required, unless ``meta["method"]``
    names it): ticket.json records it, and biprop's ``"weights": "binarized"``; a method that
    re-draws weights needs ``generation``. ``gates``: the gate values the masks came from, refused
    if any is NaN or infinite (``slt_jax.ticket.save_checks``).

    Nothing but a ticket is replaced: a ``path`` (or ``PATH.old``) that is a file, a link or a
    directory of other files is refused with one line (``slt_jax.ticket.destination``), as is a
    mask with values other than 0 and 1.

    ``frozen``: the params the gates were trained on (``init_variables(...)["params"]``,
    ``variables["frozen"]`` of ``slt_jax.gated``). ticket.json records their ``weights_fingerprint``
    (the sha256 of every weight the mask keeps, per leaf and whole, and the jax version, x64 and
    threefry-partitionable flags, frozen dtype and params file they were drawn under), and
    ``load_ticket`` refuses a model or seed that does not draw them. With the module at hand (a zoo
    spec in ``meta``, or ``model``) the seed is checked here already: weights that ``meta["seed"]``
    does not draw are refused with a one-line ``ValueError``. Without ``frozen`` (an older call),
    the fingerprint is that of the weights the seed draws when the module is at hand, none
    otherwise, and a warning says that the seed cannot be checked.

    ticket.json also records ``mask_integrity`` (each gated leaf's shape, kept gates and sha256, the
    whole mask's sha256, gates, gated weights and sparsity), and ``size.gated_weights`` and
    ``metrics.sparsity`` measured on the mask; ``load_ticket`` refuses a mask that disagrees. The
    directory follows the umask; ``.ticket-tmp-*`` directories that killed saves left beside it
    are removed.
    """
    missing = [k for k in ("seed", "input_shape") if k not in meta]
    if missing:
        raise ValueError(f"ticket meta lacks {', '.join(missing)}; required: seed, input_shape")
    check_destination(path)
    if model is not None and not (hasattr(model, "init") and hasattr(model, "apply")):
        raise ValueError(f"save_ticket: model={type(model).__name__} is not a Linen module (no init/apply); an NNX "
                         "model's ticket is saved with GatedModel.save_ticket(path, meta, model_factory=...)")
    meta = with_method(meta, method, generation)
    if gates is not None:
        check_finite_gates(gates)
    named = binary_leaves(masks)
    if not named or not sum(m.size for m in named.values()):
        raise ValueError("the masks gate nothing: a ticket needs at least one gated leaf")
    arrays = encode_masks(masks, coding)
    record = integrity_record(named, meta, model)
    meta = with_counts(meta, record)
    kept = None if generation is None else _kept_generations(named, generation)
    fingerprint = weights_fingerprint(meta, named, model, frozen, kept)
    if fingerprint is not None:
        meta = {**meta, "weights_fingerprint": fingerprint}
    with replaced_atomically(path) as tmp:
        np.savez(os.path.join(tmp, "mask.npz"), **arrays)
        if model_state:
            flat = {k: np.asarray(v) for k, v in masking.named_leaves(model_state).items()}
            np.savez(os.path.join(tmp, "state.npz"), **flat)
            record["state_sha256"] = state_sha256(flat)
        if kept is not None:
            np.savez_compressed(os.path.join(tmp, "redraws.npz"), **kept)
            record["redraws_sha256"] = redraws_sha256(kept)
        with open(os.path.join(tmp, "ticket.json"), "w") as f:
            json.dump({**meta, "format_version": FORMAT_VERSION, "mask_coding": coding, "mask_integrity": record},
                      f, indent=2, sort_keys=True)


def weights_fingerprint(meta: dict[str, Any], named: dict[str, np.ndarray], model: Any, frozen: Any,
                        generations: dict[str, np.ndarray] | None) -> dict[str, Any] | None:
    """ticket.json's ``weights_fingerprint``: the digest of the weights the mask keeps
    (``kept_weights_digest`` of ``frozen``, or of the weights the seed draws) and the settings they
    were drawn under. Refuses ``frozen`` that the seed does not draw, when the module is at hand."""
    source = meta.get("frozen_from") or {}
    settings = current_settings(meta.get("frozen_dtype", "float32"), source.get("sha256"))
    module = model if model is not None else create_model(meta["model"]) if "model" in meta else None
    drawn = None
    if module is not None:
        params = init_variables(module, tuple(meta["input_shape"]), meta["seed"], init_kwargs(meta))["params"]
        drawn = kept_weights_digest(network_weights(meta, module, params, None, generations), named)
    if frozen is None:
        warnings.warn(f"save_ticket: no frozen= (the params the gates were trained on): the ticket cannot check that "
                      f"seed {meta['seed']} drew them" + ("" if drawn else ", nor that a model loading it draws them"),
                      stacklevel=3)
        return None if drawn is None else {**drawn, "settings": settings}
    try:
        given = kept_weights_digest(jax.device_get(round_frozen(frozen, settings["frozen_dtype"])), named)
    except ValueError as e:
        raise ValueError(f"save_ticket: frozen= does not fit the masks: {one_line(e)}") from None
    if drawn is not None and drawn["sha256"] != given["sha256"]:
        what = (f"seed {meta['seed']} draws other weights on this model than frozen=: record the seed the weights "
                "were drawn from (slt_jax.weights_key(seed))")
        raise ValueError(f"save_ticket: {mismatch_cause({**given, 'settings': settings}, drawn, settings, what)}")
    return {**given, "settings": settings}


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
        raise TicketError(f"{where} cannot be read ({one_line(e)})") from None


def _read_meta(path: str) -> dict[str, Any]:
    meta_path = os.path.join(path, "ticket.json")
    if not os.path.isfile(meta_path):
        raise FileNotFoundError(f"{path!r} is not a ticket directory: it has no ticket.json")
    where = f"{meta_path}"
    try:
        with open(meta_path, "rb") as f:
            meta = json.loads(f.read().decode("utf-8"))
    except (OSError, ValueError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise TicketError(f"{where} cannot be read as JSON ({one_line(e)})") from None
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
    fingerprint = meta.get("weights_fingerprint")
    if fingerprint is not None and not (
            isinstance(fingerprint, dict) and isinstance(fingerprint.get("sha256"), str)
            and isinstance(fingerprint.get("leaves"), dict) and isinstance(fingerprint.get("settings"), dict)):
        raise TicketError(f"{where}: weights_fingerprint needs sha256, leaves and settings; it is damaged")
    return meta


def _ticket_model(path: str, meta: dict[str, Any], model: Any, model_factory: Any) -> Any:
    """The model argument a ticket needs: an NNX ticket's ``NNXModel(model_factory)``, a Linen
    ticket's module; the other kind is refused with one line saying which argument it takes."""
    nnx_ticket = meta.get("framework") == "nnx"
    if nnx_ticket and model_factory is None:
        raise ValueError(f"ticket {path!r} is of an NNX model; pass the function that builds it: "
                         "load_ticket(path, model_factory=lambda rngs: MyModel(..., rngs=rngs))")
    if not nnx_ticket and model_factory is not None:
        raise ValueError(f"ticket {path!r} is of a Linen model; model_factory= is for NNX tickets; pass "
                         "load_ticket(path, model=module) if it is outside the zoo")
    if model is not None and not (hasattr(model, "init") and hasattr(model, "apply")):
        raise ValueError(f"model={type(model).__name__} is not a Linen module (no init/apply); an NNX ticket loads "
                         "with load_ticket(path, model_factory=lambda rngs: MyModel(..., rngs=rngs))")
    if nnx_ticket:
        from slt_jax.ticket.nnx_model import NNXModel

        return NNXModel(model_factory)
    return model


def load_ticket(path: str, model: Any = None, frozen_from: str | None = None,
                model_factory: Any = None) -> Ticket:
    """Loads a ticket directory written by ``save_ticket`` (any run's ``WORKDIR/ticket``).

    ``model``: the Flax module the ticket was made on; needed unless the ticket records a zoo
    spec. ``frozen_from``: where the recorded params file lies now, if it moved (its sha256 must
    still match). ``model_factory``: for a ticket of an NNX model (``GatedModel.save_ticket``),
    the function ``rngs -> module`` it was built with; its weights are drawn from the recorded seed
    through it (``slt_jax.ticket.nnx_model``).

    A damaged ticket is refused with a one-line ``TicketError`` (a ``ValueError``) naming the file
    and leaf: bad JSON, missing or unreadable ``mask.npz``, missing keys, codes or shapes that do
    not fit the model (checked before anything is allocated), a ``state.npz`` that does not fit,
    and, for tickets of format 2 on, a mask whose sha256, leaves or weight counts differ from
    ``mask_integrity``. Tickets of format 1 load without the sha256 checks.

    A ticket that records ``weights_fingerprint`` (format 3, ``save_ticket``) has its weights drawn
    here, under the jax flags it records (``jax_enable_x64``, ``jax_threefry_partitionable``)
    whatever this process set, so it is the same network in any process; weights whose digest is
    not the recorded one are refused with a one-line ``TicketError`` naming the first differing leaf
    and the likely cause (another jax version, a seed or model that draws others); a replaced
    params file is refused by its sha256. A ticket without one (formats 1 and 2, or saved without
    ``frozen`` and without its module) loads without that check, its weights drawn under this
    process's flags.
    """
    meta = _read_meta(path)
    model = _ticket_model(path, meta, model, model_factory)
    if model is None:
        if "model" not in meta:
            raise ValueError(f"ticket {path!r} is of a model outside the zoo; pass it: load_ticket(path, model=module)")
        try:
            model = create_model(meta["model"])
        except Exception as e:
            raise TicketError(f"{os.path.join(path, 'ticket.json')}: its model {meta['model']!r} cannot be built "
                              f"({one_line(e)})") from None
    try:
        variables = variable_shapes(model, meta)
    except Exception as e:
        raise TicketError(f"{os.path.join(path, 'ticket.json')}: the model cannot be initialised on input_shape "
                          f"{meta['input_shape']} ({one_line(e)[:300]})") from None
    masks = check_masks(path, _read_npz(os.path.join(path, "mask.npz"), os.path.join(path, "mask.npz")),
                        variables["params"], meta)
    state = None
    state_path = os.path.join(path, "state.npz")
    if os.path.lexists(state_path):
        state = _read_npz(state_path, state_path)
        check_state(path, state, {k: v for k, v in variables.items() if k != "params"}, meta)
    generations = None
    redraws_path = os.path.join(path, "redraws.npz")
    if os.path.lexists(redraws_path) or (meta.get("mask_integrity") or {}).get("redraws_sha256"):
        generations = _read_npz(redraws_path, redraws_path)
        check_redraws(path, generations, masks, meta)
    ticket = Ticket(meta, masks, state, model, frozen_from, generations, path=path)
    if "weights_fingerprint" in meta:
        ticket.frozen_params()  # drawn now, so that weights other than the recorded ones are refused here
    return ticket
