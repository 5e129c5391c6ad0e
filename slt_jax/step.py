"""The pure training step for any model: state, loss, one jitted update of the gates; evaluation.

``make_train_step(model, method, tx)`` returns ``step(state, frozen, x, y) -> (state, metrics)``::

    key    = fold_in(state.rng, state.step)
    masks  = method.train_masks(state.gates, key, state.step)            # (Gated: inside the module)
    logits = apply_fn({"params": method.masked_params(frozen, masks), **state.model_state}, x,
                      rngs={"dropout": fold_in(key, 1)}, **apply_kwargs)
    loss   = loss_fn(logits, y) + method.penalty(state.gates, state.method_state, state.step)
    gates, opt_state = tx.update(grad(loss) w.r.t. state.gates only)
    method_state     = method.update_state(...)

``model`` is a gated Linen module (``slt_jax.gated``; its ``apply`` with ``deterministic=False``
and rngs ``{"gates": key, "dropout": ...}``), or Linen's ``module.apply`` or anything with its
signature. With ``tx = slt_jax.with_penalty(method, ...)`` the penalty and the multiplier live
in the optimiser: the loss is ``loss_fn`` alone and ``state.method_state`` is empty. Only
``state.gates`` is differentiated, so no weight gradient is ever computed; ``frozen`` is an input,
never an output, never donated. The same key for every device (it is part of the replicated state)
gives every device the same mask.
"""
from __future__ import annotations

from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax

from slt_jax.module import Gated
from slt_jax.penalty_optax import penalty_state

Array = jax.Array
LossFn = Callable[[Array, Array], Array]


@flax.struct.dataclass
class TrainState:
    """Everything a ticket search carries from step to step (a pytree; no frozen weights).

    Attributes:
      step: int32 scalar, steps taken.
      gates: the method's gate tree, shaped like the params (None where not gated).
      opt_state: the optimiser's state for ``gates``.
      method_state: the method's own state (CRBG: the multiplier ``lambda`` and its integral; IteRand:
        each weight's generation).
      model_state: the model's non-parameter collections (e.g. ``batch_stats``), updated in training.
      rng: the training-noise key; step t draws from ``fold_in(rng, t)``. Raw key data
        (``jax.random.PRNGKey``) can be checkpointed by Orbax; typed keys work in the step too.
      finite: False once the loss, gates or optimiser state held a NaN or infinity.
    """

    step: Array
    gates: Any
    opt_state: Any
    method_state: dict[str, Array]
    model_state: dict[str, Any]
    rng: Array
    finite: Array

    @classmethod
    def create(cls, method: Any, tx: optax.GradientTransformation, gates: Any, rng: Array,
               model_state: dict[str, Any] | None = None) -> "TrainState":
        """Step 0: ``tx.init(gates)``, ``method.init_state(gates)`` (empty when ``tx`` carries the
        method's state itself, ``slt_jax.with_penalty``)."""
        opt_state = tx.init(gates)
        method_state = {} if penalty_state(opt_state) is not None else method.init_state(gates)
        return cls(step=jnp.int32(0), gates=gates, opt_state=opt_state, method_state=method_state,
                   model_state=dict(model_state or {}), rng=rng, finite=jnp.bool_(True))


def classification_loss(label_smoothing: float = 0.0, logit_scale: float = 1.0) -> LossFn:
    """Mean cross-entropy of ``logit_scale * logits`` against (optionally smoothed) integer labels.

    ``logit_scale`` is a temperature of the loss only; predictions (argmax) never see it. A sparse
    bias-free ReLU network's logits shrink roughly like density^(depth/2), which leaves the
    cross-entropy flat and pushes a method to keep weights for their scale alone; scaling the
    logits restores a useful loss. For such networks it equals scaling every weight by
    logit_scale^(1/depth), as edge-popup's "scale_fan" init does, without touching the weights.
    """

    def loss(logits: Array, labels: Array) -> Array:
        onehot = jax.nn.one_hot(labels, logits.shape[-1])
        if label_smoothing:
            onehot = optax.smooth_labels(onehot, label_smoothing)
        return optax.softmax_cross_entropy(logit_scale * logits, onehot).mean()

    return loss


def _all_finite(tree: Any) -> Array:
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack([jnp.isfinite(x).all() for x in leaves])) if leaves else jnp.bool_(True)


def _structure(tree: Any) -> tuple:
    return jax.tree.structure(tree), [(jnp.shape(x), jnp.result_type(x)) for x in jax.tree.leaves(tree)]


def _check_state(state: TrainState, method: Any, tx: optax.GradientTransformation) -> None:
    """A state made for another method or optimiser, named in one line (at trace time)."""
    if _structure(state.opt_state) != _structure(jax.eval_shape(tx.init, state.gates)):
        raise ValueError(f"the TrainState's opt_state was made by another optimiser than this step's tx "
                         f"(for {method.name}); allowed: TrainState.create(method, tx, ...) with the step's tx")
    inside = penalty_state(state.opt_state)
    carried = inside.method_state if inside is not None else state.method_state
    expected = jax.eval_shape(method.init_state, state.gates)
    if _structure(carried) != _structure(expected):
        raise ValueError(f"the TrainState's method state holds {sorted(carried)}, {method.name} keeps "
                         f"{sorted(expected)}: it was made for another method; allowed: "
                         f"TrainState.create({type(method).__name__}(...), ...) for the method of the step")


def make_train_step(model: Any, method: Any, tx: optax.GradientTransformation, *,
                    loss_fn: LossFn = classification_loss(), apply_kwargs: dict[str, Any] | None = None,
                    frozen_fn: Callable[[Any], Any] | None = None, rng_streams: tuple[str, ...] = ("dropout",),
                    donate: bool = True) -> Callable:
    """The jitted step ``(state: TrainState, frozen, x, y) -> (state, metrics)``.

    Args:
      model: a gated Linen module (``slt_jax.gated``; ``frozen`` is its "frozen" collection,
        ``state.gates`` its "gates", ``state.model_state`` its other collections), or
        ``apply_fn(variables, x, rngs=..., **apply_kwargs)`` -> logits, Linen's ``module.apply``
        signature. With a non-empty ``state.model_state`` it is called with ``mutable=`` those
        collections and must return ``(logits, updates)``.
      method: a ``slt_jax.methods.Method`` (CRBG, EdgePopup, ...); for a gated module, its own
        method or None.
      tx: the gates' optimiser (e.g. ``method.optimizer()``, ``slt_jax.with_penalty(method)`` or any
        Optax transformation).
      loss_fn: ``loss_fn(logits, labels)`` -> scalar; the method's penalty is added to it unless ``tx``
        carries it (``with_penalty``).
      apply_kwargs: extra arguments for training-mode calls, e.g. ``{"train": True}``.
      frozen_fn: traceable map from the ``frozen`` argument to the float32 params (e.g. a cast from
        bfloat16 storage, or regenerating them from a key); default: ``frozen`` is the params.
      rng_streams: the model's rng streams (Dropout's ``"dropout"``), each fed
        ``fold_in(key, i + 1)``; ``()`` for an ``apply_fn`` that takes no ``rngs``.
      donate: donate ``state``'s buffers to the result (the input state is then invalid, and every
        leaf of it needs a buffer of its own); ``frozen`` is never donated.

    metrics: ``loss``, ``cross_entropy``, ``train_accuracy`` and the method's ``aux`` (CRBG: expected
    and binary density, lambda, temperature, indecision).

    Raises:
      ValueError: ``method`` is not the gated module's, or the module has ``trainable`` leaves
        (train those in a loop of your own); at the first step, a state made for another method or tx.
    """
    kwargs = dict(apply_kwargs or {})
    to_params = frozen_fn or (lambda frozen: frozen)
    if isinstance(model, Gated):
        if method is not None and method != model.method:
            raise ValueError(f"make_train_step(method={method.name}) for a module gated with {model.method.name}; "
                             "allowed: the module's own method, or None")
        if model.trainable:
            raise ValueError(f"make_train_step trains the gates only, the module keeps trainable={model.trainable!r}"
                             "; allowed: a gated module without trainable leaves (train those in your own loop)")
        method = model.method

    def forward(gates: Any, params: Any, model_state: dict[str, Any], x: Array, key: Array, step: Array):
        rngs = {name: jax.random.fold_in(key, i + 1) for i, name in enumerate(rng_streams)}
        call_kwargs = {**kwargs, **({"mutable": list(model_state)} if model_state else {})}
        if isinstance(model, Gated):
            variables = {"frozen": params, "gates": gates, **model_state}
            out = model.apply(variables, x, deterministic=False, step=step, rngs={"gates": key, **rngs}, **call_kwargs)
        else:
            variables = {"params": method.masked_params(params, method.train_masks(gates, key, step)), **model_state}
            out = model(variables, x, **({"rngs": rngs} if rngs else {}), **call_kwargs)
        if not model_state:
            return out, model_state
        logits, updates = out
        return logits, {**model_state, **updates}

    def step_fn(state: TrainState, frozen: Any, x: Array, y: Array) -> tuple[TrainState, dict[str, Array]]:
        _check_state(state, method, tx)
        inside = penalty_state(state.opt_state) is not None
        params = to_params(frozen)
        key = jax.random.fold_in(state.rng, state.step)  # replicated: every device draws the same mask

        def loss(gates):
            logits, model_state = forward(gates, params, state.model_state, x, key, state.step)
            ce = loss_fn(logits, y)
            acc = jnp.mean(jnp.argmax(logits, -1) == y)
            if inside:
                return ce, (ce, acc, {}, model_state)
            penalty, aux = method.penalty(gates, state.method_state, state.step)
            return ce + penalty, (ce, acc, aux, model_state)

        (total, (ce, acc, aux, model_state)), grads = jax.value_and_grad(loss, has_aux=True)(state.gates)
        updates, opt_state = tx.update(grads, state.opt_state, state.gates)
        gates = optax.apply_updates(state.gates, updates)
        if inside:
            aux, method_state = penalty_state(opt_state).aux, state.method_state
        else:
            method_state = method.update_state(state.method_state, aux)
        new_state = state.replace(
            step=state.step + 1, gates=gates, opt_state=opt_state, method_state=method_state, model_state=model_state,
            # An overflow can poison the gates or the optimiser's moments while the loss still looks finite.
            finite=state.finite & jnp.isfinite(total) & _all_finite((gates, opt_state)))
        return new_state, {"loss": total, "cross_entropy": ce, "train_accuracy": acc, **aux}

    return jax.jit(step_fn, donate_argnums=(0,) if donate else ())


def ticket_params(method: Any, gates: Any, params: Any) -> Any:
    """The binary ticket's params: ``method.masked_params`` under ``method.binary_masks(gates)``
    (``where(mask, params, 0)`` on gated leaves for every method but biprop)."""
    return method.masked_params(params, method.binary_masks(gates))


def make_eval_fn(apply_fn: Callable, apply_kwargs: dict[str, Any] | None = None) -> Callable:
    """Jitted ``(params, model_state, x, y) -> number of correct predictions`` (labels < 0 never count).

    ``apply_kwargs`` are the inference-mode arguments, e.g. ``{"train": False}``."""
    kwargs = dict(apply_kwargs or {})

    def count(params, model_state, x, y):
        logits = apply_fn({"params": params, **model_state}, x, **kwargs)
        return jnp.sum(jnp.argmax(logits, -1) == y)

    return jax.jit(count)
