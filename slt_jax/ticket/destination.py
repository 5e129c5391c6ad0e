"""Where a save may write a ticket: nothing of a user's is ever replaced or deleted.

A save replaces what is at its path (``slt_jax.ticket.atomic_directory``: the previous ticket is
renamed to ``PATH.old`` and removed). ``check_destination`` allows that only where what it would
remove is a ticket, an empty directory, or nothing; a user's directory of other files, a plain
file or a symbolic link is refused with one line, before anything is written.
"""
from __future__ import annotations

import os

TICKET_JSON = "ticket.json"
# What a ticket directory holds (slt_jax.ticket.format); another .json or .npz of a later format is allowed.
_TICKET_SUFFIXES = (".json", ".npz")


def is_ticket_directory(path: str) -> bool:
    """A directory (not a link) holding ``ticket.json`` and nothing but ``.json`` and ``.npz`` files:
    what ``save_ticket`` writes, damaged or not."""
    if os.path.islink(path) or not os.path.isdir(path):
        return False
    entries = list(os.scandir(path))
    return (any(e.name == TICKET_JSON for e in entries)
            and all(e.is_file(follow_symlinks=False) and e.name.endswith(_TICKET_SUFFIXES) for e in entries))


def not_replaceable(path: str) -> str | None:
    """None if a save may remove what is at ``path``, else what is there, for the message."""
    if not os.path.lexists(path):
        return None
    if os.path.islink(path):
        return "a symbolic link"
    if not os.path.isdir(path):
        return "a file, not a ticket directory"
    if not os.listdir(path) or is_ticket_directory(path):
        return None
    names = sorted(os.listdir(path))
    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    return f"a directory that is not a ticket (it holds {shown})"


def check_destination(path: str) -> None:
    """Refuses, with one ``ValueError`` line, a save to ``path`` that would replace or delete
    something that is not a ticket: at ``path`` itself, or at ``PATH.old``, where a save moves the
    previous ticket before removing it."""
    for where in (path, path + ".old"):
        what = not_replaceable(where)
        if what is not None:
            raise ValueError(f"cannot save a ticket to {path}: {where} is {what}; allowed: a new path, an empty "
                             "directory or a ticket to replace (nothing else is removed)")
