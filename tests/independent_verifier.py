#!/usr/bin/env python3
"""Independent check of a ticket directory: the ticket contract, and accuracy from a numpy forward pass.

Written apart from ``slt_jax``'s own apply path, so that a bug there cannot vouch for itself:

* the weights are regenerated as the library documents it (``slt_jax.frozen.init_variables``
  from the seed, under the x64 and Threefry flags the ticket's fingerprint recorded
  (``slt_jax.weights_fingerprint.drawn_under``), or the recorded params file, rounded to
  ``frozen_dtype``; an IteRand ticket's kept weights from their generation's draw; a biprop
  ticket's, recorded as ``"weights": "binarized"``, sign(w0) times the kept weights' mean
  magnitude per leaf): they come from JAX's PRNG, so only JAX can draw them.
  ``Ticket.frozen_params()`` must equal them (exactly; a binarised leaf up to float32 rounding of
  its mean);
* every masked parameter is exactly its frozen value or exactly 0, the mask is binary,
  ``masked_params() == where(mask, frozen, 0)`` on gated leaves and ``frozen`` elsewhere, and the
  mask's gated-weight count and sparsity are those ticket.json recorded (a damaged mask fails);
* the accuracy is this file's own float64 numpy forward pass of ``where(mask, frozen, 0)`` on the
  raw images, preprocessed as ticket.json records (x = (raw * scale - mean) / std), never
  ``Ticket.predict`` or ``model.apply``.

Supported models (the zoo's networks without running statistics): the MLPs ``digits_mlp`` and
``lenet300`` (flatten, Dense + ReLU per hidden layer, Dense classifier; or the leaky ReLU
max(v, 0) + slope * min(v, 0) where the model spec records ``"activation": "leaky_relu"`` and its
``negative_slope``; no ``activation`` recorded: ReLU) and the ConvNets ``conv2``,
``conv4``, ``conv6``, ``conv8`` (3x3 convolutions, padding 1, ReLU, a 2x2 max-pool after every
second one, then Dense + ReLU layers and the classifier), any width, with or without biases,
unstructured or structured masks. Any other model is refused in one line.

Usage (from the project root, with the project installed)::

    python tests/independent_verifier.py RUN_DIR/ticket DATA.npz [--x x_val --y y_val]

prints one JSON line: accuracy, sparsity (fraction of gated weights that are zero), gated_weights.
A refused or failing ticket: one line on stderr naming what is wrong, exit status 1.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from typing import Any

import numpy as np

MLPS = ("digits_mlp", "lenet300")
CONVNETS = ("conv2", "conv4", "conv6", "conv8")
SUPPORTED = MLPS + CONVNETS
# Rows per forward-pass chunk: a Conv8 activation of 256 28x28x64 images in float64 is ~100 MB.
CHUNK = 256


class VerificationError(Exception):
    """The ticket breaks the contract, or this verifier cannot check it. One line."""


def verify(ticket_dir: str, x: np.ndarray, y: np.ndarray) -> dict[str, Any]:
    """Checks the ticket at ``ticket_dir`` and returns its accuracy on (``x`` raw images, ``y``
    labels), its sparsity and its gated-weight count, all computed here."""
    import slt_jax  # the loader decodes the mask and checks the files (TicketError on damage)

    ticket = slt_jax.load_ticket(ticket_dir)
    meta = ticket.meta
    name = (meta.get("model") or {}).get("name")
    if name not in SUPPORTED:
        raise VerificationError(f"model {name!r} is not supported by this verifier; supported: {', '.join(SUPPORTED)}")
    _, slope = _activation(meta.get("model") or {})
    if ticket.model_state():
        raise VerificationError(f"model {name!r} has running statistics ({', '.join(ticket.model_state())}), "
                                "which this verifier's forward pass does not apply")

    frozen = _named(ticket.frozen_params())
    _check_frozen(ticket_dir, meta, frozen, _named(ticket.mask))
    masked = _named(ticket.masked_params())
    mask = {k: v for k, v in _named(ticket.mask).items() if v is not None}
    if frozen.keys() != masked.keys():
        raise VerificationError("masked and frozen params differ in structure")
    ours = {}
    for leaf, f in frozen.items():
        m = np.asarray(masked[leaf])
        bad = ~((m == f) | (m == 0))
        if bad.any():
            raise VerificationError(f"{leaf}: {int(bad.sum())} weights are neither their frozen value nor 0")
        if leaf in mask:
            k = np.asarray(mask[leaf])
            if not (k.dtype == bool or set(np.unique(k).tolist()) <= {0, 1}):
                raise VerificationError(f"{leaf}: the mask is not binary")
            ours[leaf] = np.where(np.broadcast_to(k.astype(bool), f.shape), f, np.float32(0))
        else:
            ours[leaf] = f
        if not np.array_equal(m.view(np.uint32), np.asarray(ours[leaf], np.float32).view(np.uint32)):
            raise VerificationError(f"{leaf}: masked params != where(mask, frozen, 0)")
    total = sum(frozen[leaf].size for leaf in mask)
    kept = sum(int(np.broadcast_to(np.asarray(mask[leaf], bool), frozen[leaf].shape).sum()) for leaf in mask)
    if total == 0:
        raise VerificationError("the ticket gates no parameters")
    _check_recorded(ticket_dir, total, 1 - kept / total)

    inputs = _preprocess(np.asarray(x), meta.get("preprocessing"))
    if inputs.shape[1:] != tuple(meta["input_shape"]):
        raise VerificationError(f"the images are {list(inputs.shape[1:])} after preprocessing, the ticket's input "
                                f"shape is {meta['input_shape']}")
    weights = {leaf: np.asarray(w, np.float64) for leaf, w in ours.items()}
    pred = np.concatenate([np.argmax(_forward(name, weights, inputs[i:i + CHUNK], slope), -1)
                           for i in range(0, len(inputs), CHUNK)])
    return {"accuracy": float(np.mean(pred == np.asarray(y))), "sparsity": 1 - kept / total, "gated_weights": total}


def _activation(spec: dict[str, Any]) -> tuple[str, float]:
    """The hidden nonlinearity the spec records and its negative slope (0 for ReLU); a spec without
    one (a ticket from before the key) is ReLU. Anything else is refused."""
    activation = spec.get("activation", "relu")
    if activation == "relu":
        return activation, 0.0
    if activation != "leaky_relu":
        raise VerificationError(f"activation {activation!r} is not supported by this verifier; supported: relu, "
                                "leaky_relu")
    if spec.get("name") not in MLPS:
        raise VerificationError(f"activation {activation!r} on model {spec.get('name')!r}; this verifier applies "
                                f"it to the MLPs only ({', '.join(MLPS)})")
    slope = spec.get("negative_slope")
    if isinstance(slope, bool) or not isinstance(slope, (int, float)) or not 0 <= slope < 1:
        raise VerificationError(f"leaky_relu with negative_slope {slope!r}; this verifier needs the slope recorded, "
                                "a number in [0, 1)")
    return activation, float(slope)


def _named(tree: Any) -> dict[str, Any]:
    """Leaves keyed by '/'-joined path (``Dense_0/kernel``), None leaves kept; arrays as numpy."""
    import jax

    flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda v: v is None)[0]
    return {"/".join(str(k.key) for k in path): None if v is None else np.asarray(v) for path, v in flat}


def _initial_weights(meta: dict[str, Any], generation: int) -> dict[str, np.ndarray]:
    """The seed's weights of ``generation`` (0: the network itself; j: IteRand's j-th re-draw), or
    the recorded params file's, rounded to the run's frozen_dtype: the library's documented
    regeneration, called directly rather than through the ticket."""
    import jax.numpy as jnp

    from slt_jax.frozen import init_variables, load_params_file
    from slt_jax.models import create_model
    from slt_jax.ticket import ZOO_INIT_KWARGS
    from slt_jax.weights_fingerprint import drawn_under

    model = create_model(meta["model"])
    with drawn_under((meta.get("weights_fingerprint") or {}).get("settings")):  # the flags the seed was drawn under
        params = init_variables(model, tuple(meta["input_shape"]), meta["seed"], ZOO_INIT_KWARGS, generation)["params"]
    source = meta.get("frozen_from")
    if source and generation == 0:
        params = load_params_file(source["path"], params, source["sha256"])
    dtype = meta.get("frozen_dtype", "float32")
    return {leaf: np.asarray(jnp.asarray(w, dtype).astype(jnp.float32)) for leaf, w in _named(params).items()}


def _check_frozen(ticket_dir: str, meta: dict[str, Any], frozen: dict[str, np.ndarray],
                  mask: dict[str, np.ndarray | None]) -> None:
    """``frozen_params()`` are the regenerated weights: re-drawn where redraws.npz says, binarised
    where ticket.json says."""
    expected = _initial_weights(meta, 0)
    redraws = os.path.join(ticket_dir, "redraws.npz")
    if os.path.exists(redraws):
        with np.load(redraws) as f:
            generations = {k: f[k] for k in f.files}
        for g in sorted({int(v) for a in generations.values() for v in np.unique(a)} - {0}):
            draw = _initial_weights(meta, g)
            for leaf, gen in generations.items():
                where = np.broadcast_to(gen, expected[leaf].shape) == g
                expected[leaf] = np.where(where, draw[leaf], expected[leaf])
    weights = meta.get("weights")
    if weights not in (None, "binarized"):
        raise VerificationError(f"ticket.json: weights={weights!r}; this verifier knows 'binarized' or none")
    for leaf, w in expected.items():
        got = frozen.get(leaf)
        if got is None or got.shape != w.shape:
            raise VerificationError(f"{leaf}: frozen_params() has {None if got is None else list(got.shape)}, "
                                    f"the model {list(w.shape)}")
        if weights == "binarized" and mask.get(leaf) is not None:
            # biprop: sign(w0) * alpha, alpha the kept weights' mean magnitude: one magnitude per leaf,
            # the seed's signs, and alpha within the error bound of a float32 sum of n terms, n * 2^-24.
            kept = np.broadcast_to(np.asarray(mask[leaf], bool), w.shape)
            n = max(int(kept.sum()), 1)
            alpha = np.abs(w.astype(np.float64))[kept].sum() / n
            ok = (np.unique(np.abs(got)).size == 1 and np.array_equal(np.sign(got), np.sign(w) * (alpha > 0))
                  and abs(float(np.abs(got).flat[0]) - alpha) <= alpha * (n + 1) * 2.0 ** -24)
        else:
            ok = np.array_equal(got.view(np.uint32), w.view(np.uint32))
        if not ok:
            raise VerificationError(f"{leaf}: frozen_params() are not the regenerated weights")


def _check_recorded(ticket_dir: str, total: int, sparsity: float) -> None:
    """The mask must be the one the run measured: a truncated, dropped or flipped leaf changes these."""
    try:
        with open(os.path.join(ticket_dir, "ticket.json")) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise VerificationError(f"ticket.json cannot be read ({type(e).__name__})") from None
    recorded_total = (meta.get("size") or {}).get("gated_weights")
    recorded_sparsity = (meta.get("metrics") or {}).get("sparsity")
    if recorded_total is not None and total != recorded_total:
        raise VerificationError(f"the mask gates {total} weights, ticket.json records {recorded_total}: "
                                "a gated leaf is missing or damaged")
    if recorded_sparsity is not None and abs(sparsity - recorded_sparsity) >= 1e-9:
        raise VerificationError(f"the mask's sparsity {sparsity:.6f} != ticket.json's {recorded_sparsity:.6f}: "
                                "the mask is damaged")


def _preprocess(raw: np.ndarray, spec: dict[str, Any] | None) -> np.ndarray:
    """Raw images to float32 NHWC inputs, (raw * scale - mean) / std in float32 as recorded; none
    recorded: the images as they are."""
    x = raw.astype(np.float32)
    if x.ndim == 3:
        x = x[..., None]
    if spec:
        x = (x * np.float32(spec["scale"]) - np.asarray(spec["mean"], np.float32)) / np.asarray(spec["std"], np.float32)
    return x


def _layers(weights: dict[str, np.ndarray], kind: str) -> list[tuple[np.ndarray, np.ndarray | None]]:
    """(kernel, bias or None) of ``Conv_0, Conv_1, ...`` or ``Dense_0, ...``, in order."""
    indices = sorted(int(m.group(1)) for leaf in weights if (m := re.fullmatch(rf"{kind}_(\d+)/kernel", leaf)))
    if indices != list(range(len(indices))):
        raise VerificationError(f"the {kind} layers are numbered {indices}, not 0, 1, ...")
    return [(weights[f"{kind}_{i}/kernel"], weights.get(f"{kind}_{i}/bias")) for i in indices]


def _forward(name: str, weights: dict[str, np.ndarray], x: np.ndarray, slope: float = 0.0) -> np.ndarray:
    """Logits of the zoo's MLP or ConvNet on NHWC inputs ``x``, in float64; ``slope``: the MLP's
    hidden layers' negative slope (0: ReLU)."""
    known = {f"{kind}_{i}/{leaf}" for kind in ("Conv", "Dense") for i in range(len(weights))
             for leaf in ("kernel", "bias")}
    if not set(weights) <= known:
        raise VerificationError(f"model {name!r} has leaves {sorted(set(weights) - known)} this verifier does not know")
    h = x.astype(np.float64)
    convs = _layers(weights, "Conv")
    if (name in MLPS) == bool(convs):
        raise VerificationError(f"model {name!r} has {len(convs)} convolutions, which its name does not allow")
    for i, (kernel, bias) in enumerate(convs):
        h = np.maximum(_conv3x3(h, kernel, bias), 0)
        if i % 2 == 1:  # 2x2 max-pool, stride 2; an odd trailing row or column is dropped
            b, hh, ww, c = h.shape
            h = h[:, :hh - hh % 2, :ww - ww % 2].reshape(b, hh // 2, 2, ww // 2, 2, c).max(axis=(2, 4))
    h = h.reshape(len(h), -1)
    dense = _layers(weights, "Dense")
    for i, (kernel, bias) in enumerate(dense):
        h = h @ kernel + (0 if bias is None else bias)
        if i < len(dense) - 1:
            h = np.maximum(h, 0) + slope * np.minimum(h, 0)
    return h


def _conv3x3(x: np.ndarray, kernel: np.ndarray, bias: np.ndarray | None) -> np.ndarray:
    """'Same' 3x3 convolution (padding 1, stride 1) of NHWC ``x`` with an HWIO kernel: the sum over
    the 9 taps of a shifted input times that tap's (in, out) matrix (a cross-correlation, as Flax's)."""
    if kernel.shape[:2] != (3, 3):
        raise VerificationError(f"a convolution kernel of shape {list(kernel.shape)}; this verifier knows 3x3")
    b, h, w, _ = x.shape
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    out = np.zeros((b, h, w, kernel.shape[-1]))
    for i in range(3):
        for j in range(3):
            out += padded[:, i:i + h, j:j + w] @ kernel[i, j]
    return out + (0 if bias is None else bias)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("ticket", help="a ticket directory (RUN_DIR/ticket)")
    ap.add_argument("data", help="an .npz of raw images and labels")
    ap.add_argument("--x", default="x_test", help="the images' key in DATA")
    ap.add_argument("--y", default="y_test", help="the labels' key in DATA")
    args = ap.parse_args()
    try:
        with np.load(args.data) as data:
            missing = [k for k in (args.x, args.y) if k not in data.files]
            if missing:
                raise VerificationError(f"{args.data} has no {', '.join(missing)}; it has {', '.join(data.files)}")
            x, y = data[args.x], data[args.y]
        report = verify(args.ticket, x, y)
    except (VerificationError, ValueError, OSError) as e:  # slt_jax's TicketError is a ValueError
        print(f"{type(e).__name__}: {' '.join(str(e).split())}", file=sys.stderr)
        sys.exit(1)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
