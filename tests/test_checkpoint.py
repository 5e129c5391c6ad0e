"""Checkpoints and faults, for real: ``run.py`` subprocesses killed, preempted, fed corrupt or foreign
checkpoints, and driven to divergence. Every interrupted run must end with the ticket (mask bits) of
one uninterrupted reference run, and the same metrics.

The tests on the 160-step reference run (a run.py process of its own, then reruns of it) are marked
slow, like every run.py process here: CI runs them (.ci/run), a plain ``pytest`` does not.
"""
import json
import random
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import ROOT, assert_same_ticket, checkpoint_steps, run_metrics, wait_for_checkpoint

NUM_STEPS, EVERY = 160, 20
ARGS = [f"--config.num_steps={NUM_STEPS}", f"--config.checkpoint_every={EVERY}", "--config.num_epochs=0",
        "--config.log_every=10", "--config.eval_every=80", "--config.num_devices=1", "--config.progress=False",
        "--config.plots=False"]
TIMEOUT = 300  # generous: the test machine is shared; a normal run takes seconds


def _command(workdir, *extra):
    return [sys.executable, "run.py", "--workdir", str(workdir), *ARGS, *extra]


def start(workdir, *extra) -> subprocess.Popen:
    return subprocess.Popen(_command(workdir, *extra), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def finish(workdir, *extra) -> subprocess.CompletedProcess:
    return subprocess.run(_command(workdir, *extra), cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT)




@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted run; every fault test must reproduce its ticket."""
    workdir = tmp_path_factory.mktemp("reference")
    p = finish(workdir)
    assert p.returncode == 0, p.stderr
    return workdir


@pytest.mark.slow  # run.py processes, killed and rerun, against a 160-step reference
def test_sigkill_at_random_moments_then_rerun_gives_identical_ticket(reference, tmp_path):
    rng = random.Random()
    workdir, last = tmp_path / "run", 0
    for _ in range(2):  # once after the first checkpoint, once later in training (maybe mid-save)
        proc = start(workdir)
        last = wait_for_checkpoint(proc, workdir, after=last)
        delay = rng.uniform(0.0, 0.3)
        time.sleep(delay)
        proc.kill()
        proc.communicate()
        assert proc.returncode == -signal.SIGKILL, f"finished before the kill at +{delay:.2f}s"
        last = checkpoint_steps(workdir)[-1]
    assert last < NUM_STEPS
    p = finish(workdir)
    assert p.returncode == 0, p.stderr
    assert_same_ticket(workdir, reference)


@pytest.mark.slow
def test_sigterm_saves_exits_zero_and_rerun_resumes(reference, tmp_path):
    workdir = tmp_path / "run"
    proc = start(workdir)
    wait_for_checkpoint(proc, workdir, after=0)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 0, err
    assert "preempted" in err and "run the same command to resume" in err
    saved = checkpoint_steps(workdir)[-1]
    assert saved < NUM_STEPS and not (workdir / "ticket").exists()
    assert run_metrics(workdir)[-1]["step"] <= saved
    p = finish(workdir)
    assert p.returncode == 0, p.stderr
    assert_same_ticket(workdir, reference)


def _truncate_data(step_dir) -> None:
    data = max((p for p in (step_dir / "state").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])


def _delete_metadata(step_dir) -> None:
    # The OCDBT manifest: the index of where every array of the state lies. (Orbax's tree
    # metadata, _METADATA, is not needed: the state is restored against the template's structure.)
    (step_dir / "state" / "manifest.ocdbt").unlink()


@pytest.mark.slow
@pytest.mark.parametrize("corrupt", [_truncate_data, _delete_metadata], ids=["truncated_data", "deleted_metadata"])
def test_corrupt_newest_checkpoint_is_moved_aside_with_a_warning(reference, tmp_path, corrupt):
    workdir = tmp_path / "run"
    shutil.copytree(reference, workdir)
    shutil.rmtree(workdir / "ticket")
    steps = checkpoint_steps(workdir)
    assert steps[-1] == NUM_STEPS and len(steps) >= 2
    corrupt(workdir / "checkpoints" / str(NUM_STEPS))
    # A save killed mid-write leaves a temporary directory behind; it must never be taken for a checkpoint.
    leftover = workdir / "checkpoints" / f"{NUM_STEPS + EVERY}.orbax-checkpoint-tmp-1234"
    shutil.copytree(workdir / "checkpoints" / str(steps[-2]), leftover)
    p = finish(workdir)
    assert p.returncode == 0, p.stderr
    assert f"checkpoint {NUM_STEPS} is corrupt" in p.stderr and "moved it aside" in p.stderr, p.stderr
    assert "trying an earlier one" in p.stderr
    # Set aside, never deleted: WORKDIR/checkpoints.corrupt/STEP-TIME holds the checkpoint as it was found.
    aside = list((workdir / "checkpoints.corrupt").iterdir())
    assert len(aside) == 1 and aside[0].name.startswith(f"{NUM_STEPS}-") and (aside[0] / "state").is_dir()
    assert_same_ticket(workdir, reference)


@pytest.mark.slow
@pytest.mark.parametrize("change", [["--config.model=lenet300"], ["--config.sparsity=0.5"]], ids=["model", "config"])
def test_foreign_checkpoint_is_refused_and_nothing_overwritten(reference, change):
    before = {p: p.read_bytes() for p in reference.rglob("*") if p.is_file()}
    p = finish(reference, *change)
    key = change[0].split("=")[0].removeprefix("--config.")
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2
    assert len(lines) == 1 and "different config" in lines[0] and key in lines[0], p.stderr
    assert {p: p.read_bytes() for p in reference.rglob("*") if p.is_file()} == before


@pytest.mark.slow
def test_divergence_stops_with_exit_3_and_saves_no_poisoned_checkpoint(tmp_path):
    # Dual ascent with an absurd step size: lambda, then the gradients and Adam's second moment overflow.
    p = finish(tmp_path, "--config.crbg.dual_lr=1e37", "--config.checkpoint_every=5", "--config.log_every=5")
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 3, p.stderr
    assert len(lines) == 1 and "NaN or infinite" in lines[0] and "last good checkpoint" in lines[0], p.stderr
    assert not (tmp_path / "ticket").exists()
    for step in checkpoint_steps(tmp_path):  # whatever was saved before the overflow is finite
        kept = ocp.StandardCheckpointer().restore(tmp_path / "checkpoints" / str(step) / "state")
        assert all(np.isfinite(np.asarray(leaf, np.float64)).all() for leaf in jax.tree.leaves(kept)), step
    assert all(np.isfinite(r["loss"]) for r in run_metrics(tmp_path)) if (tmp_path / "metrics.jsonl").exists() else True


@pytest.mark.slow  # reads the reference run's checkpoint
def test_checkpoint_holds_training_state_but_not_frozen_weights(reference):
    step_dir = reference / "checkpoints" / str(NUM_STEPS)
    state = ocp.StandardCheckpointer().restore(step_dir / "state")
    assert set(state) >= {"gates", "opt_state", "step", "rng", "method_state", "model_state"}
    assert int(state["step"]) == NUM_STEPS
    assert "lambda" in state["method_state"]  # CRBG's dual variable travels with the run
    gates = jax.tree.leaves(state["gates"])  # shaped like the params: {"Dense_0": {"kernel": ...}, ...}
    assert set(state["gates"]) == {"Dense_0", "Dense_1", "Dense_2"}
    assert gates and all(np.ndim(g) == 2 for g in gates)
    # The gates, Adam's two moments of them and a few scalars: the frozen weights would add another gates' worth.
    gate_bytes = sum(np.asarray(v).nbytes for v in gates)
    stored = sum(np.asarray(v).nbytes for v in jax.tree.leaves(state))
    assert stored <= 3 * gate_bytes + 1024
    fingerprint = json.loads((step_dir / "fingerprint" / "metadata").read_text())
    assert fingerprint["model"] == "digits_mlp" and fingerprint["num_steps"] == NUM_STEPS
