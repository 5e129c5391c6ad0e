"""Compaction of a user's own Linen model (outside the zoo) whose Dense and Conv layers form a chain.

``slt_jax.compaction`` compiles the zoo's models, whose code it knows. A user's model is known only
by running it, so ``compact_chain`` traces one forward pass and compacts it when its parameters all
belong to ``nn.Dense`` and ``nn.Conv`` layers (no feature groups), each called once, each reading
the previous one's output (a Dense may read the previous Conv's flattened (h, w, c) features). A
closed unit's pre-activation is exactly 0, so, as for the zoo's MLPs and ConvNets, it is deleted
from its layer (its column) and the next (its row) when what lies between passes a zero on as a
zero (relu, pooling, flatten: ``slt_jax.compaction``'s two sweeps decide which units go).

The compact model is the user's own code, ``CompactChain``: it runs the model, and each Dense or
Conv call is replaced (``nn.intercept_methods``) by the same layer with fewer features on the kept
inputs. What the model does between its layers is not read from its code, so the compact model is
checked on random inputs against the masked model; a difference (e.g. sigmoid(0) = 1/2 passed on by
a closed unit) is refused. Anything else is refused with one line naming the layers: another layer
type with parameters (a norm, an embedding), state such as BatchNorm statistics, shared layers, or
layers that do not read each other's outputs.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from slt_jax import masking
from slt_jax.compaction import PLACEHOLDER_INIT, _aligned, _feedforward_keeps, _narrowed_layers

LayerShapes = tuple[tuple[str, tuple[int, ...]], ...]  # (leaf name, shape) of one layer's params


def _layer_params(params: Any) -> dict[str, dict[str, np.ndarray]]:
    """Each module's own parameters, keyed by its '/'-joined path: {"block/Dense_0": {"kernel", "bias"}}."""
    layers: dict[str, dict[str, np.ndarray]] = {}
    for name, leaf in masking.named_leaves(params).items():
        path, _, leaf_name = name.rpartition("/")
        layers.setdefault(path, {})[leaf_name] = np.asarray(leaf)
    return layers


def _trace(model: nn.Module, variables: dict[str, Any], input_shape: tuple[int, ...],
           kwargs: dict[str, Any]) -> list[tuple[str, nn.Module, tuple[int, ...]]]:
    """Every ``__call__`` of a module during one forward pass: (its path, the module, its input shape)."""
    calls = []

    def record(next_fun, args, kw, context):
        if context.method_name == "__call__":
            calls.append(("/".join(context.module.path), context.module, tuple(np.shape(args[0])) if args else ()))
        return next_fun(*args, **kw)

    with nn.intercept_methods(record):
        jax.eval_shape(lambda v: model.apply(v, jnp.zeros((1, *input_shape), jnp.float32), **kwargs), variables)
    return calls


def _chain(layers: dict[str, dict[str, np.ndarray]], state: dict[str, Any],
           calls: list[tuple[str, nn.Module, tuple[int, ...]]]) -> tuple[list[str], list[int | None]]:
    """The layers in call order and, per layer, the channels of the flattened features it reads
    (None: it reads the previous layer's output as it is); one ValueError line naming every layer
    that cannot be compacted."""
    kinds = {path: module for path, module, _ in calls if path in layers}
    inputs = {path: shape for path, _, shape in reversed(calls) if path in layers}  # the first call's
    counts = {path: sum(1 for p, _, _ in calls if p == path) for path in layers}
    problems = []
    for path in layers:
        module = kinds.get(path)
        if module is None or not isinstance(module, (nn.Dense, nn.Conv)):
            problems.append(f"{path} ({type(module).__name__ if module is not None else 'never called'})")
        elif isinstance(module, nn.Conv) and module.feature_group_count != 1:
            problems.append(f"{path} (Conv with feature_group_count={module.feature_group_count})")
        elif counts[path] != 1:
            problems.append(f"{path} (called {counts[path]} times: shared weights)")
    for collection, tree in state.items():
        names = sorted({n.rpartition("/")[0] for n in masking.named_leaves(tree)})
        problems.append(f"{', '.join(names)} ({collection})")
    if problems:
        raise ValueError(f"compact_ticket cannot compact layer(s) {'; '.join(problems)}; allowed: a model whose "
                         "parameters are all nn.Dense and nn.Conv layers, each called once, in a chain")
    order = list(dict.fromkeys(path for path, _, _ in calls if path in layers))
    flattened: list[int | None] = [None]
    for prev, path in zip(order, order[1:]):
        given, width = inputs[path][-1], layers[prev]["kernel"].shape[-1]
        if given == width:
            flattened.append(None)
        elif layers[path]["kernel"].ndim == 2 and given % width == 0:
            flattened.append(width)
        else:
            raise ValueError(f"compact_ticket cannot compact layer {path}: it reads {given} features, not the "
                             f"{width} outputs of the layer before it, {prev}; allowed: Dense and Conv layers in "
                             "a chain")
    return order, flattened


class CompactChain(nn.Module):
    """A user's model on its compacted Dense/Conv layers: ``model`` runs as written, each of its
    ``layers`` (paths, in call order) replaced by the same layer with the compact params
    (``layer_<i>``), the first reading only its input's ``features`` when some were dropped."""

    model: nn.Module
    layers: tuple[str, ...]
    shapes: tuple[LayerShapes, ...]
    features: tuple[int, ...] | None = None

    @nn.compact
    def __call__(self, x: jax.Array, *args: Any, **kwargs: Any) -> jax.Array:
        params = [self.param(f"layer_{i}", lambda _, s=s: {k: jnp.zeros(shape, jnp.float32) for k, shape in s})
                  for i, s in enumerate(self.shapes)]
        index = {path: i for i, path in enumerate(self.layers)}
        prefix = len(self.model.path)

        def compact_layer(next_fun, a, kw, context):
            path = "/".join(context.module.path[prefix:]) if context.module.path[:prefix] == self.model.path else None
            if context.method_name != "__call__" or path not in index:
                return next_fun(*a, **kw)
            i, inputs = index[path], a[0]
            if i == 0 and self.features is not None:
                inputs = inputs[..., np.asarray(self.features, np.int64)]
            features = int(params[i]["kernel"].shape[-1])
            # Zeros inits: Flax checks a param's shape by tracing its init, and a fan-scaled init of a
            # layer that lost every unit divides by zero.
            inits = {k: PLACEHOLDER_INIT for k in ("kernel_init", "bias_init")}
            layer = context.module.clone(parent=None, features=features, **inits)
            # An interceptor outside (count_macs) sees this call, on the compact shapes, and the narrowed
            # layer's inside it: count_macs counts the outer one only.
            return layer.apply({"params": params[i]}, inputs, *a[1:], **kw)

        with nn.intercept_methods(compact_layer):
            return self.model(x, *args, **kwargs)


def compact_chain(ticket: Any, multiple: int = 1) -> tuple[nn.Module, dict[str, Any]]:
    """(module, variables) of the compact model of a structured ticket on a user's Linen model; see
    the module docstring. ``multiple`` as for ``slt_jax.compaction.compact_ticket``."""
    model = ticket.model
    if not isinstance(model, nn.Module):
        raise ValueError(f"compact_ticket takes Linen models; this ticket's model is a {type(model).__name__}")
    kwargs = dict(ticket.meta.get("init_kwargs") or {})
    input_shape = tuple(ticket.meta["input_shape"])
    masked = jax.tree.map(np.asarray, ticket.masked_params())
    state = {k: v for k, v in ticket.model_state().items() if jax.tree.leaves(v)}
    layers = _layer_params(masked)
    order, flattened = _chain(layers, state, _trace(model, {"params": masked, **state}, input_shape, kwargs))
    keeps = _feedforward_keeps(layers, order, flattened)
    keeps = [keeps[0]] + [_aligned(k, multiple) for k in keeps[1:-1]] + [keeps[-1]]
    new = _narrowed_layers(layers, order, keeps, flattened)
    features = None if keeps[0].all() else tuple(int(i) for i in np.flatnonzero(keeps[0]))
    shapes = tuple(tuple((k, tuple(int(d) for d in v.shape)) for k, v in sorted(new[p].items())) for p in order)
    module = CompactChain(model, tuple(order), shapes, features)
    variables = {"params": {f"layer_{i}": new[p] for i, p in enumerate(order)}}
    _check_exact(model, masked, module, variables, input_shape, kwargs)
    return module, variables


def _check_exact(model: nn.Module, masked: Any, module: nn.Module, variables: dict[str, Any],
                 input_shape: tuple[int, ...], kwargs: dict[str, Any]) -> None:
    """Refuses a compact model whose logits differ from the masked model's on random inputs: the
    model does something between its layers that does not keep a closed unit's zero a zero."""
    x = jax.random.normal(jax.random.key(0), (16, *input_shape), jnp.float32)
    want = np.asarray(model.apply({"params": masked}, x, **kwargs))
    try:
        got = np.asarray(module.apply(variables, x, **kwargs))
    except Exception as e:  # noqa: BLE001 - e.g. a residual sum of two widths: the layers are not a chain
        text = " ".join(str(e).split())[:200]
        raise ValueError(f"compact_ticket cannot compact this model: with its closed units deleted it fails "
                         f"({type(e).__name__}: {text}); allowed: Dense and Conv layers in a chain") from None
    scale = max(float(np.abs(want).max()), 1.0)
    if got.shape != want.shape or not np.allclose(got, want, rtol=1e-4, atol=1e-5 * scale):
        diff = float(np.abs(got - want).max()) if got.shape == want.shape else float("nan")
        raise ValueError(f"compact_ticket: deleting the closed units is not exact for this model (logits differ by "
                         f"{diff:.3g} on random inputs): between its layers it passes a closed unit on as something "
                         "other than 0 (e.g. sigmoid, a norm); allowed: relu, pooling, flatten between Dense/Conv "
                         "layers")
