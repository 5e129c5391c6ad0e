"""The command line's contract: the summary as the last stdout line, one-line errors, exit codes.

Exit 0 on success or after a SIGTERM checkpoint (preemption: re-run to resume); exit 2 for bad
input (config, data, params file, workdir); exit 3 when training diverged. Any other exception is
a bug of ours and keeps its traceback.
"""
from __future__ import annotations

import json
import logging
import sys
from typing import Any

import ml_collections

from slt_jax.checkpoint import CheckpointMismatch
from slt_jax.data import DataError
from slt_jax.frozen import FrozenWeightsError
from slt_jax.run_config import ConfigError, default_workdir
from slt_jax.train import Preempted, TrainingDiverged, train_and_evaluate

EXIT_BAD_INPUT, EXIT_DIVERGED = 2, 3


def fail(message: str, code: int) -> int:
    """Prints the one-line error the CLI promises; returns the exit code."""
    print(f"error: {message}", file=sys.stderr)
    return code


def run(config: ml_collections.ConfigDict, workdir: str | None) -> int:
    """Runs one job; returns the process exit code."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    if config.get("distributed"):
        import jax

        jax.distributed.initialize()  # coordinator and process ids from the cluster environment
    workdir = workdir or default_workdir(config)
    try:
        summary: dict[str, Any] = train_and_evaluate(config, workdir)
    except Preempted as e:
        print(f"preempted: {e}", file=sys.stderr)
        return 0
    except TrainingDiverged as e:
        return fail(str(e), EXIT_DIVERGED)
    except (ConfigError, DataError, FrozenWeightsError, CheckpointMismatch) as e:
        return fail(str(e), EXIT_BAD_INPUT)
    print(json.dumps(summary))
    return 0
