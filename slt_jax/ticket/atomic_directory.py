"""Writing a ticket directory atomically: a crash mid-write leaves any previous ticket intact.

A save writes into a fresh ``.ticket-tmp-PID-XXXXXXXX-HOST`` directory beside the ticket and renames
it into place (the previous ticket, if any, is first renamed to ``PATH.old`` and removed after).
Staging directories that killed saves left behind are removed before the next save.
"""
from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import socket
from typing import Iterator

_TMP_PREFIX = ".ticket-tmp-"
_TMP_NAME = re.compile(r"^\.ticket-tmp-(\d+)-([0-9a-f]{8})-(.+)$")


def _host() -> str:
    return socket.gethostname().replace(os.sep, "_") or "localhost"


def _pid_alive(pid: int) -> bool:
    if os.name != "posix":  # no signal 0 to ask with: count it alive, keep its directory
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process: alive
        return True
    return True


def _remove_stale_tmp(parent: str) -> None:
    """Removes the ``.ticket-tmp-*`` directories beside a ticket that no save is writing any more: one
    a killed save left behind (its process, on this host, is gone) or one of an older slt_jax (no
    process recorded). Nothing else is touched; links are never followed."""
    host = _host()
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return
    for entry in entries:
        if not entry.name.startswith(_TMP_PREFIX) or not entry.is_dir(follow_symlinks=False):
            continue
        tag = _TMP_NAME.match(entry.name)
        if tag and (tag.group(3) != host or _pid_alive(int(tag.group(1)))):
            continue  # a save in progress, or one on another host we cannot ask
        shutil.rmtree(entry.path, ignore_errors=True)


def _make_tmp_dir(parent: str) -> str:
    """A fresh ``.ticket-tmp-PID-XXXXXXXX-HOST`` directory, created with the umask's permissions (the
    ticket directory is this directory renamed)."""
    host = _host()
    while True:
        tmp = os.path.join(parent, f"{_TMP_PREFIX}{os.getpid()}-{secrets.token_hex(4)}-{host}")
        try:
            os.mkdir(tmp, 0o777)
            return tmp
        except FileExistsError:
            continue


@contextlib.contextmanager
def replaced_atomically(path: str) -> Iterator[str]:
    """Yields an empty staging directory beside ``path``; when the block ends without an error, the
    staging directory becomes ``path`` (the previous one is removed), else it is removed and ``path``
    is left as it was."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    _remove_stale_tmp(parent)
    tmp = _make_tmp_dir(parent)
    try:
        yield tmp
        old = path + ".old"
        if os.path.exists(path):
            if os.path.lexists(old):  # a save killed after its rename left it: the ticket at path is newer
                shutil.rmtree(old)
            os.replace(path, old)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
