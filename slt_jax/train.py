"""The harness: joins a method, a model, data, sharding and checkpoints into one training run.

``train_and_evaluate(config, workdir)`` finds a ticket and returns its summary. Every method runs
through the same jitted step, data order, evaluation and logging, so comparisons are fair.
Evaluation always measures the binary ticket: kept weights at their frozen value, the rest 0.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import sys
import tempfile
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from tqdm import tqdm

from slt_jax import masking, sharding
from slt_jax.checkpoint import Checkpointer, PreemptionFlag
from slt_jax.data import DataError, load_dataset
from slt_jax.gates import gate_count
from slt_jax.methods import create_method
from slt_jax.models import create_model
from slt_jax.plots import write_run_plots
from slt_jax.ticket import init_variables, round_frozen, save_ticket, ticket_size

log = logging.getLogger(__name__)

# Keys that do not change what a run computes: a resumed run may change them freely.
NON_SEMANTIC_KEYS = ("eval_every", "log_every", "checkpoint_every", "num_devices", "progress", "eval_batch_size",
                     "plots", "distributed", "ticket_coding", "regenerate_frozen")


class ConfigError(ValueError):
    """A config value outside what is allowed; the message names the key and the allowed values."""


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


class Preempted(RuntimeError):
    """SIGTERM arrived; the state was checkpointed and the run can resume."""


def model_spec(config: ml_collections.ConfigDict, num_classes: int) -> dict[str, Any]:
    return {"name": config.model, "num_classes": num_classes, "weight_init": config.weight_init,
            "init_scale": config.init_scale, "use_bias": config.use_bias, "width": config.width}


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Checks the values every run needs before anything is loaded or written."""
    if not isinstance(config.sparsity, (int, float)) or not 0.0 <= config.sparsity < 1.0:
        raise ConfigError(f"sparsity={config.sparsity!r}; allowed: a fraction in [0, 1)")
    if not isinstance(config.batch_size, int) or config.batch_size < 1:
        raise ConfigError(f"batch_size={config.batch_size!r}; allowed: a positive integer")
    if config.num_steps < 0 or config.num_epochs < 0 or (config.num_steps == 0 and config.num_epochs <= 0):
        raise ConfigError(f"num_steps={config.num_steps}, num_epochs={config.num_epochs}; allowed: num_steps > 0, "
                          "or num_steps = 0 and num_epochs > 0")
    if config.learning_rate <= 0 or not math.isfinite(config.learning_rate):
        raise ConfigError(f"learning_rate={config.learning_rate}; allowed: a positive finite number")


def fingerprint(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The config keys that shape the training state; checkpoints from another fingerprint are refused."""
    d = json.loads(config.to_json())
    return {k: v for k, v in sorted(d.items()) if k not in NON_SEMANTIC_KEYS}


def default_workdir(config: ml_collections.ConfigDict) -> str:
    """runs/MODEL-METHOD-HASH: the same command resumes, a different config gets its own directory."""
    digest = hashlib.sha256(json.dumps(fingerprint(config), sort_keys=True).encode()).hexdigest()[:8]
    return os.path.join("runs", f"{config.model}-{config.method}-{digest}")


def classification_loss(label_smoothing: float = 0.0, logit_scale: float = 1.0) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """Mean cross-entropy of ``logit_scale * logits`` against (optionally smoothed) labels.

    ``logit_scale`` is a temperature of the loss only; predictions (argmax) never see it. A sparse
    bias-free ReLU network's logits shrink roughly like density^(depth/2), which leaves the
    cross-entropy flat and pushes a method to keep weights for their scale alone; scaling the
    logits restores a useful loss. For such networks it equals scaling every weight by
    logit_scale^(1/depth), as edge-popup's "scale_fan" init does, without touching the weights.
    """

    def loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
        onehot = jax.nn.one_hot(labels, logits.shape[-1])
        if label_smoothing:
            onehot = optax.smooth_labels(onehot, label_smoothing)
        return optax.softmax_cross_entropy(logit_scale * logits, onehot).mean()

    return loss


def frozen_storage(model, params: Any, input_shape: tuple[int, ...],
                   config: ml_collections.ConfigDict) -> tuple[Any, Callable[[Any], Any]]:
    """What the train step holds for the frozen weights, and the traceable map from it to float32 weights.

    * default: the weights, stored in ``config.frozen_dtype`` and cast up to float32 in the step;
      "bfloat16" halves their bytes.
    * ``config.regenerate_frozen``: only the seed's PRNG key; the step re-runs the model's
      initialisers on every call, so no weight buffer lives between steps, at the price of
      recomputing them. The key is a traced input, so XLA cannot fold the weights into a constant.

    Both give ``round_frozen(init(seed), frozen_dtype)`` bit for bit: the choice never changes a ticket.
    """
    weights = round_frozen(params, config.frozen_dtype)
    if config.regenerate_frozen:
        dummy = jnp.zeros((1, *input_shape), jnp.float32)
        return jax.random.PRNGKey(config.seed), lambda key: round_frozen(
            model.init(key, dummy, train=False)["params"], config.frozen_dtype)
    stored = jax.tree.map(lambda w: w.astype(config.frozen_dtype), weights)
    return stored, lambda frozen: jax.tree.map(lambda w: w.astype(jnp.float32), frozen)


def _all_finite(tree: Any) -> jax.Array:
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack([jnp.isfinite(x).all() for x in leaves])) if leaves else jnp.bool_(True)


def make_train_step(model, method, optimizer: optax.GradientTransformation,
                    loss: Callable[[jax.Array, jax.Array], jax.Array] = classification_loss(),
                    frozen_fn: Callable[[Any], Any] = lambda frozen: frozen) -> Callable:
    """The jitted step ``(state, frozen, x, y) -> (state, metrics)``.

    Only ``state["gates"]`` is differentiated and updated; ``frozen`` is an input, never an output.
    ``frozen_fn`` turns it into the float32 weights inside the step (see ``frozen_storage``).
    """

    def step_fn(state, frozen, x, y):
        frozen = frozen_fn(frozen)
        step = state["step"]
        key = jax.random.fold_in(state["rng"], step)  # replicated: every device draws the same mask
        model_state = state["model_state"]

        def loss_fn(gates):
            params = masking.apply_masks(frozen, method.train_masks(gates, key, step))
            if model_state:
                logits, new_model_state = model.apply({"params": params, **model_state}, x, train=True,
                                                      mutable=list(model_state))
            else:
                logits, new_model_state = model.apply({"params": params}, x, train=True), model_state
            ce = loss(logits, y)
            penalty, aux = method.penalty(gates, state["method_state"], step)
            acc = jnp.mean(jnp.argmax(logits, -1) == y)
            return ce + penalty, (ce, acc, aux, new_model_state)

        (total, (ce, acc, aux, new_model_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["gates"])
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["gates"])
        gates = optax.apply_updates(state["gates"], updates)
        new_state = {
            "step": step + 1,
            "gates": gates,
            "opt_state": opt_state,
            "method_state": method.update_state(state["method_state"], aux),
            "model_state": new_model_state,
            # An overflow can poison the gates or the optimiser's moments while the loss still looks finite.
            "finite": state["finite"] & jnp.isfinite(total) & _all_finite((gates, opt_state)),
            "rng": state["rng"],
        }
        return new_state, {"loss": total, "cross_entropy": ce, "train_accuracy": acc, **aux}

    return jax.jit(step_fn, donate_argnums=(0,))


def make_eval_fn(model) -> Callable:
    """Jitted ``(params, model_state, x, y) -> number of correct predictions`` in inference mode."""

    def count(params, model_state, x, y):
        logits = model.apply({"params": params, **model_state}, x, train=False)
        return jnp.sum(jnp.argmax(logits, -1) == y)

    return jax.jit(count)


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
    """State and pieces of one training run; ``train_and_evaluate`` drives it."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: str):
        try:
            self._build(config, workdir)
        except DataError:
            raise
        except ValueError as e:  # the library's own checks (unknown model, method, family, ...)
            raise ConfigError(str(e)) from None

    def _build(self, config: ml_collections.ConfigDict, workdir: str) -> None:
        validate_config(config)
        self.config = config
        self.workdir = workdir
        self.dataset = load_dataset(config)
        if config.batch_size > self.dataset.num_train:
            raise ConfigError(f"batch_size={config.batch_size} exceeds the {self.dataset.num_train} training examples; "
                              f"allowed: 1 to {self.dataset.num_train}")
        self.num_steps = config.num_steps or config.num_epochs * self.dataset.steps_per_epoch(config.batch_size)
        with config.unlocked():
            config.num_steps = int(self.num_steps)
            config.warmup_steps = int(config.warmup_epochs * self.dataset.steps_per_epoch(config.batch_size))
        self.mesh = sharding.make_mesh(config.num_devices)
        sharding.check_batch_size(config.batch_size, self.mesh)
        self.spec = model_spec(config, self.dataset.num_classes)
        self.model = create_model(self.spec)
        variables = init_variables(self.spec, self.dataset.input_shape, config.seed)
        stored, self.frozen_fn = frozen_storage(self.model, variables.pop("params"), self.dataset.input_shape, config)
        self.frozen = sharding.replicate(stored, self.mesh)  # the step's ``frozen`` input
        self.frozen_params = jax.jit(self.frozen_fn)
        self.initial_model_state = variables
        frozen_shapes = jax.eval_shape(self.frozen_params, self.frozen)
        self.shapes = masking.gate_shapes(frozen_shapes, config.gate_policy, config.structured,
                                          config.structured_policy)
        self.method = create_method(config, masking.weights_per_gate(frozen_shapes, self.shapes))
        self.optimizer = self.method.optimizer()
        # Three independent streams, none of them the weights' key PRNGKey(seed): gate init,
        # training noise (folded with the step), and the evaluation's sample of the training masks.
        self.init_key, self.train_key, self.eval_key = jax.random.split(
            jax.random.fold_in(jax.random.PRNGKey(config.seed), 1), 3)

    def initial_state(self) -> dict[str, Any]:
        gates = self.method.init(self.init_key, self.shapes)
        return {"step": jnp.int32(0), "gates": gates, "opt_state": self.optimizer.init(gates),
                "method_state": self.method.init_state(), "model_state": self.initial_model_state,
                "finite": jnp.bool_(True), "rng": jnp.array(self.train_key)}  # a copy: the step donates it

    def evaluate(self, state: dict[str, Any], splits: tuple[str, ...] = ("val",)) -> dict[str, Any]:
        """Binary-ticket accuracy per split, sparsity, and the stochastic network's accuracy."""
        cfg, ev = self.config, self._eval_fn
        binary = self.method.binary_masks(state["gates"])
        frozen = self.frozen_params(self.frozen)
        ticket_params = masking.apply_masks(frozen, binary)
        out = {}
        for split in splits:
            if self.dataset.has_split(split):
                out[f"{split}_accuracy"] = _accuracy(ev, ticket_params, state["model_state"], self.dataset, split,
                                                     cfg.eval_batch_size, self.mesh)
        sample = self.method.train_masks(state["gates"], self.eval_key, state["step"])
        stochastic = masking.apply_masks(frozen, sample)
        out["stochastic_val_accuracy"] = _accuracy(ev, stochastic, state["model_state"], self.dataset, "val",
                                                   cfg.eval_batch_size, self.mesh)
        out["binary_gap"] = out["stochastic_val_accuracy"] - out["val_accuracy"]
        report = masking.sparsity_report(jax.device_get(frozen), jax.device_get(binary))
        out["sparsity"] = report["sparsity"]
        out["layer_sparsity"] = report["layers"]
        out["gated_weights"] = report["gated_weights"]
        return out

    @property
    def _eval_fn(self):
        if not hasattr(self, "_eval_cache"):
            self._eval_cache = make_eval_fn(self.model)
        return self._eval_cache


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
    config = ml_collections.ConfigDict(config.to_dict())  # our own copy; num_steps gets resolved
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
        log.info("resuming from step %d", int(state["step"]))
        if is_main:
            _truncate_metrics(metrics_path, int(state["step"]))
    # The step donates the state, so every leaf needs a buffer of its own; restored leaves may share one.
    state = jax.device_put(state, sharding.replicated(run.mesh), may_alias=False)
    train_step = make_train_step(run.model, run.method, run.optimizer,
                                 classification_loss(config.label_smoothing, config.logit_scale), run.frozen_fn)

    def log_metrics(record: dict[str, Any]) -> None:
        if is_main:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def check_finite(step: int) -> None:
        if not bool(state["finite"]):
            raise TrainingDiverged(f"the loss or the gates became NaN or infinite by step {step}; stopped, keeping the "
                                   f"last good checkpoint in {workdir}/checkpoints (lower learning_rate?)")

    def checkpoint(step: int) -> None:
        check_finite(step)
        checkpointer.save(step, state)

    start = int(state["step"])
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
            if int(state["step"]) not in checkpointer.manager.all_steps():
                checkpoint(int(state["step"]))
    finally:
        bar.close()
        checkpointer.wait()
        checkpointer.close()
    train_seconds = time.time() - t0

    final = run.evaluate(state, splits=("val", "test"))
    binary = jax.device_get(run.method.binary_masks(state["gates"]))
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
        meta = {"model": run.spec, "input_shape": list(run.dataset.input_shape), "seed": config.seed,
                "gate_policy": config.gate_policy, "structured": config.structured,
                "structured_policy": config.structured_policy, "method": config.method,
                "frozen_dtype": config.frozen_dtype,  # the ticket is defined on weights rounded to it
                "dataset": config.dataset, "preprocessing": run.dataset.preprocessing,
                "metrics": {k: summary[k] for k in ("val_accuracy", "test_accuracy", "sparsity", "binary_gap")},
                "size": summary["ticket_size"]}
        save_ticket(os.path.join(workdir, "ticket"), meta, binary, jax.device_get(state["model_state"]),
                    coding=config.ticket_coding)
        if config.plots:
            summary["plots"] = write_run_plots(workdir, summary, jax.device_get(state["gates"]), binary)
        _write_json(os.path.join(workdir, "summary.json"), summary)
    return summary
