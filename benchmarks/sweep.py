"""Benchmark sweeps that resume: every finished run is one JSON row in OUT/results.jsonl, and a
rerun skips the jobs whose rows it holds, so a sweep cut off or extended adds up over invocations.
A row does not record the code that made it: delete the file after changing the code."""
from __future__ import annotations

import json
import os
import sys
from typing import Any, Callable, Sequence

import jax

from slt_jax.data import DataError

Row = dict[str, Any]


def read_jsonl(path: str) -> list[Row]:
    with open(path) as f:
        return [json.loads(line) for line in f]


def saved_rows(out: str) -> list[Row]:
    """The rows of OUT/results.jsonl, none before the first run; makes OUT."""
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "results.jsonl")
    return read_jsonl(path) if os.path.exists(path) else []


def run_missing(out: str, jobs: Sequence[tuple], rows: list[Row], key: Callable[[Row], tuple],
                run: Callable[..., Row], report: Callable[[Row], str] | None = None) -> list[Row]:
    """``rows`` plus ``run(*job)`` for every job, in order, that no row's ``key(row)`` equals; each
    new row is appended to OUT/results.jsonl as soon as its run ends. Progress on stderr: a line
    per run, and ``report(row)`` after it. Data that cannot be read (an unprepared TFDS dataset, a
    missing npz) ends the sweep with its one-line message."""
    done = {key(r) for r in rows}
    for i, job in enumerate(jobs):
        if job in done:
            continue
        print(f"[{i + 1}/{len(jobs)}] {' '.join(map(str, job))}", file=sys.stderr, flush=True)
        try:
            row = run(*job)
        except DataError as e:
            sys.exit(f"error: {e}")
        jax.clear_caches()  # compiled programs pile up over runs until mapping memory runs out (LLVM)
        rows.append(row)
        with open(os.path.join(out, "results.jsonl"), "a") as f:
            f.write(json.dumps(row) + "\n")
        if report is not None:
            print(report(row), file=sys.stderr, flush=True)
    return rows


def write_table(out: str, heading: str, text: str) -> None:
    """OUT/table.md: ``heading``, then ``text``, which is also printed."""
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write(f"{heading}\n\n{text}\n")
    print(text)
