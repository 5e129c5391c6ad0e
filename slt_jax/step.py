"""The pure training step for any model: state, loss, one jitted update of the gates; evaluation.

``make_train_step(apply_fn, method, tx)`` returns ``step(state, frozen, x, y) -> (state, metrics)``::

    masks  = method.train_masks(state.gates, fold_in(state.rng, state.step), state.step)
    logits = apply_fn({"params": method.masked_params(frozen, masks), **state.model_state}, x, **apply_kwargs)
    loss   = loss_fn(logits, y) + method.penalty(state.gates, state.method_state, state.step)
    gates, opt_state = tx.update(grad(loss) w.r.t. state.gates only)
    method_state     = method.update_state(...)

``apply_fn`` is Linen's ``module.apply`` or anything with its signature. Only ``state.gates`` is
differentiated, so no weight gradient is ever computed; ``frozen`` is an input, never an output.
The same key for every device (it is part of the replicated state) gives every device the same mask.
"""
from __future__ import annotations

from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax

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
        """Step 0: ``tx.init(gates)``, ``method.init_state(gates)``."""
        return cls(step=jnp.int32(0), gates=gates, opt_state=tx.init(gates), method_state=method.init_state(gates),
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


def _apply(apply_fn: Callable, params: Any, model_state: dict[str, Any], x: Array,
           apply_kwargs: dict[str, Any]) -> tuple[Array, dict[str, Any]]:
    if not model_state:
        return apply_fn({"params": params}, x, **apply_kwargs), model_state
    logits, updates = apply_fn({"params": params, **model_state}, x, mutable=list(model_state), **apply_kwargs)
    return logits, {**model_state, **updates}


def make_train_step(apply_fn: Callable, method: Any, tx: optax.GradientTransformation, *,
                    loss_fn: LossFn = classification_loss(), apply_kwargs: dict[str, Any] | None = None,
                    frozen_fn: Callable[[Any], Any] | None = None, donate: bool = True) -> Callable:
    """The jitted step ``(state: TrainState, frozen, x, y) -> (state, metrics)``.

    Args:
      apply_fn: ``apply_fn(variables, x, **apply_kwargs)`` -> logits, Linen's ``module.apply``
        signature; with a non-empty ``state.model_state`` it is called with ``mutable=`` those
        collections and must return ``(logits, updates)``.
      method: a ``slt_jax.methods.Method`` (CRBG, EdgePopup, ...).
      tx: the gates' optimiser (e.g. ``method.optimizer()`` or any Optax transformation).
      loss_fn: ``loss_fn(logits, labels)`` -> scalar; the method's penalty is added to it.
      apply_kwargs: extra arguments for training-mode calls, e.g. ``{"train": True}``.
      frozen_fn: traceable map from the ``frozen`` argument to the float32 params (e.g. a cast from
        bfloat16 storage, or regenerating them from a key); default: ``frozen`` is the params.
      donate: donate ``state``'s buffers to the result (the input state is then invalid, and every
        leaf of it needs a buffer of its own); ``frozen`` is never donated.

    metrics: ``loss``, ``cross_entropy``, ``train_accuracy`` and the method's ``aux`` (CRBG: expected
    and binary density, lambda, temperature, indecision).
    """
    kwargs = dict(apply_kwargs or {})
    to_params = frozen_fn or (lambda frozen: frozen)

    def step_fn(state: TrainState, frozen: Any, x: Array, y: Array) -> tuple[TrainState, dict[str, Array]]:
        params = to_params(frozen)
        key = jax.random.fold_in(state.rng, state.step)  # replicated: every device draws the same mask

        def loss(gates):
            masked = method.masked_params(params, method.train_masks(gates, key, state.step))
            logits, model_state = _apply(apply_fn, masked, state.model_state, x, kwargs)
            ce = loss_fn(logits, y)
            penalty, aux = method.penalty(gates, state.method_state, state.step)
            acc = jnp.mean(jnp.argmax(logits, -1) == y)
            return ce + penalty, (ce, acc, aux, model_state)

        (total, (ce, acc, aux, model_state)), grads = jax.value_and_grad(loss, has_aux=True)(state.gates)
        updates, opt_state = tx.update(grads, state.opt_state, state.gates)
        gates = optax.apply_updates(state.gates, updates)
        new_state = state.replace(
            step=state.step + 1, gates=gates, opt_state=opt_state,
            method_state=method.update_state(state.method_state, aux), model_state=model_state,
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
