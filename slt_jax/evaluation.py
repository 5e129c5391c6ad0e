"""What a run measures: the binary ticket's accuracy, and its own BatchNorm statistics.

Evaluation always measures the binary ticket: kept weights at their frozen value, the rest 0
(``slt_jax.step.ticket_params``), beside the stochastic network's accuracy under one sample of
the training masks. ``recalibrated`` recomputes a BatchNorm model's running statistics on the
ticket before the final evaluation.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import jax
import numpy as np

from slt_jax import masking, sharding
from slt_jax.step import TrainState, ticket_params

if TYPE_CHECKING:
    from slt_jax.training_run import Run


def accuracy(eval_fn, params, model_state, dataset, split: str, batch_size: int, mesh) -> float:
    """The fraction of ``split`` that ``eval_fn`` (``slt_jax.step.make_eval_fn``) classifies right."""
    correct = total = 0
    n_dev = mesh.size
    for x, y in dataset.eval_batches(split, batch_size):
        # Pad the last batch to a multiple of the device count; padded rows get label -1 (never correct).
        pad = (-len(y)) % n_dev
        if pad:
            x = np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)])
            y = np.concatenate([y, -np.ones(pad, y.dtype)])
        xs, ys = sharding.shard_batch((x, y.astype(np.int32)), mesh)
        correct += int(eval_fn(params, model_state, xs, ys))
        total += len(y) - pad
    return correct / total


def recalibrated(run: Run, state: TrainState) -> TrainState:
    """The state with the model's running statistics (BatchNorm) recomputed on the binary ticket.

    Training averages them under the training masks (CRBG's noisy gates), which are not the
    ticket's: a ResNet-18 CRBG ticket on MNIST scored 78% with them and 94% with its own. The
    ticket's statistics are the training ones updated (momentum as in training) by
    ``bn_recalibration_batches`` train-mode forward passes of the ticket over the first training
    batches. Not from the initial statistics: their variance of 1 would outweigh a sparse
    network's small activations for many batches. Nothing else changes."""
    n = run.config.bn_recalibration_batches
    if not state.model_state or not n:
        return state
    update_stats = jax.jit(lambda params, stats, x: run.model.apply(
        {"params": params, **stats}, x, train=True, mutable=list(stats))[1])
    params = ticket_params(run.method, state.gates, run.frozen_params(run.frozen))
    stats = state.model_state
    for i in range(n):
        x, y = run.dataset.train_batch(run.config.seed, i, run.config.batch_size)
        stats = update_stats(params, stats, sharding.shard_batch((x, y), run.mesh)[0])
    return state.replace(model_state=stats)


def evaluate(run: Run, state: TrainState, splits: tuple[str, ...] = ("val",)) -> dict[str, Any]:
    """Binary-ticket accuracy per split, sparsity, and the stochastic network's accuracy."""
    cfg = run.config
    frozen = run.frozen_params(run.frozen)
    params = ticket_params(run.method, state.gates, frozen)
    out = {}
    for split in splits:
        if run.dataset.has_split(split):
            out[f"{split}_accuracy"] = accuracy(run.eval_fn, params, state.model_state, run.dataset, split,
                                                cfg.eval_batch_size, run.mesh)
    sample = run.method.train_masks(state.gates, run.eval_key, state.step)
    stochastic = run.method.masked_params(frozen, sample)
    out["stochastic_val_accuracy"] = accuracy(run.eval_fn, stochastic, state.model_state, run.dataset, "val",
                                              cfg.eval_batch_size, run.mesh)
    out["binary_gap"] = out["stochastic_val_accuracy"] - out["val_accuracy"]
    report = masking.sparsity_report(jax.device_get(frozen), jax.device_get(run.method.binary_masks(state.gates)))
    out["sparsity"] = report["sparsity"]
    out["layer_sparsity"] = report["layers"]
    out["gated_weights"] = report["gated_weights"]
    return out
