"""Orbax checkpoints of the training state, resume, and preemption.

Saved under ``WORKDIR/checkpoints/STEP``: the train state (gate parameters, optimiser state,
method state such as lambda, model running statistics, step, RNG key) and a JSON fingerprint of
the config that shapes it. The frozen weights are never saved: they come back from the seed.
The data position is the step (batches are a pure function of the step).

Orbax writes each save to a temporary directory and renames it when complete, so a killed save
is never taken for a checkpoint. A checkpoint that fails to restore is skipped with a warning
and the previous one is used; a checkpoint made by a different config is refused.
"""
from __future__ import annotations

import logging
import os
import signal
from typing import Any

import orbax.checkpoint as ocp
from flax import serialization

log = logging.getLogger(__name__)


class CheckpointMismatch(ValueError):
    """The workdir holds checkpoints of a different model or config."""


class Checkpointer:
    def __init__(self, directory: str, fingerprint: dict[str, Any], max_to_keep: int = 2):
        self.fingerprint = fingerprint
        self.manager = ocp.CheckpointManager(
            os.path.abspath(directory),
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
        )

    def save(self, step: int, state: Any) -> None:
        """Saves ``state`` (any pytree, e.g. a ``TrainState``) as nested dicts, asynchronously."""
        state = serialization.to_state_dict(state)
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                        fingerprint=ocp.args.JsonSave(self.fingerprint)),
                          force=True)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def restore_latest(self, template: Any) -> Any | None:
        """The newest restorable state, or None. Raises CheckpointMismatch for a foreign config."""
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                fingerprint = self.manager.restore(step, args=ocp.args.Composite(fingerprint=ocp.args.JsonRestore()))["fingerprint"]
            except Exception as e:  # noqa: BLE001 - any unreadable checkpoint is skipped the same way
                self._discard(step, e)
                continue
            if fingerprint != self.fingerprint:
                diff = sorted(k for k in set(fingerprint) | set(self.fingerprint) if fingerprint.get(k) != self.fingerprint.get(k))
                raise CheckpointMismatch(
                    f"checkpoint {step} in {self.manager.directory} was made with a different config "
                    f"(differs in: {', '.join(diff)}); use another --workdir or the same config")
            try:
                as_dict = serialization.to_state_dict(template)
                restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(as_dict)))
                return serialization.from_state_dict(template, restored["state"])
            except Exception as e:  # noqa: BLE001
                self._discard(step, e)
        return None

    def _discard(self, step: int, error: Exception) -> None:
        """Deletes an unrestorable checkpoint: training passes its step again and must be able to save it."""
        reason = (str(error).strip().splitlines() or [""])[0][:200]
        log.warning("checkpoint %d is corrupt (%s: %s); deleted it, trying an earlier one", step,
                    type(error).__name__, reason)
        self.manager.delete(step)

    def close(self) -> None:
        self.manager.close()


class PreemptionFlag:
    """Catches SIGTERM so the loop can save and exit cleanly (single-process preemption)."""

    def __init__(self):
        self.raised = False
        self._previous = None

    def __enter__(self) -> "PreemptionFlag":
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: leave signals alone
            self._previous = None
        return self

    def _handle(self, signum, frame) -> None:
        self.raised = True

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
