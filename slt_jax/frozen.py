"""The never-trained network: its weights from a seed or a params file, how a step stores them.

Every ticket is defined on these weights, so they must come back bit for bit anywhere:

* from a seed: ``model.init(weights_key(seed), zeros((1, *input_shape)), **init_kwargs)["params"]``,
  computed under jit (XLA's simplifications can move an eager init by an ulp, a jitted one not).
  The key is always Threefry (``jax.random.key(seed, impl="threefry2x32")``), whatever
  ``jax_default_prng_impl`` says, so a ticket regenerates the same weights on every platform.
* from a params file (``frozen_from``; e.g. pretrained weights): an ``.npz`` with one array per
  parameter, keyed by its path name (``Dense_0/kernel``); its sha256 is recorded and checked.

``round_frozen`` applies the run's storage dtype (``frozen_dtype``), and ``FrozenStorage`` is what
a train step holds: the weights themselves, or only the seed's key, regenerated inside the step.
"""
from __future__ import annotations

import dataclasses
import hashlib
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from slt_jax import masking

FROZEN_DTYPES = ("float32", "bfloat16")


class FrozenWeightsError(ValueError):
    """A params file is missing, unreadable, has other weights than recorded, or does not fit the model."""


def weights_key(seed: int) -> jax.Array:
    """The key the frozen weights are drawn from: Threefry, independent of the default PRNG."""
    return jax.random.key(seed, impl="threefry2x32")


def generation_key(seed: int, generation: int = 0) -> jax.Array:
    """The key of the weights' ``generation``: 0 is the seed's own network (``weights_key(seed)``),
    j >= 1 the j-th re-draw of it (IteRand), ``fold_in(weights_key(seed), j)``."""
    return weights_key(seed) if generation == 0 else jax.random.fold_in(weights_key(seed), generation)


def init_fn(model: Any, input_shape: tuple[int, ...], init_kwargs: dict[str, Any] | None = None) -> Callable:
    """The jitted ``key -> model.init(key, zeros((1, *input_shape)), **init_kwargs)``: the one function
    every run and ticket draws its weights with (a jitted init, so they agree bit for bit)."""
    dummy = jnp.zeros((1, *input_shape), jnp.float32)
    return jax.jit(lambda key: model.init(key, dummy, **(init_kwargs or {})))


def init_variables(model: Any, input_shape: tuple[int, ...], seed: int, init_kwargs: dict[str, Any] | None = None,
                   generation: int = 0) -> dict[str, Any]:
    """The model's initial variables from the seed (of ``generation``, see ``generation_key``), as
    host arrays in plain dicts."""
    return _plain(jax.device_get(init_fn(model, input_shape, init_kwargs)(generation_key(seed, generation))))


def params_by_generation(model: Any, input_shape: tuple[int, ...], seed: int,
                         init_kwargs: dict[str, Any] | None = None, frozen_dtype: str = "float32") -> Callable[[int], Any]:
    """``g ->`` the params of generation g (``generation_key``), rounded to ``frozen_dtype``; one
    compiled init serves every generation."""
    init = init_fn(model, input_shape, init_kwargs)
    return lambda g: round_frozen(_plain(jax.device_get(init(generation_key(seed, g))))["params"], frozen_dtype)


def redrawn_weights(draw: Callable[[int], Any], generation: Any) -> Any:
    """The weights of a network whose gated weights were re-drawn (IteRand): each takes its value in
    ``draw(g)``, the params of generation g, where ``generation`` (int arrays shaped like the gated
    leaves, None elsewhere) says g; ungated leaves are ``draw(0)``'s. Host arrays."""
    params = jax.device_get(draw(0))
    present = sorted({int(v) for g in jax.tree.leaves(generation) for v in np.unique(np.asarray(g))} - {0})
    for j in present:
        candidate = jax.device_get(draw(j))
        params = jax.tree.map(lambda g, w, c: w if g is None else np.where(np.asarray(g) == j, c, w),
                              generation, params, candidate, is_leaf=lambda x: x is None)
    return params


def _plain(tree: Any) -> Any:
    # Flax may hand back FrozenDicts; everything downstream expects plain dicts.
    return {k: _plain(v) for k, v in tree.items()} if hasattr(tree, "items") else tree


def file_sha256(path: str) -> str:
    """The hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_params_file(path: str, template: Any, sha256: str | None = None) -> Any:
    """Weights from an ``.npz`` keyed by path name, shaped like ``template``, as float32: exactly the
    template's leaves (none missing, none extra), same shapes, float16/32/64 arrays whose values
    are finite as float32; anything else is refused with a ``FrozenWeightsError`` naming the leaf.
    With ``sha256``, a file whose content differs is refused."""
    try:
        digest = file_sha256(path)
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except (OSError, ValueError) as e:
        raise FrozenWeightsError(f"frozen_from={path!r} cannot be read ({type(e).__name__}: {e}); allowed: an .npz "
                                 "of arrays keyed by parameter path (e.g. Dense_0/kernel)") from None
    if sha256 is not None and digest != sha256:
        raise FrozenWeightsError(f"frozen_from={path!r} has sha256 {digest[:12]}..., the ticket was made on "
                                 f"{sha256[:12]}...: these are other weights")
    expected = {name: np.shape(leaf) for name, leaf in masking.named_leaves(template).items()}
    missing = sorted(set(expected) - set(arrays))
    extra = sorted(set(arrays) - set(expected))  # a misspelt or another model's leaf: never dropped silently
    wrong = sorted(n for n in expected if n in arrays and arrays[n].shape != expected[n])
    if missing or extra or wrong:
        detail = (f"lacks {', '.join(missing)}" if missing else f"holds {', '.join(map(repr, extra))}, not a parameter "
                  "of the model" if extra else f"has other shapes for {', '.join(wrong)}")
        raise FrozenWeightsError(f"frozen_from={path!r} {detail}; allowed: exactly the model's parameters, keyed by "
                                 f"path name (e.g. {next(iter(expected))}), with the model's shapes")
    weights = {}
    for name in expected:
        a = arrays[name]
        if not (np.issubdtype(a.dtype, np.floating) and a.dtype.itemsize in (2, 4, 8)):
            # Cast, an int or bool array trains on other weights than its file's; a complex one drops a part.
            raise FrozenWeightsError(f"frozen_from={path!r}: {name!r} is an array of {a.dtype}; allowed: float16, "
                                     "float32 or float64 weights (read as float32)")
        with np.errstate(over="ignore"):  # beyond float32's range: refused just below, by name
            w = np.asarray(a, np.float32)
        bad = ~np.isfinite(w)
        if bad.any():
            raise FrozenWeightsError(f"frozen_from={path!r}: {name!r} holds {int(bad.sum())} values that are NaN or "
                                     f"infinite as float32 (e.g. {a[bad].flat[0]!r}); allowed: finite weights within "
                                     "float32's range")
        weights[name] = w
    return jax.tree_util.tree_map_with_path(lambda p, _: weights[masking.path_name(p)], template)


def save_params_file(path: str, params: Any) -> str:
    """Writes ``params`` as a ``frozen_from`` file; returns its sha256."""
    with open(path, "wb") as f:
        np.savez(f, **{name: np.asarray(leaf) for name, leaf in masking.named_leaves(params).items()})
    return file_sha256(path)


def round_frozen(params: Any, frozen_dtype: str = "float32") -> Any:
    """``params`` rounded to ``frozen_dtype`` and cast back to float32 (traceable).

    These are the weights a run that stores its frozen weights in ``frozen_dtype`` computes with,
    so they are the weights its ticket is defined on: with "bfloat16" a kept weight is
    ``float32(bfloat16(w0))``, not ``w0``. "float32" changes nothing.
    """
    if frozen_dtype not in FROZEN_DTYPES:
        raise ValueError(f"frozen_dtype={frozen_dtype!r}; allowed: {', '.join(FROZEN_DTYPES)}")
    return jax.tree.map(lambda w: jnp.asarray(w, frozen_dtype).astype(jnp.float32), params)


@dataclasses.dataclass(frozen=True)
class FrozenStorage:
    """What a train step holds for the frozen weights (``stored``, its ``frozen`` argument) and the
    traceable map ``to_params(stored)`` to the float32 weights (its ``frozen_fn``)."""

    stored: Any
    to_params: Callable[[Any], Any]


def frozen_storage(model: Any, params: Any, input_shape: tuple[int, ...], seed: int, frozen_dtype: str = "float32",
                   regenerate: bool = False, init_kwargs: dict[str, Any] | None = None) -> FrozenStorage:
    """How the step holds ``params`` (the seed's weights, already ``round_frozen``-ed):

    * default: the weights in ``frozen_dtype``, cast up to float32 in the step ("bfloat16" halves
      their bytes);
    * ``regenerate``: only the seed's key; the step re-runs the model's initialisers on every call,
      so no weight buffer lives between steps, at the price of recomputing them. The key is a
      traced input, so XLA cannot fold the weights into a constant.

    Both give the same float32 weights bit for bit: the choice never changes a ticket.
    """
    if regenerate:
        dummy = jnp.zeros((1, *input_shape), jnp.float32)
        return FrozenStorage(jax.random.key_data(weights_key(seed)), lambda data: round_frozen(
            model.init(jax.random.wrap_key_data(data, impl="threefry2x32"), dummy, **(init_kwargs or {}))["params"],
            frozen_dtype))
    stored = jax.tree.map(lambda w: jnp.asarray(w).astype(frozen_dtype), params)
    return FrozenStorage(stored, lambda frozen: jax.tree.map(lambda w: w.astype(jnp.float32), frozen))


def binarized_weights(params: Any, masks: Any) -> Any:
    """biprop's weights: on each gated leaf, sign(w) * alpha with alpha = sum(|w| m) / sum(m), the
    mean magnitude of the weights the mask keeps (Diffenderfer & Kailkhura 2021); other leaves as
    they are. A function of the seed's weights and the mask only, so a biprop ticket stores no
    floats. Traceable, and differentiable in soft masks (alpha sees the training mask too)."""
    per_leaf = masking.leaf_masks(params, masks)

    def binarize(w, m):
        if m is None:
            return w
        m = jnp.broadcast_to(m, jnp.shape(w)).astype(jnp.asarray(w).dtype)
        alpha = jnp.sum(jnp.abs(w) * m) / jnp.maximum(jnp.sum(m), 1.0)
        return jnp.sign(w) * alpha

    return jax.tree.map(binarize, params, per_leaf)


# How a ticket's weights derive from the frozen network and its mask, by the name ``ticket.json``
# records under "weights" (a method's ``ticket_weights``); no name: the frozen weights themselves.
MASKED_WEIGHTS = {"binarized": binarized_weights}
