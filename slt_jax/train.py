"""The harness: joins a method, a model, data, sharding and checkpoints into one training run.

``train_and_evaluate(config, workdir)`` finds a ticket and returns its summary. Every method runs
through the same public pieces a researcher's own loop uses (``slt_jax.step``, ``slt_jax.frozen``,
``slt_jax.masking``), the same data order, evaluation and logging, so comparisons are fair.

This module holds the loop: start or resume, train, log, checkpoint, stop at a safe point on a
signal, finish. The rest lives apart: the run's parts in ``slt_jax.training_run``, evaluation in
``slt_jax.evaluation``, the workdir's lock and disk failures in ``slt_jax.workdir``,
``metrics.jsonl`` in ``slt_jax.metrics_log``, config.json, the ticket, plots and summary.json in
``slt_jax.run_outputs``, checkpoints in ``slt_jax.checkpoint``, config checks in
``slt_jax.run_config``.
"""
from __future__ import annotations

import logging
import os
import signal
import sys
import time
from typing import Any

import jax
import ml_collections
from tqdm import tqdm

from slt_jax import sharding
from slt_jax.checkpoint import CheckpointMismatch, Checkpointer, PreemptionFlag, StorageError, data_fingerprint
from slt_jax.data import DataError
from slt_jax.metrics_log import append_record, last_train_seconds, repair_metrics
from slt_jax.run_config import ConfigError, fingerprint
from slt_jax.run_outputs import run_summary, write_config, write_outputs
from slt_jax.step import TrainState
from slt_jax.training_run import Run
from slt_jax.workdir import prepare_workdir, storage_error, workdir_lock

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


class Preempted(RuntimeError):
    """SIGTERM or SIGINT arrived; the run stopped at a safe point (the state checkpointed if training had begun)
    and the same command resumes it. ``signum`` is the signal."""

    def __init__(self, message: str, signum: int = signal.SIGTERM):
        super().__init__(message)
        self.signum = signum


def _to_float(tree: dict[str, Any]) -> dict[str, Any]:
    return {k: float(v) for k, v in jax.device_get(tree).items()}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Finds a ticket; writes WORKDIR/{config.json, metrics.jsonl, checkpoints/, ticket/, *.png}.

    Re-running with the same config and workdir resumes from the latest checkpoint. One run at a time
    per workdir (WorkdirInUse); SIGTERM or SIGINT stops at a safe point (Preempted); a failing disk
    raises StorageError naming the path and what was kept. Returns the summary ``run.py`` prints last.
    """
    with PreemptionFlag() as signals:
        prepare_workdir(workdir)
        run = Run(config, workdir)  # checks config and data; writes nothing
        if signals.raised:  # e.g. during the imports or the data loading
            raise Preempted(f"{signals.name} during start-up, before training: nothing written; run the same command "
                            "to start", signals.signum)
        with workdir_lock(workdir):
            try:
                return _train_and_evaluate(run, workdir, signals)
            except (StorageError, Preempted, TrainingDiverged, CheckpointMismatch, ConfigError, DataError):
                raise
            except Exception as e:
                error = storage_error(e, workdir)
                if error is None:
                    raise
                raise error from e


def _train_and_evaluate(run: Run, workdir: str, signals: PreemptionFlag) -> dict[str, Any]:
    config = run.config
    is_main = jax.process_index() == 0
    metrics_path = os.path.join(workdir, "metrics.jsonl")

    checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"),
                                {**fingerprint(config), "data": data_fingerprint(run.dataset), **run.fingerprint()})
    try:
        template = run.initial_state()
        # Refuses another config's checkpoints, and stops on an unreadable disk, before we write anything.
        state = checkpointer.restore_latest(template)
        if is_main:
            write_config(workdir, config, run.method_settings)
        if state is None:
            state = template
            if is_main and os.path.exists(metrics_path):
                os.remove(metrics_path)
        else:
            log.info("resuming from step %d", int(state.step))
            run.restore_weights(state)
            if is_main:
                repair_metrics(metrics_path, int(state.step), config.log_every, run.num_steps)
        start = int(state.step)
        if signals.raised:
            raise Preempted(f"{signals.name} during start-up, before training: nothing new to save (checkpoints kept in "
                            f"{workdir}/checkpoints); run the same command to resume at step {start}", signals.signum)
        t0 = time.time()
        state = _train(run, state, checkpointer, signals, metrics_path, is_main)
    except BaseException:
        try:
            checkpointer.close()
        except Exception:  # noqa: BLE001 - the error in flight says more than a failed last save
            pass
        raise
    checkpointer.close()
    return _finish(run, state, time.time() - t0, workdir, signals, is_main)


def _train(run: Run, state: TrainState, checkpointer: Checkpointer, signals: PreemptionFlag, metrics_path: str,
           is_main: bool) -> TrainState:
    config, workdir = run.config, run.workdir
    # The step donates the state, so every leaf needs a buffer of its own; restored leaves may share one.
    state = jax.device_put(state, sharding.replicated(run.mesh), may_alias=False)
    train_step = run.train_step()

    def check_finite(step: int) -> None:
        if not bool(state.finite):
            raise TrainingDiverged(f"the loss or the gates became NaN or infinite by step {step}; stopped, keeping the "
                                   f"last good checkpoint in {workdir}/checkpoints (lower learning_rate?)")

    def checkpoint(step: int) -> None:
        check_finite(step)
        checkpointer.save(step, state)

    start = int(state.step)
    # Seconds of training so far, evaluations excluded (compilation included): each record's
    # "train_seconds", continued across resumes from the last record kept.
    seconds_before = last_train_seconds(metrics_path) if start else 0.0
    t_start, eval_seconds = time.time(), 0.0
    bar = tqdm(total=run.num_steps, initial=start, desc=f"{config.method} {config.model}", unit="step",
               disable=not (config.progress and is_main), file=sys.stderr, dynamic_ncols=True)
    try:
        for step in range(start, run.num_steps):
            x, y = run.dataset.train_batch(config.seed, step, config.batch_size)
            xs, ys = sharding.shard_batch((x, y), run.mesh)
            state, metrics = train_step(state, run.frozen, xs, ys)
            done = step + 1
            if run.redraws and run.method.is_redraw_step(done):
                state = run.redraw(state, done)
            if done % config.log_every == 0 or done == run.num_steps:
                check_finite(done)
                m = _to_float(metrics)
                record = {"step": done, **m,
                          "train_seconds": round(seconds_before + time.time() - t_start - eval_seconds, 3)}
                if done % config.eval_every == 0 or done == run.num_steps:
                    t_eval = time.time()
                    ev = run.evaluate(state)
                    eval_seconds += time.time() - t_eval
                    record.update(ev)
                    bar.set_postfix(loss=f"{m['loss']:.3f}", val=f"{ev['val_accuracy']:.3f}",
                                    sparsity=f"{ev['sparsity']:.3f}")
                if is_main:
                    append_record(metrics_path, record)
            if (config.checkpoint_every and done % config.checkpoint_every == 0) or signals.raised:
                checkpoint(done)
            bar.update(1)
            if signals.raised:
                checkpointer.wait()
                raise Preempted(f"{signals.name} at step {done}: checkpoint saved in {workdir}/checkpoints; "
                                "run the same command to resume", signals.signum)
        if int(state.step) not in checkpointer.manager.all_steps():
            checkpoint(int(state.step))
    finally:
        bar.close()
    return state


def _warn_landing(summary: dict[str, Any], tolerance: float) -> None:
    target, threshold = summary["target_sparsity"], summary["threshold_sparsity"]
    if not summary["target_reached"]:
        log.warning("the ticket MISSED its target sparsity: %.4f against %.4f (tolerance %.4f; the threshold rule's "
                    "ticket: %.4f)", summary["sparsity"], target, tolerance, threshold)
    elif summary["projected"]:
        log.warning("the threshold rule's ticket missed its target sparsity (%.4f against %.4f); the ticket was "
                    "projected by rank to %.4f", threshold, target, summary["sparsity"])


def _finish(run: Run, state: TrainState, train_seconds: float, workdir: str, signals: PreemptionFlag,
            is_main: bool) -> dict[str, Any]:
    """The final evaluation and the ticket; a signal before the ticket is written stops here (the final
    checkpoint is saved, so a rerun only evaluates and writes the ticket)."""

    def stop_if_signalled() -> None:
        if signals.raised:
            raise Preempted(f"{signals.name} after training, before the ticket was written: checkpoint of step "
                            f"{int(state.step)} saved in {workdir}/checkpoints; run the same command to write the "
                            "ticket", signals.signum)

    stop_if_signalled()
    state = run.recalibrated(state)
    final = run.evaluate(state, splits=("val", "test"))
    binary = jax.device_get(run.method.binary_masks(state.gates))
    summary = run_summary(run, final, binary, train_seconds, workdir)
    stop_if_signalled()
    if hasattr(run.method, "landing"):  # CRBG: the threshold rule's sparsity, a projection, a miss
        summary.update(run.method.landing(state.gates))
        _warn_landing(summary, run.method.landing_tolerance)  # said once, with the ticket it describes
    if is_main:  # from here on a signal waits: the ticket, plots and summary take a moment
        summary = write_outputs(run, state, summary, binary, workdir)
    return summary
