"""The harness: joins a method, a model, data, sharding and checkpoints into one training run.

``train_and_evaluate(config, workdir)`` finds a ticket and returns its summary. Every method runs
through the same public pieces a researcher's own loop uses (``slt_jax.step``, ``slt_jax.frozen``,
``slt_jax.masking``), the same data order, evaluation and logging, so comparisons are fair.
Evaluation always measures the binary ticket: kept weights at their frozen value, the rest 0.
This module holds the loop and the workdir's files; config checks live in ``slt_jax.run_config``.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import signal
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
from slt_jax.checkpoint import (CheckpointMismatch, Checkpointer, PreemptionFlag, StorageError, committed_steps,
                                os_error)
from slt_jax.data import DataError, load_dataset
from slt_jax.gates import gate_count
from slt_jax.methods import create_method
from slt_jax.models import create_model
from slt_jax.run_config import ConfigError, check_model_fits, fingerprint, model_spec, validate_config
from slt_jax.step import TrainState, classification_loss, make_eval_fn, make_train_step, ticket_params
from slt_jax.ticket import ZOO_INIT_KWARGS, save_ticket, ticket_size

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


class Preempted(RuntimeError):
    """SIGTERM or SIGINT arrived; the run stopped at a safe point (the state checkpointed if training had begun)
    and the same command resumes it. ``signum`` is the signal."""

    def __init__(self, message: str, signum: int = signal.SIGTERM):
        super().__init__(message)
        self.signum = signum


class WorkdirInUse(RuntimeError):
    """Another live run holds the workdir's lock."""


# OS errors that mean the disk failed us, not that our code is wrong.
STORAGE_ERRNOS = (errno.EIO, errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS, errno.EACCES)


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
        # Pooling that empties the images, or a width that leaves a layer no units: refused here.
        check_model_fits(self.model, self.spec, input_shape, ZOO_INIT_KWARGS)
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
                                              config.structured_policy, config.structured_inputs)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        self.method = create_method(config, num_steps=self.num_steps, warmup_steps=self.warmup_steps,
                                    param_shapes=frozen_shapes)
        self.optimizer = self.method.optimizer()
        self.loss = classification_loss(config.label_smoothing, config.logit_scale)
        self.eval_fn = make_eval_fn(self.model.apply, {"train": False})
        # Three independent streams, none of them the weights' key: gate init, training noise
        # (folded with the step), and the evaluation's sample of the training masks. Raw key data
        # of the default PRNG (threefry, rbg, ...), so Orbax can checkpoint the training key.
        self.init_key, self.train_key, self.eval_key = jax.random.split(
            jax.random.fold_in(jax.random.PRNGKey(config.seed), 1), 3)
        self._update_stats = None  # compiled on first use by recalibrated()
        # A method that re-draws pruned weights (IteRand) draws them from the seed's generations
        # (slt_jax.frozen.generation_key), its coins from a fourth stream.
        self.redraws = hasattr(self.method, "redraw")
        if self.redraws:
            self.draw = frozen_lib.params_by_generation(self.model, input_shape, config.seed, ZOO_INIT_KWARGS,
                                                        config.frozen_dtype)
            self.redraw_key = jax.random.fold_in(jax.random.PRNGKey(config.seed), 2)
            self._redraw = jax.jit(self.method.redraw)

    def initial_state(self) -> TrainState:
        gates = self.method.init(self.init_key, self.shapes)
        # A copy of the key: the step donates the state's buffers.
        return TrainState.create(self.method, self.optimizer, gates, jax.numpy.array(self.train_key),
                                 self.initial_model_state)

    def train_step(self):
        """The jitted step of ``slt_jax.step`` for this run's model, method, loss and frozen storage."""
        return make_train_step(self.model.apply, self.method, self.optimizer, loss_fn=self.loss,
                               apply_kwargs={"train": True}, frozen_fn=self.storage.to_params)

    def redraw(self, state: TrainState, step: int) -> TrainState:
        """After step ``step``, when ``method.is_redraw_step(step)``: re-draws pruned weights (the
        step's ``frozen`` input changes); returns the state with the new generations."""
        event = step // self.method.redraw_every
        method_state, params = self._redraw(self.redraw_key, state.gates, state.method_state,
                                            self.frozen_params(self.frozen), self.draw(event), event)
        self._set_weights(params)
        return state.replace(method_state=method_state)

    def restore_weights(self, state: TrainState) -> None:
        """The weights of a resumed run: the seed's, or, after re-draws, replayed from the generations."""
        if self.redraws:
            self._set_weights(frozen_lib.redrawn_weights(self.draw, jax.device_get(state.method_state["generation"])))

    def _set_weights(self, params: Any) -> None:
        self.storage = frozen_lib.frozen_storage(self.model, params, self.dataset.input_shape, self.config.seed,
                                                 self.config.frozen_dtype, False, ZOO_INIT_KWARGS)
        self.frozen = sharding.replicate(self.storage.stored, self.mesh)

    def recalibrated(self, state: TrainState) -> TrainState:
        """The state with the model's running statistics (BatchNorm) recomputed on the binary ticket.

        Training averages them under the training masks (CRBG's noisy gates), which are not the
        ticket's: a ResNet-18 CRBG ticket on MNIST scored 78% with them and 94% with its own. The
        ticket's statistics are the training ones updated (momentum as in training) by
        ``bn_recalibration_batches`` train-mode forward passes of the ticket over the first training
        batches. Not from the initial statistics: their variance of 1 would outweigh a sparse
        network's small activations for many batches. Nothing else changes."""
        n = self.config.bn_recalibration_batches
        if not state.model_state or not n:
            return state
        if self._update_stats is None:
            self._update_stats = jax.jit(lambda params, stats, x: self.model.apply(
                {"params": params, **stats}, x, train=True, mutable=list(stats))[1])
        params = ticket_params(self.method, state.gates, self.frozen_params(self.frozen))
        stats = state.model_state
        for i in range(n):
            x, y = self.dataset.train_batch(self.config.seed, i, self.config.batch_size)
            stats = self._update_stats(params, stats, sharding.shard_batch((x, y), self.mesh)[0])
        return state.replace(model_state=stats)

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
        stochastic = self.method.masked_params(frozen, sample)
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
                "structured_policy": cfg.structured_policy, "structured_inputs": cfg.structured_inputs,
                "method": cfg.method,
                "frozen_dtype": cfg.frozen_dtype,  # the ticket is defined on weights rounded to it
                "dataset": cfg.dataset, "preprocessing": self.dataset.preprocessing}
        if self.method.ticket_weights:  # e.g. biprop's sign(w0) * alpha(mask), replayed by the ticket
            meta["weights"] = self.method.ticket_weights
        if cfg.frozen_from:
            meta["frozen_from"] = {"path": os.path.abspath(cfg.frozen_from), "sha256": self.frozen_sha256}
        return meta


def _write_json(path: str, obj: Any) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
    os.replace(tmp, path)


def _steps_text(steps: list[int]) -> str:
    return ", ".join(map(str, steps[:5])) + (f" and {len(steps) - 5} more" if len(steps) > 5 else "")


def _repair_metrics(path: str, step: int, log_every: int, num_steps: int) -> None:
    """Keeps the intact records of steps up to ``step`` (the resumed checkpoint's); later ones are dropped
    and logged again by the resumed run. Damage (a line cut off by a kill or a full disk, garbled or
    duplicated lines, a deleted file, records missing before ``step``) is repaired from what is intact,
    with one warning naming the file and what was dropped or is missing."""
    if not os.path.exists(path):
        if step > 0:
            log.warning("%s is missing: the records of steps 1 to %d are lost (training resumes at step %d and "
                        "logs the later ones)", path, step, step)
        return
    with open(path, "rb") as f:
        content = f.read()
    lines = content.splitlines()
    cut_off = not content.endswith(b"\n")  # the last line's write was cut off (kill, full disk)
    keep, dropped, seen = [], [], set()
    for number, line in enumerate(lines, start=1):
        try:
            record_step = json.loads(line.decode())["step"]
            if isinstance(record_step, bool) or not isinstance(record_step, int) or record_step in seen:
                raise ValueError(record_step)
        except (ValueError, TypeError, KeyError, IndexError, UnicodeDecodeError):  # JSONDecodeError: a ValueError
            if not (cut_off and number == len(lines)):  # a cut-off record is logged again, or reported missing
                dropped.append(number)
            continue
        if record_step <= step:
            seen.add(record_step)
            keep.append(line + b"\n")
    expected = set(range(log_every, step + 1, log_every)) | ({num_steps} if num_steps <= step else set())
    missing = sorted(expected - seen)
    if dropped or missing:
        what = []
        if dropped:
            what.append(f"dropped {len(dropped)} unreadable or duplicate line(s) (line {_steps_text(dropped)})")
        if missing:
            what.append(f"no record of step(s) {_steps_text(missing)} (lost; not logged again)")
        log.warning("%s was damaged: %s; kept its %d intact record(s) up to step %d", path, "; ".join(what),
                    len(keep), step)
    if b"".join(keep) != content:
        tmp = path + ".tmp"
        with open(tmp, "wb") as f:
            f.writelines(keep)
        os.replace(tmp, path)  # a kill during the repair leaves the old file, never half of it


def _last_train_seconds(path: str) -> float:
    """The last record's ``train_seconds`` in a (repaired) metrics file; 0 if there is none."""
    seconds = 0.0
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                seconds = json.loads(line).get("train_seconds", seconds)
    return float(seconds)


def _to_float(tree: dict[str, Any]) -> dict[str, Any]:
    return {k: float(v) for k, v in jax.device_get(tree).items()}


def data_fingerprint(dataset: Any) -> dict[str, str]:
    """What the checkpoint records about the data, so a resume on other data is refused: a SHA-256 of the
    dtype, shape and bytes of every array of an in-memory dataset (digits, synthetic, npz), or of a tfds
    dataset's name, version and split sizes (hashing its files would take minutes)."""
    digest = hashlib.sha256()
    keys = ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test")
    if any(isinstance(getattr(dataset, k, None), np.ndarray) for k in keys):
        for key in keys:
            a = getattr(dataset, key, None)
            if a is None:
                digest.update(f"{key}=None;".encode())
                continue
            a = np.ascontiguousarray(a)
            digest.update(f"{key}={a.dtype.str}{a.shape};".encode())
            digest.update(a.reshape(-1).view(np.uint8).data)
    else:
        parts = {"num_train": getattr(dataset, "num_train", None), "num_classes": getattr(dataset, "num_classes", None)}
        for split in ("train", "test"):
            source = getattr(dataset, f"_{split}_source", None)
            info = getattr(source, "dataset_info", None)
            parts[split] = None if source is None else {"size": len(source), "name": str(getattr(info, "full_name", "")),
                                                        "version": str(getattr(info, "version", ""))}
        digest.update(json.dumps(parts, sort_keys=True, default=str).encode())
    return {"name": str(getattr(dataset, "name", type(dataset).__name__)), "sha256": digest.hexdigest()}


def prepare_workdir(workdir: str) -> None:
    try:
        os.makedirs(workdir, exist_ok=True)
        with tempfile.TemporaryFile(dir=workdir):  # a unique probe: processes sharing the workdir may race
            pass
    except OSError as e:
        raise ConfigError(f"workdir {workdir!r} is not writable ({e.strerror}); allowed: a directory you can write") from None


def _lock_holder(fd: int) -> str:
    """The pid holding the flock on ``fd``'s file, from /proc/locks (Linux); "unknown" elsewhere."""
    st = os.fstat(fd)
    inode = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        with open("/proc/locks") as f:
            for line in f:
                fields = line.split()
                if "FLOCK" in fields and fields[-3] == inode and fields[-4].isdigit():
                    return fields[-4]
    except OSError:
        pass
    return "unknown"


@contextlib.contextmanager
def workdir_lock(workdir: str):
    """Holds an exclusive flock on WORKDIR/.lock: a second run in the workdir fails with WorkdirInUse before
    writing anything. The kernel drops the lock when the holder exits, however it exits (even kill -9), so a
    dead run never blocks. Under jax.distributed only process 0 locks (the processes share the workdir)."""
    fd, busy = None, None
    if jax.process_index() == 0:
        fd = os.open(os.path.join(workdir, ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            busy = f"pid {_lock_holder(fd)}"
            os.close(fd)
            fd = None
    if jax.process_count() > 1:  # every process learns process 0's outcome, so none waits on a missing peer
        from jax.experimental import multihost_utils

        if not int(multihost_utils.broadcast_one_to_all(np.int32(busy is None))):
            busy = busy or "see process 0"
    if busy:
        raise WorkdirInUse(f"workdir {workdir} is in use by another run ({busy} holds {os.path.join(workdir, '.lock')}); "
                           "allowed: one run per workdir: wait for it to finish, or use another --workdir")
    try:  # the file stays empty: a run refused for whatever reason leaves the workdir byte for byte as it was
        yield
    finally:
        if fd is not None:
            os.close(fd)  # releases the lock


def _kept(workdir: str) -> str:
    steps = committed_steps(os.path.join(workdir, "checkpoints"))
    if not steps:
        return "kept: no checkpoint yet (a rerun starts at step 0)"
    return f"kept: the checkpoint(s) of step {', '.join(map(str, steps))} in {os.path.join(workdir, 'checkpoints')}"


def _storage_error(error: BaseException, workdir: str) -> StorageError | None:
    """A one-line StorageError for a disk failure (full, file-size limit, I/O error, read-only), else None."""
    failure = os_error(error)
    if failure is None or failure[0] not in STORAGE_ERRNOS:
        return None
    code, path = failure
    checkpoints = os.path.join(os.path.abspath(workdir), "checkpoints")
    if path is None or os.path.abspath(str(path)).startswith(checkpoints):
        where = f"a checkpoint to {checkpoints}"
    else:
        where = str(path)
    what = "I/O error on" if code == errno.EIO else "cannot write"
    return StorageError(f"{what} {where}: {os.strerror(code)} (errno {code}); {_kept(workdir)}; fix the disk (free "
                        "space, raise the limit), then run the same command to resume")


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
                error = _storage_error(e, workdir)
                if error is None:
                    raise
                raise error from e


def _train_and_evaluate(run: Run, workdir: str, signals: PreemptionFlag) -> dict[str, Any]:
    config = run.config
    is_main = jax.process_index() == 0
    metrics_path = os.path.join(workdir, "metrics.jsonl")

    checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"),
                                {**fingerprint(config), "data": data_fingerprint(run.dataset)})
    try:
        template = run.initial_state()
        # Refuses another config's checkpoints, and stops on an unreadable disk, before we write anything.
        state = checkpointer.restore_latest(template)
        if is_main:
            _write_json(os.path.join(workdir, "config.json"), json.loads(config.to_json()))
        if state is None:
            state = template
            if is_main and os.path.exists(metrics_path):
                os.remove(metrics_path)
        else:
            log.info("resuming from step %d", int(state.step))
            run.restore_weights(state)
            if is_main:
                _repair_metrics(metrics_path, int(state.step), config.log_every, run.num_steps)
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
    # Seconds of training so far, evaluations excluded (compilation included): each record's
    # "train_seconds", continued across resumes from the last record kept.
    seconds_before = _last_train_seconds(metrics_path) if start else 0.0
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
                log_metrics(record)
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
    config = run.config

    def stop_if_signalled() -> None:
        if signals.raised:
            raise Preempted(f"{signals.name} after training, before the ticket was written: checkpoint of step "
                            f"{int(state.step)} saved in {workdir}/checkpoints; run the same command to write the "
                            "ticket", signals.signum)

    stop_if_signalled()
    state = run.recalibrated(state)
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
    if hasattr(run.method, "landing"):  # CRBG: the threshold rule's sparsity, a projection, a miss
        summary.update(run.method.landing(state.gates))
        _warn_landing(summary, run.method.landing_tolerance)
    stop_if_signalled()
    if is_main:  # from here on a signal waits: the ticket, plots and summary take a moment
        meta = {**run.ticket_meta(), "size": summary["ticket_size"],
                "metrics": {k: summary[k] for k in ("val_accuracy", "test_accuracy", "sparsity", "binary_gap")}}
        generation = jax.device_get(state.method_state["generation"]) if run.redraws else None
        save_ticket(os.path.join(workdir, "ticket"), meta, binary, jax.device_get(state.model_state),
                    coding=config.ticket_coding, generation=generation)
        if config.plots:
            from slt_jax.plots import write_run_plots  # matplotlib takes a second to import: only when plotting

            summary["plots"] = write_run_plots(workdir, summary, jax.device_get(state.gates), binary)
        _write_json(os.path.join(workdir, "summary.json"), summary)
    return summary
