"""``WORKDIR/metrics.jsonl``: one JSON record per logged step, appended, and repaired on resume.

Each record holds ``step``, the step's metrics, ``train_seconds`` (training so far, evaluations
excluded) and, at evaluation steps, ``slt_jax.evaluation.evaluate``'s numbers. A resumed run keeps
the intact records up to its checkpoint's step (``repair_metrics``) and continues the clock from
the last one (``last_train_seconds``).
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any

log = logging.getLogger(__name__)


def append_record(path: str, record: dict[str, Any]) -> None:
    """Appends one record as a line of JSON."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def _steps_text(steps: list[int]) -> str:
    return ", ".join(map(str, steps[:5])) + (f" and {len(steps) - 5} more" if len(steps) > 5 else "")


def repair_metrics(path: str, step: int, log_every: int, num_steps: int) -> None:
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


def last_train_seconds(path: str) -> float:
    """The last record's ``train_seconds`` in a (repaired) metrics file; 0 if there is none."""
    seconds = 0.0
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                seconds = json.loads(line).get("train_seconds", seconds)
    return float(seconds)
