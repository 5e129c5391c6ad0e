"""The workdir as a place: made and checked writable, held by one run at a time, its disk's failures named.

``prepare_workdir`` creates it and probes that it can be written; ``workdir_lock`` holds
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


class WorkdirInUse(RuntimeError):
    """Another live run holds the workdir's lock."""


# OS errors that mean the disk failed us, not that our code is wrong.
STORAGE_ERRNOS = (errno.EIO, errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS, errno.EACCES)


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
