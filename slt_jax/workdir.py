"""The workdir as a place: made and checked writable, held by one run at a time, its disk's failures named.

``prepare_workdir`` creates it and probes that it can be written, refusing an existing folder that
is not an slt-jax workdir (``check_run_workdir``: nothing of a user's is overwritten); ``workdir_lock`` holds
``WORKDIR/.lock`` for the run (a second run fails with ``WorkdirInUse`` before writing anything);
``storage_error`` turns an OS error that means the disk failed us (full, file-size limit, I/O
error, read-only) into a one-line ``StorageError`` naming the path and the checkpoints kept. What
the run writes there: ``slt_jax.metrics_log`` (metrics.jsonl), ``slt_jax.run_outputs``
(config.json, ticket/, summary.json, plots), ``slt_jax.checkpoint`` (checkpoints/).
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import tempfile

import jax
import numpy as np

from slt_jax.checkpoint import StorageError, committed_steps, os_error
from slt_jax.run_config import ConfigError
from slt_jax.ticket.destination import not_replaceable


# What a run writes in its workdir (slt_jax.run_outputs, slt_jax.metrics_log, slt_jax.checkpoint,
# slt_jax.plots, the lock, and the temporary names their atomic writes use).
RUN_ENTRIES = frozenset({"config.json", "summary.json", "metrics.jsonl", "checkpoints", "checkpoints.corrupt", "ticket",
                         "ticket.old", ".lock", "training_curves.png", "layer_sparsity.png", "gate_histogram.png",
                         "config.json.tmp", "summary.json.tmp", "metrics.jsonl.tmp"})
RUN_TEMPORARY_PREFIX = ".ticket-tmp-"
# Keys a run's config.json and summary.json both hold.
RUN_JSON_KEYS = ("method", "model", "dataset", "seed")


class WorkdirInUse(RuntimeError):
    """Another live run holds the workdir's lock."""


# OS errors that mean the disk failed us, not that our code is wrong.
STORAGE_ERRNOS = (errno.EIO, errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS, errno.EACCES)


def _json_object(path: str) -> dict | None:
    import json

    try:
        with open(path, "rb") as f:
            obj = json.loads(f.read().decode("utf-8"))
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def check_run_workdir(workdir: str) -> None:
    """Refuses (``ConfigError``, one line) an existing, non-empty folder that is not an slt-jax
    workdir: one holding anything a run does not write, a ``config.json`` or ``summary.json`` that
    is not a run's (a JSON object with method, model, dataset and seed), or a ``ticket`` that is not
    a ticket (``slt_jax.ticket.destination``). A run's own workdir, finished or not, passes."""
    if not os.path.isdir(workdir):
        return
    names = sorted(os.listdir(workdir))
    foreign = [n for n in names if n not in RUN_ENTRIES and not n.startswith(RUN_TEMPORARY_PREFIX)]
    for name in ("config.json", "summary.json"):
        path = os.path.join(workdir, name)
        if os.path.lexists(path):
            obj = _json_object(path)
            if obj is None or not all(k in obj for k in RUN_JSON_KEYS):
                foreign.append(f"{name} (not a run's)")
    for name in ("ticket", "ticket.old"):
        what = not_replaceable(os.path.join(workdir, name))
        if what is not None:
            foreign.append(f"{name} ({what})")
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise ConfigError(f"workdir {workdir} is not an slt-jax workdir (it holds {shown}); nothing in it was "
                          "changed; allowed: a new or empty directory, or a run's workdir")


def prepare_workdir(workdir: str) -> None:
    check_run_workdir(workdir)
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


def storage_error(error: BaseException, workdir: str) -> StorageError | None:
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
