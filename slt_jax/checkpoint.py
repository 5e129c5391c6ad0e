"""Orbax checkpoints of the training state, resume, preemption, and disk failures.

Saved under ``WORKDIR/checkpoints/STEP``: the train state (gate parameters, optimiser state,
method state such as lambda, model running statistics, step, RNG key) and a JSON fingerprint of
the config and data that shape it. The frozen weights are never saved: they come back from the
seed. The data position is the step (batches are a pure function of the step).

Orbax writes each save to a temporary directory and renames it when complete, so a killed save
is never taken for a checkpoint. A checkpoint whose own content fails to decode is moved aside to
``WORKDIR/checkpoints.corrupt/STEP-TIME`` (never deleted) with a warning, and the previous one is
used; a checkpoint that cannot be read because the disk fails (an OS error other than a missing
file inside it) stops the run with ``StorageError`` and nothing is touched; a checkpoint made by
a different config or on different data is refused (``CheckpointMismatch``).
"""
from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import signal
import time
from typing import Any

import jax
import numpy as np
from flax import serialization

from slt_jax.weights_fingerprint import mismatch_cause

log = logging.getLogger(__name__)


class CheckpointMismatch(ValueError):
    """The workdir holds checkpoints of a different model, config or data."""


class StorageError(RuntimeError):
    """The disk failed (I/O error, disk full, file-size limit, read-only): the message names the path and
    what was kept; nothing was deleted."""


def os_error(error: BaseException) -> tuple[int, str | None] | None:
    """``(errno, path)`` of the OS failure behind ``error``, or None if it is not one: an ``OSError`` in
    its chain, or TensorStore's ``[os_error_code='N']`` (Orbax passes those on as ValueError)."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno:
            return error.errno, error.filename
        text = str(error)
        code = re.search(r"os_error_code='?(\d+)", text)
        if code:
            path = re.search(r'(?:Failed writing|Failed reading|local file):? "([^"]+)"', text)
            return int(code.group(1)), path.group(1) if path else None
        error = error.__cause__ if error.__cause__ is not None else (
            None if error.__suppress_context__ else error.__context__)
    return None


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [""])[0][:200]


def committed_steps(directory: str) -> list[int]:
    """The steps of the complete checkpoints in ``directory`` (Orbax's temporary directories excluded)."""
    try:
        return sorted(int(n) for n in os.listdir(directory) if n.isdigit())
    except OSError:
        return []


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


# Fingerprint keys added after the first checkpoints were written, and what each one records.
LATER_KEYS = {"data": "data fingerprint", "frozen_weights": "frozen weights' digest", "method": "resolved method"}


def _weights_problem(theirs: Any, ours: dict[str, Any], frozen_from: str | None) -> str | None:
    """None if ``theirs`` (a checkpoint's ``frozen_weights``) records the weights ``ours`` does, drawn
    from the same params file; else why not, in one clause."""
    theirs = theirs if isinstance(theirs, dict) else {}
    then, now = theirs.get("settings") or {}, ours["settings"]
    if theirs.get("sha256") == ours["sha256"] and then.get("frozen_from_sha256") == now["frozen_from_sha256"]:
        return None
    if then.get("frozen_from_sha256") != now["frozen_from_sha256"]:
        return (f"the params file frozen_from={frozen_from!r} was replaced (sha256 "
                f"{str(then.get('frozen_from_sha256'))[:12]}... then, {str(now['frozen_from_sha256'])[:12]}... now)")
    return mismatch_cause(theirs, ours, now, "the seed draws other weights than then: the model's initialisers changed")


class Checkpointer:
    def __init__(self, directory: str, fingerprint: dict[str, Any], max_to_keep: int = 2):
        self.fingerprint = fingerprint
        self.directory = os.path.abspath(directory)
        import orbax.checkpoint as ocp  # half a second to import: a run refused before training never loads it

        self._ocp = ocp
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
        )

    def save(self, step: int, state: Any) -> None:
        """Saves ``state`` (any pytree, e.g. a ``TrainState``) as nested dicts, asynchronously."""
        state = serialization.to_state_dict(state)
        ocp = self._ocp
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                        fingerprint=ocp.args.JsonSave(self.fingerprint)),
                          force=True)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def restore_latest(self, template: Any) -> Any | None:
        """The newest restorable state, or None. Raises CheckpointMismatch for a foreign config or data,
        StorageError when the disk fails to read one (then nothing has been changed)."""
        ocp = self._ocp
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                fingerprint = self.manager.restore(step, args=ocp.args.Composite(fingerprint=ocp.args.JsonRestore()))["fingerprint"]
                if not isinstance(fingerprint, dict):
                    raise ValueError(f"the fingerprint is a {type(fingerprint).__name__}, not a JSON object")
            except Exception as e:  # noqa: BLE001 - an I/O error stops the run, anything else is corruption
                self._set_aside(step, e)
                continue
            self._check_fingerprint(step, fingerprint)
            try:
                as_dict = serialization.to_state_dict(template)
                restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(as_dict)))
                return serialization.from_state_dict(template, restored["state"])
            except Exception as e:  # noqa: BLE001
                self._set_aside(step, e)
        return None

    def _check_fingerprint(self, step: int, theirs: dict[str, Any]) -> None:
        ours = self.fingerprint
        # Recorded since: a checkpoint made before lacks them, and resumes with a warning.
        legacy = sorted(k for k in LATER_KEYS if k in ours and k not in theirs)
        if legacy:
            ours = {k: v for k, v in ours.items() if k not in legacy}
        diff = sorted(k for k in set(theirs) | set(ours) if k != "frozen_weights" and theirs.get(k) != ours.get(k))
        where = f"checkpoint {step} in {self.directory}"
        if "frozen_weights" in ours and not diff:
            problem = _weights_problem(theirs["frozen_weights"], ours["frozen_weights"], ours.get("frozen_from"))
            if problem:
                raise CheckpointMismatch(f"{where} was trained on other frozen weights: {problem}; use another "
                                         "--workdir, or the setup the checkpoint was trained with")
        if not diff:
            if legacy:
                log.warning("checkpoint %d in %s records no %s: resuming without checking that they are unchanged",
                            step, self.directory, " nor ".join(LATER_KEYS[k] for k in legacy))
            return
        if diff == ["data"]:
            then, now = (d if isinstance(d, dict) else {} for d in (theirs["data"], ours["data"]))
            raise CheckpointMismatch(
                f"{where} was trained on other data: {now.get('name')} has changed "
                f"(content sha256 {str(then.get('sha256'))[:12]}... then, {str(now.get('sha256'))[:12]}... now); "
                "use another --workdir, or the data the checkpoint was trained on")
        if diff == ["method"]:
            then, now = (d if isinstance(d, dict) else {} for d in (theirs["method"], ours["method"]))
            changed = "; ".join(f"{k}={then.get(k)!r} then, {now.get(k)!r} now" for k in sorted(set(then) | set(now))
                                if then.get(k) != now.get(k))
            raise CheckpointMismatch(
                f"{where} was made with other settings of method {now.get('name')} ({changed}): a default changed "
                "in the code? use another --workdir, or set the value the checkpoint was made with")
        raise CheckpointMismatch(
            f"{where} was made with a different config "
            f"(differs in: {', '.join(diff)}); use another --workdir or the same config")

    def _set_aside(self, step: int, error: Exception) -> None:
        """Moves a corrupt checkpoint to DIRECTORY.corrupt/STEP-TIME (training passes its step again and must
        be able to save it); an OS error other than a missing file is the disk's fault: StorageError."""
        failure = os_error(error)
        if failure is not None and failure[0] != errno.ENOENT:
            code, path = failure
            raise StorageError(
                f"cannot read checkpoint {step} in {self.directory}: {os.strerror(code)} (errno {code}"
                f"{', ' + str(path) if path else ''}); stopped without changing anything: fix the disk, then run "
                "the same command") from error
        source = os.path.join(self.directory, str(step))
        aside = os.path.join(self.directory + ".corrupt", f"{step}-{time.strftime('%Y%m%d-%H%M%S')}")
        n, target = 1, aside
        while os.path.exists(target):
            n, target = n + 1, f"{aside}-{n + 1}"
        if jax.process_index() == 0:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            os.rename(source, target)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"slt_jax checkpoint {step} set aside")
        self.manager.reload()
        log.warning("checkpoint %d is corrupt (%s: %s); moved it aside to %s, trying an earlier one", step,
                    type(error).__name__, _first_line(error), target)

    def close(self) -> None:
        """Waits for the last save and releases Orbax's threads, even when the save failed (then raises)."""
        try:
            self.manager.wait_until_finished()
        finally:
            self.manager.close()


class PreemptionFlag:
    """Catches SIGTERM (preemption) and SIGINT (Ctrl-C) so the run can stop at a safe point: save, print one
    line, exit. A second SIGINT raises KeyboardInterrupt at once.

    Installed as the handler itself; a signal caught by the handler it replaces (anything with a ``signum``
    attribute, such as ``run.py``'s during start-up) counts as caught here."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    @property
    def raised(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""

    def __enter__(self) -> "PreemptionFlag":
        try:
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self)
                self.signum = self.signum or getattr(self._previous[s], "signum", None)
        except ValueError:  # not the main thread: leave signals alone
            pass
        return self

    def __call__(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = self.signum or signum

    def __exit__(self, *exc) -> None:
        for s, previous in self._previous.items():
            signal.signal(s, previous)
        self._previous = {}
