"""What a damaged ticket raises: ``TicketError``, one line naming the ticket's file and leaf."""
from __future__ import annotations


class TicketError(ValueError):
    """A ticket directory that is damaged or does not fit its model. The message is one line naming
    the ticket's file (and leaf) and what is wrong with it."""


def one_line(e: BaseException) -> str:
    """An exception as one line, ``Type: message``, for the tail of a ``TicketError``."""
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text}" if text else type(e).__name__
