"""The command line's contract: the summary as the last stdout line, one-line errors, exit codes.

Exit codes:

* 0: success, or SIGTERM (preemption): the state was checkpointed at a safe point and one
  ``preempted: ...`` line says so; run the same command to resume.
* 2: bad input: a config file or value, data file, params file or workdir, another run holding the
  workdir, or a workdir whose checkpoints were made with another config or other data.
* 3: training diverged (NaN/Inf); the last good checkpoint is kept.
* 4: the disk failed (full, file-size limit, I/O error, read-only): the line names the path and what
  was kept; nothing was deleted; run the same command once the disk is fixed.
* 130: SIGINT (Ctrl-C): stopped like SIGTERM, with an ``interrupted: ...`` line.

Any other exception is a bug of ours and keeps its traceback.
"""
from __future__ import annotations

import json
import logging
import signal
import sys
from typing import Any

import ml_collections

from slt_jax.checkpoint import CheckpointMismatch, StorageError
from slt_jax.data import DataError
from slt_jax.frozen import FrozenWeightsError
from slt_jax.run_config import ConfigError, default_workdir
from slt_jax.train import Preempted, TrainingDiverged, train_and_evaluate
from slt_jax.workdir import WorkdirInUse

EXIT_BAD_INPUT, EXIT_DIVERGED, EXIT_STORAGE, EXIT_INTERRUPTED = 2, 3, 4, 130


def fail(message: str, code: int) -> int:
    """Prints the one-line error the CLI promises; returns the exit code."""
    print(f"error: {' '.join(message.split())}", file=sys.stderr)
    return code


class _QuietOrbax(logging.Filter):
    """Orbax and TensorStore log a failed save's traceback from several threads; our one line says it."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < logging.ERROR or "/orbax/" not in record.pathname


def _quiet_unraisable(default):
    def hook(unraisable) -> None:
        if isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == "Event loop is closed":
            return  # TensorStore finishing a failed save's writes after Orbax closed its event loop
        default(unraisable)
    return hook


def run(config: ml_collections.ConfigDict, workdir: str | None) -> int:
    """Runs one job; returns the process exit code."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    quiet = _QuietOrbax()
    for handler in logging.getLogger().handlers:
        handler.addFilter(quiet)
    sys.unraisablehook = _quiet_unraisable(sys.unraisablehook)
    if config.get("distributed"):
        import jax

        jax.distributed.initialize()  # coordinator and process ids from the cluster environment
    workdir = workdir or default_workdir(config)
    try:
        summary: dict[str, Any] = train_and_evaluate(config, workdir)
    except Preempted as e:
        if e.signum == signal.SIGINT:
            print(f"interrupted: {e}", file=sys.stderr)
            return EXIT_INTERRUPTED
        print(f"preempted: {e}", file=sys.stderr)
        return 0
    except TrainingDiverged as e:
        return fail(str(e), EXIT_DIVERGED)
    except StorageError as e:
        return fail(str(e), EXIT_STORAGE)
    except (ConfigError, DataError, FrozenWeightsError, CheckpointMismatch, WorkdirInUse) as e:
        return fail(str(e), EXIT_BAD_INPUT)
    print(json.dumps(summary))
    return 0
