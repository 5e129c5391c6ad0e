"""A run's config: every value checked before anything is loaded or written, and what it resolves to.

``validate_config`` checks each key of ``configs/default.py`` against its type and range (a key
with no rule here is a library bug, caught by the tests). Checks that need the data or the
model (batch size against the training set, a gate policy that matches no parameter) happen in
``slt_jax.training_run.Run`` as soon as those exist; ``check_model_fits`` checks the model against
the data's image shape there, ``check_model_memory`` its weights against the memory available.
The config itself is never written: resolved values (step counts) travel as arguments.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
from typing import Any, Callable

import jax
import ml_collections

from slt_jax.data import dataset_problem
from slt_jax.frozen import FROZEN_DTYPES
from slt_jax.methods import METHODS
from slt_jax.methods.schedules import SCHEDULES
from slt_jax.models import MODELS, check_activation, create_model
from slt_jax.models.inits import WEIGHT_INITS
from slt_jax.models.mlp import ACTIVATIONS, negative_slope_of
from slt_jax.ticket import MASK_CODINGS

# Keys that do not change the training state a checkpoint holds: a resumed run may change them freely
# (bn_recalibration_batches acts after the last step, on the ticket's statistics).
NON_SEMANTIC_KEYS = ("eval_every", "log_every", "checkpoint_every", "num_devices", "progress", "eval_batch_size",
                     "plots", "distributed", "ticket_coding", "regenerate_frozen", "bn_recalibration_batches")

# Semantic keys added after runs were fingerprinted, and the value every earlier run had.
LATER_DEFAULTS = {"activation": "relu", "negative_slope": None}


class ConfigError(ValueError):
    """A config value outside what is allowed; the message names the key and the allowed values."""


def _int(lo: int, hi: float = math.inf) -> Callable[[Any], str | None]:
    def check(v):
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            return f"an integer in [{lo}, {hi if hi != math.inf else 'inf'}]" if hi != math.inf else f"an integer >= {lo}"
        return None
    return check


def _number(lo: float, hi: float = math.inf, lo_open: bool = False, hi_open: bool = False):
    def check(v):
        ok = (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
              and (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi))
        if ok:
            return None
        left, right = "(" if lo_open else "[", ")" if hi_open or hi == math.inf else "]"
        return f"a number in {left}{lo}, {hi if hi != math.inf else 'inf'}{right}"
    return check


def _one_of(options) -> Callable[[Any], str | None]:
    return lambda v: None if v in options else ", ".join(map(str, options))


def _optional(check):
    return lambda v: None if v is None else check(v)


def _bool(v) -> str | None:
    return None if isinstance(v, bool) else "True or False"


def _regex(v) -> str | None:
    if not isinstance(v, str):
        return "a Python regex"
    try:
        re.compile(v)
    except re.error as e:
        return f"a Python regex ({v!r} is not a valid regular expression: {e})"
    return None


def _string(v) -> str | None:
    return None if isinstance(v, str) else "a string"


def _shape(v) -> str | None:
    ok = (isinstance(v, (tuple, list)) and len(v) == 3 and all(isinstance(n, int) and n >= 1 for n in v)
          and v[2] in (1, 3))
    return None if ok else "(H, W, C) with H, W >= 1 and C in {1, 3}"


RULES: dict[str, Callable[[Any], str | None]] = {
    "model": _one_of(sorted(MODELS)),
    "method": _one_of(sorted(METHODS)),
    "dataset": dataset_problem,
    "sparsity": _number(0.0, 1.0, hi_open=True),
    "batch_size": _int(1),
    "num_steps": _int(0),
    "num_epochs": _number(0.0),
    "seed": _int(0, 2**32 - 1),
    "learning_rate": _optional(_number(0.0, lo_open=True)),
    "lr_schedule": _optional(_one_of(SCHEDULES)),
    "warmup_epochs": _number(0.0),
    "label_smoothing": _number(0.0, 1.0, hi_open=True),
    "logit_scale": _number(0.0, lo_open=True),
    "weight_init": _one_of(WEIGHT_INITS),
    "init_scale": _optional(_number(0.0, lo_open=True)),
    "use_bias": _bool,
    "width": _number(0.0, lo_open=True),
    "activation": _one_of(ACTIVATIONS),
    "negative_slope": _optional(_number(0.0, 1.0, hi_open=True)),
    "frozen_dtype": _one_of(FROZEN_DTYPES),
    "regenerate_frozen": _bool,
    "frozen_from": _string,
    "gate_policy": _regex,
    "structured": _bool,
    "structured_policy": _regex,
    "structured_inputs": _regex,
    "ticket_coding": _one_of(MASK_CODINGS),
    "val_fraction": _number(0.0, 1.0, lo_open=True, hi_open=True),
    "split_seed": _int(0, 2**32 - 1),
    "num_classes": _int(2),
    "synthetic_shape": _shape,
    "synthetic_size": _int(1),
    "augment": _string,  # its allowed values depend on the dataset: checked where tfds data is built
    "tfds_data_dir": _string,
    "log_every": _int(1),
    "eval_every": _int(1),
    "checkpoint_every": _int(0),
    "eval_batch_size": _int(1),
    "bn_recalibration_batches": _int(0),
    "num_devices": _int(0),
    "progress": _bool,
    "plots": _bool,
    "distributed": _bool,
}


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Raises ConfigError naming the first bad value and what is allowed."""
    for key, value in config.items():
        if key in METHODS:
            _validate_method(key, value)
            continue
        if key not in RULES:
            raise KeyError(f"config key {key!r} has no validation rule in slt_jax.run_config.RULES")
        allowed = RULES[key](value)
        if allowed is not None:
            raise ConfigError(f"{key}={value!r}; allowed: {allowed}")
    if config.num_steps == 0 and config.num_epochs <= 0:
        raise ConfigError(f"num_steps={config.num_steps}, num_epochs={config.num_epochs}; allowed: num_steps > 0, "
                          "or num_steps = 0 and num_epochs > 0")
    if hasattr(METHODS[config.method], "redraw") and (config.structured or config.regenerate_frozen or config.frozen_from):
        raise ConfigError(f"method={config.method} re-draws pruned weights from the seed (structured="
                          f"{config.structured}, regenerate_frozen={config.regenerate_frozen}, frozen_from="
                          f"{config.frozen_from!r}); allowed: structured=False, regenerate_frozen=False, frozen_from=''")
    if config.structured_inputs and not config.structured:
        raise ConfigError(f"structured_inputs={config.structured_inputs!r} with structured=False; allowed: "
                          "structured_inputs='' or structured=True")
    try:  # the model's own rule (slt_jax.models.check_activation), before anything is built
        check_activation(config.model, config.activation, config.negative_slope)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if config.frozen_from and config.regenerate_frozen:
        raise ConfigError("regenerate_frozen=True with frozen_from; allowed: one of them (a params file cannot "
                          "be regenerated from a seed)")


def _validate_method(name: str, sub: ml_collections.ConfigDict) -> None:
    # The dataclass's own checks (unknown family, scope, lambda_mode, ...) run on a throwaway instance.
    try:
        METHODS[name](num_steps=1, **sub.to_dict())
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{name}: {e}") from None


def fingerprint(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The config keys that shape the training state; checkpoints from another fingerprint are refused.
    A key of ``LATER_DEFAULTS`` at its default is left out, so runs made before it existed keep their
    fingerprint (their checkpoints resume, their default workdir is the same)."""
    d = json.loads(config.to_json())
    out = {k: v for k, v in sorted(d.items()) if k not in NON_SEMANTIC_KEYS
           and not (k in LATER_DEFAULTS and v == LATER_DEFAULTS[k])}
    # The training noise's PRNG decides the checkpointed key's shape and every mask drawn from it.
    out["prng_impl"] = str(jax.config.jax_default_prng_impl)
    return out


def default_workdir(config: ml_collections.ConfigDict) -> str:
    """runs/MODEL-METHOD-HASH: the same command resumes, a different config gets its own directory."""
    digest = hashlib.sha256(json.dumps(fingerprint(config), sort_keys=True).encode()).hexdigest()[:8]
    return os.path.join("runs", f"{config.model}-{config.method}-{digest}")


def model_spec(config: ml_collections.ConfigDict, num_classes: int) -> dict[str, Any]:
    """The JSON-able zoo spec a ticket records (``slt_jax.models.create_model``); a leaky_relu's slope
    is recorded resolved (None: 0.25)."""
    slope = negative_slope_of(config.activation, config.negative_slope)
    return {"name": config.model, "num_classes": num_classes, "weight_init": config.weight_init,
            "init_scale": config.init_scale, "use_bias": config.use_bias, "width": config.width,
            "activation": config.activation, "negative_slope": slope}


def _first_empty_value(jaxpr) -> tuple[int, ...] | None:
    """The shape of the first zero-sized value a jaxpr (or any jaxpr nested in it) computes."""
    for eqn in jaxpr.eqns:
        for v in eqn.outvars:
            shape = getattr(v.aval, "shape", None)
            if shape is not None and 0 in shape:
                return tuple(shape)
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                sub = getattr(sub, "jaxpr", sub)  # a ClosedJaxpr's jaxpr
                if hasattr(sub, "eqns"):
                    found = _first_empty_value(sub)
                    if found is not None:
                        return found
    return None


EMPTY_ARRAY = "it computes an empty array"  # _model_problem's words for a layer left with no units


def _model_problem(model, input_shape: tuple[int, ...], init_kwargs: dict[str, Any] | None) -> str | None:
    """None if the model initialises on one image of input_shape with no empty layer, else what goes wrong."""
    dummy = jax.ShapeDtypeStruct((1, *input_shape), jax.numpy.float32)
    key = jax.random.key(0, impl="threefry2x32")
    try:
        jaxpr = jax.make_jaxpr(lambda k, x: model.init(k, x, **(init_kwargs or {})))(key, dummy)
    except (TypeError, ValueError, IndexError, ZeroDivisionError) as e:
        return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
    empty = _first_empty_value(jaxpr.jaxpr)
    return None if empty is None else f"{EMPTY_ARRAY} of shape {empty}"


def check_model_memory(model, spec: dict[str, Any], input_shape: tuple[int, ...],
                       init_kwargs: dict[str, Any] | None = None) -> None:
    """Raises ConfigError when the model's weights alone, as float32, exceed the memory available
    (``slt_jax.data.arrays.available_memory``): a huge ``num_classes`` or ``width`` is refused in a
    second (the shapes are traced, nothing is allocated) rather than stalling in the weights' init.
    The run needs more than this (gates, optimiser state): only the impossible is refused here."""
    from slt_jax.data import arrays  # not at the top: the data package imports this module

    dummy = jax.ShapeDtypeStruct((1, *input_shape), jax.numpy.float32)
    shapes = jax.eval_shape(lambda k, x: model.init(k, x, **(init_kwargs or {})),
                            jax.random.key(0, impl="threefry2x32"), dummy)
    count = sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(shapes))
    need, available = 4 * count, arrays.available_memory()
    if need > available:
        raise ConfigError(f"model {spec['name']} with num_classes={spec['num_classes']}, width={spec.get('width', 1.0)} "
                          f"has {count} parameters, {arrays.gib(need)} as float32, but {arrays.gib(available)} is "
                          "available; allowed: a model whose weights fit in memory (fewer classes, a smaller width "
                          "or model)")


def check_model_fits(model, spec: dict[str, Any], input_shape: tuple[int, ...],
                     init_kwargs: dict[str, Any] | None = None) -> None:
    """Raises ConfigError when the model cannot run on the data's images: pooling that shrinks them to
    nothing, a width that leaves a layer no units, or a shape error. Traces the model once (no FLOPs)."""
    problem = _model_problem(model, input_shape, init_kwargs)
    if problem is None:
        return
    name, width, dims = spec["name"], spec.get("width", 1.0), "x".join(map(str, input_shape))
    larger = next((s for s in (2, 4, 8, 16, 32, 64, 128, 224) if s > max(input_shape[:2])
                   and _model_problem(model, (s, s, *input_shape[2:]), init_kwargs) is None), None)
    if larger:
        raise ConfigError(f"model {name} needs larger inputs than {dims} ({problem}); allowed: images of "
                          f"{larger}x{larger} or larger, or a model with less downsampling")
    if width < 1.0 and _model_problem(create_model({**spec, "width": 1.0}), input_shape, init_kwargs) is None:
        if problem.startswith(EMPTY_ARRAY):
            raise ConfigError(f"width={width} leaves model {name} a layer with no units ({problem}); allowed: a width "
                              "at which every layer keeps at least one unit")
        # The model refused the width itself (Swin: channels its heads do not divide); its message says why.
        raise ConfigError(f"width={width} does not fit model {name} ({problem}); allowed: a width the model accepts")
    raise ConfigError(f"model {name} with width={width} cannot run on {dims} inputs ({problem}); allowed: larger "
                      "inputs, a larger width, or another model")
