"""The harness: joins a method, a model, data, sharding and checkpoints into one training run.

``train_and_evaluate(config, workdir)`` finds a ticket and returns its summary. Every method runs
through the same public pieces a researcher's own loop uses (``slt_jax.step``, ``slt_jax.frozen``,
``slt_jax.masking``), the same data order, evaluation and logging, so comparisons are fair.
Evaluation always measures the binary ticket: kept weights at their frozen value, the rest 0.
This module holds the loop and the workdir's files; config checks live in ``slt_jax.run_config``.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from tqdm import tqdm

from slt_jax import frozen as frozen_lib
from slt_jax import masking, sharding
from slt_jax.checkpoint import Checkpointer, PreemptionFlag
from slt_jax.data import load_dataset
from slt_jax.gates import gate_count
from slt_jax.methods import create_method
from slt_jax.models import create_model
from slt_jax.plots import write_run_plots
from slt_jax.run_config import ConfigError, fingerprint, model_spec, validate_config
from slt_jax.step import TrainState, classification_loss, make_eval_fn, make_train_step, ticket_params
from slt_jax.ticket import ZOO_INIT_KWARGS, save_ticket, ticket_size

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


class Preempted(RuntimeError):
    """SIGTERM arrived; the state was checkpointed and the run can resume."""


def _accuracy(eval_fn, params, model_state, dataset, split: str, batch_size: int, mesh) -> float:
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


class Run:
    """The pieces of one training run, built from a validated config; ``train_and_evaluate`` drives it.

    ``num_steps`` and ``warmup_steps`` are resolved here from epochs and the dataset's size."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: str):
        validate_config(config)
        self.config = config
        self.workdir = workdir
        self.dataset = load_dataset(config)
        steps_per_epoch = self.dataset.steps_per_epoch(config.batch_size)
        if config.batch_size > self.dataset.num_train:
            raise ConfigError(f"batch_size={config.batch_size} exceeds the {self.dataset.num_train} training examples; "
                              f"allowed: 1 to {self.dataset.num_train}")
        self.num_steps = int(config.num_steps or round(config.num_epochs * steps_per_epoch))
        self.warmup_steps = int(config.warmup_epochs * steps_per_epoch)
        try:  # both raise ValueError only about num_devices and batch_size
            self.mesh = sharding.make_mesh(config.num_devices)
            sharding.check_batch_size(config.batch_size, self.mesh)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        self.spec = model_spec(config, self.dataset.num_classes)
        self.model = create_model(self.spec)
        input_shape = self.dataset.input_shape
        variables = frozen_lib.init_variables(self.model, input_shape, config.seed, ZOO_INIT_KWARGS)
        params = variables.pop("params")
        if config.frozen_from:
            self.frozen_sha256 = frozen_lib.file_sha256(config.frozen_from) if os.path.isfile(config.frozen_from) else None
            try:
                params = frozen_lib.load_params_file(config.frozen_from, params)
            except frozen_lib.FrozenWeightsError as e:
                raise ConfigError(str(e)) from None
        params = frozen_lib.round_frozen(params, config.frozen_dtype)
        self.storage = frozen_lib.frozen_storage(self.model, params, input_shape, config.seed, config.frozen_dtype,
                                                 config.regenerate_frozen, ZOO_INIT_KWARGS)
        self.frozen = sharding.replicate(self.storage.stored, self.mesh)  # the step's ``frozen`` input
        self.frozen_params = jax.jit(self.storage.to_params)
        self.initial_model_state = variables
        frozen_shapes = jax.eval_shape(self.frozen_params, self.frozen)
        try:  # a policy that matches nothing: the one ValueError gate_shapes raises
            self.shapes = masking.gate_shapes(frozen_shapes, config.gate_policy, config.structured,
                                              config.structured_policy)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        self.method = create_method(config, num_steps=self.num_steps, warmup_steps=self.warmup_steps,
                                    weights_per_gate=masking.weights_per_gate(frozen_shapes, self.shapes))
        self.optimizer = self.method.optimizer()
        self.loss = classification_loss(config.label_smoothing, config.logit_scale)
        self.eval_fn = make_eval_fn(self.model.apply, {"train": False})
        # Three independent streams, none of them the weights' key: gate init, training noise
        # (folded with the step), and the evaluation's sample of the training masks. Raw key data
        # of the default PRNG (threefry, rbg, ...), so Orbax can checkpoint the training key.
        self.init_key, self.train_key, self.eval_key = jax.random.split(
            jax.random.fold_in(jax.random.PRNGKey(config.seed), 1), 3)

    def initial_state(self) -> TrainState:
        gates = self.method.init(self.init_key, self.shapes)
        # A copy of the key: the step donates the state's buffers.
        return TrainState.create(self.method, self.optimizer, gates, jax.numpy.array(self.train_key),
                                 self.initial_model_state)

    def train_step(self):
        """The jitted step of ``slt_jax.step`` for this run's model, method, loss and frozen storage."""
        return make_train_step(self.model.apply, self.method, self.optimizer, loss_fn=self.loss,
                               apply_kwargs={"train": True}, frozen_fn=self.storage.to_params)

    def evaluate(self, state: TrainState, splits: tuple[str, ...] = ("val",)) -> dict[str, Any]:
        """Binary-ticket accuracy per split, sparsity, and the stochastic network's accuracy."""
        cfg = self.config
        frozen = self.frozen_params(self.frozen)
        params = ticket_params(self.method, state.gates, frozen)
        out = {}
        for split in splits:
            if self.dataset.has_split(split):
                out[f"{split}_accuracy"] = _accuracy(self.eval_fn, params, state.model_state, self.dataset, split,
                                                     cfg.eval_batch_size, self.mesh)
        sample = self.method.train_masks(state.gates, self.eval_key, state.step)
        stochastic = masking.apply_masks(frozen, sample)
        out["stochastic_val_accuracy"] = _accuracy(self.eval_fn, stochastic, state.model_state, self.dataset, "val",
                                                   cfg.eval_batch_size, self.mesh)
        out["binary_gap"] = out["stochastic_val_accuracy"] - out["val_accuracy"]
        report = masking.sparsity_report(jax.device_get(frozen), jax.device_get(self.method.binary_masks(state.gates)))
        out["sparsity"] = report["sparsity"]
        out["layer_sparsity"] = report["layers"]
        out["gated_weights"] = report["gated_weights"]
        return out

    def ticket_meta(self) -> dict[str, Any]:
        """What ``ticket.json`` records about the network, so the ticket reloads without this run."""
        cfg = self.config
        meta = {"model": self.spec, "input_shape": list(self.dataset.input_shape), "seed": cfg.seed,
                "init_kwargs": ZOO_INIT_KWARGS, "gate_policy": cfg.gate_policy, "structured": cfg.structured,
                "structured_policy": cfg.structured_policy, "method": cfg.method,
                "frozen_dtype": cfg.frozen_dtype,  # the ticket is defined on weights rounded to it
                "dataset": cfg.dataset, "preprocessing": self.dataset.preprocessing}
        if cfg.frozen_from:
            meta["frozen_from"] = {"path": os.path.abspath(cfg.frozen_from), "sha256": self.frozen_sha256}
        return meta


def _write_json(path: str, obj: Any) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
    os.replace(tmp, path)


def _truncate_metrics(path: str, step: int) -> None:
    """Drops metrics logged after ``step``: a resumed run logs them again."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        # A run killed mid-write can leave a last line without its newline: dropped, it is logged again.
        keep = [line for line in f if line.endswith("\n") and json.loads(line)["step"] <= step]
    with open(path, "w") as f:
        f.writelines(keep)


def _to_float(tree: dict[str, Any]) -> dict[str, Any]:
    return {k: float(v) for k, v in jax.device_get(tree).items()}


def prepare_workdir(workdir: str) -> None:
    try:
        os.makedirs(workdir, exist_ok=True)
        with tempfile.TemporaryFile(dir=workdir):  # a unique probe: processes sharing the workdir may race
            pass
    except OSError as e:
        raise ConfigError(f"workdir {workdir!r} is not writable ({e.strerror}); allowed: a directory you can write") from None


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Finds a ticket; writes WORKDIR/{config.json, metrics.jsonl, checkpoints/, ticket/, *.png}.

    Re-running with the same config and workdir resumes from the latest checkpoint.
    Returns the summary that ``run.py`` prints as its last line.
    """
    prepare_workdir(workdir)
    run = Run(config, workdir)
    is_main = jax.process_index() == 0
    metrics_path = os.path.join(workdir, "metrics.jsonl")

    checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"), fingerprint(config))
    template = run.initial_state()
    state = checkpointer.restore_latest(template)  # refuses another config's checkpoints before we write anything
    if is_main:
        _write_json(os.path.join(workdir, "config.json"), json.loads(config.to_json()))
    if state is None:
        state = template
        if is_main and os.path.exists(metrics_path):
            os.remove(metrics_path)
    else:
        log.info("resuming from step %d", int(state.step))
        if is_main:
            _truncate_metrics(metrics_path, int(state.step))
    # The step donates the state, so every leaf needs a buffer of its own; restored leaves may share one.
    state = jax.device_put(state, sharding.replicated(run.mesh), may_alias=False)
    train_step = run.train_step()

    def log_metrics(record: dict[str, Any]) -> None:
        if is_main:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def check_finite(step: int) -> None:
        if not bool(state.finite):
            raise TrainingDiverged(f"the loss or the gates became NaN or infinite by step {step}; stopped, keeping the "
                                   f"last good checkpoint in {workdir}/checkpoints (lower learning_rate?)")

    def checkpoint(step: int) -> None:
        check_finite(step)
        checkpointer.save(step, state)

    start = int(state.step)
    t0 = time.time()
    bar = tqdm(total=run.num_steps, initial=start, desc=f"{config.method} {config.model}", unit="step",
               disable=not (config.progress and is_main), file=sys.stderr, dynamic_ncols=True)
    try:
        with PreemptionFlag() as preempted:
            for step in range(start, run.num_steps):
                x, y = run.dataset.train_batch(config.seed, step, config.batch_size)
                xs, ys = sharding.shard_batch((x, y), run.mesh)
                state, metrics = train_step(state, run.frozen, xs, ys)
                done = step + 1
                if done % config.log_every == 0 or done == run.num_steps:
                    check_finite(done)
                    m = _to_float(metrics)
                    record = {"step": done, **m}
                    if done % config.eval_every == 0 or done == run.num_steps:
                        ev = run.evaluate(state)
                        record.update(ev)
                        bar.set_postfix(loss=f"{m['loss']:.3f}", val=f"{ev['val_accuracy']:.3f}",
                                        sparsity=f"{ev['sparsity']:.3f}")
                    log_metrics(record)
                if (config.checkpoint_every and done % config.checkpoint_every == 0) or preempted.raised:
                    checkpoint(done)
                bar.update(1)
                if preempted.raised:
                    checkpointer.wait()
                    raise Preempted(f"SIGTERM at step {done}: checkpoint saved in {workdir}/checkpoints; "
                                    "run the same command to resume")
            if int(state.step) not in checkpointer.manager.all_steps():
                checkpoint(int(state.step))
    finally:
        bar.close()
        checkpointer.wait()
        checkpointer.close()
    train_seconds = time.time() - t0

    final = run.evaluate(state, splits=("val", "test"))
    binary = jax.device_get(run.method.binary_masks(state.gates))
    summary = {
        "method": config.method, "model": config.model, "dataset": config.dataset, "seed": config.seed,
        "target_sparsity": config.sparsity, "structured": config.structured,
        "test_accuracy": final.get("test_accuracy"), "val_accuracy": final["val_accuracy"],
        "stochastic_val_accuracy": final["stochastic_val_accuracy"], "binary_gap": final["binary_gap"],
        "sparsity": final["sparsity"], "layer_sparsity": final["layer_sparsity"],
        "gated_weights": final["gated_weights"], "num_gates": gate_count(binary), "num_steps": run.num_steps,
        "ticket_size": ticket_size(binary, final["gated_weights"]),
        "train_seconds": round(train_seconds, 2), "workdir": workdir,
    }
    if is_main:
        meta = {**run.ticket_meta(), "size": summary["ticket_size"],
                "metrics": {k: summary[k] for k in ("val_accuracy", "test_accuracy", "sparsity", "binary_gap")}}
        save_ticket(os.path.join(workdir, "ticket"), meta, binary, jax.device_get(state.model_state),
                    coding=config.ticket_coding)
        if config.plots:
            summary["plots"] = write_run_plots(workdir, summary, jax.device_get(state.gates), binary)
        _write_json(os.path.join(workdir, "summary.json"), summary)
    return summary
