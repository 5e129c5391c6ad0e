"""Test setup: 8 simulated CPU devices and a per-session compilation cache, set before JAX is imported anywhere."""
import os
import pathlib
import time
from typing import NamedTuple

os.environ["XLA_FLAGS"] = " ".join(
    [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    + ["--xla_force_host_platform_device_count=8"]
)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache for the session: its xdist workers and every process they start
# inherit it. The same programs (the digits MLP's step and evaluation, the seeded inits) recur in
# dozens of runs, each building them afresh, and on 2 cores compiling them is most of a short run's
# time. A new directory per session, made by the process that starts it (the xdist controller), so
# no run's timing depends on an earlier session.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="slt-jax-test-xla-cache-")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import pytest  # noqa: E402

from configs import default  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def tiny_config():
    """The default config shrunk to a few seconds of CPU: digits, a small MLP, no progress bar."""
    c = default.get_config()
    c.num_epochs = 0
    c.num_steps = 60
    c.batch_size = 64
    c.log_every = 10
    c.eval_every = 30
    c.checkpoint_every = 0
    c.num_devices = 1
    c.progress = False
    c.plots = False
    return c


def short_digits_config(**overrides):
    """tiny_config's settings for a 20-step run, as a function: module- and session-scoped fixtures
    cannot take a per-test fixture."""
    c = default.get_config()
    c.update(num_epochs=0, num_steps=20, batch_size=64, log_every=10, eval_every=20, checkpoint_every=0,
             num_devices=1, progress=False, plots=False)
    c.update(overrides)
    return c


class FinishedRun(NamedTuple):
    """A finished ``train_and_evaluate`` run: its workdir, the summary it returned, and its config
    (``to_dict()``) before and after the call."""
    workdir: pathlib.Path
    summary: dict
    config_before: dict
    config_after: dict


@pytest.fixture(scope="session")
def short_run(tmp_path_factory) -> FinishedRun:
    """The run of short_digits_config(), shared by every test that only reads a finished run's files
    (a test that writes into its workdir works on a copy)."""
    from slt_jax.train import train_and_evaluate

    config = short_digits_config()
    workdir = tmp_path_factory.mktemp("short_run")
    before = config.to_dict()
    summary = train_and_evaluate(config, str(workdir))
    return FinishedRun(workdir, summary, before, config.to_dict())


def run_default_cli(tmp_path, *args: str) -> dict:
    """``python run.py ARGS`` on the embedded default (one device, no progress bar or plots) into
    ``tmp_path``; asserts exit 0 and returns the summary it printed as its last line."""
    import json
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "run.py", *args, "--config.progress=False", "--config.plots=False",
                        "--config.num_devices=1", "--workdir", str(tmp_path)], cwd=ROOT, capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


def verify_on_digits_test_split(ticket_dir) -> dict:
    """tests/independent_verifier.py (the ticket contract, and accuracy from its own numpy forward
    pass) on the held-out digits the default config's runs report as their test split."""
    from independent_verifier import verify
    from slt_jax.data import load_dataset

    data = load_dataset(default.get_config())
    return verify(str(ticket_dir), data.x_test, data.y_test)


def checkpoint_steps(workdir) -> list[int]:
    """The committed checkpoint steps in WORKDIR/checkpoints, ascending."""
    d = workdir / "checkpoints"
    return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if d.exists() else []


def wait_for_checkpoint(proc, workdir, after: int) -> int:
    """Blocks until ``proc`` has committed a checkpoint newer than ``after``; returns its step."""
    deadline = time.time() + 300  # generous: the machine is shared; a run takes seconds
    while time.time() < deadline:
        newer = [s for s in checkpoint_steps(workdir) if s > after]
        if newer:
            return newer[-1]
        assert proc.poll() is None, f"run exited ({proc.returncode}) before a checkpoint: {proc.stderr.read()}"
        time.sleep(0.02)
    raise TimeoutError("no checkpoint appeared")


def run_metrics(workdir) -> list[dict]:
    """WORKDIR/metrics.jsonl's records without ``train_seconds`` (wall-clock time, never reproducible)."""
    import json

    return [{k: v for k, v in json.loads(line).items() if k != "train_seconds"}
            for line in open(workdir / "metrics.jsonl")]


def assert_same_ticket(workdir, reference, drop_steps=()) -> None:
    """The same mask bits and the same metrics records (those of ``drop_steps`` aside) as ``reference``."""
    import numpy as np

    def mask_bits(d):
        with np.load(d / "ticket" / "mask.npz") as f:
            return {k: f[k] for k in f.files}

    ours, ref = mask_bits(workdir), mask_bits(reference)
    assert ours.keys() == ref.keys()
    for k in ref:
        np.testing.assert_array_equal(ours[k], ref[k], err_msg=k)
    assert run_metrics(workdir) == [r for r in run_metrics(reference) if r["step"] not in drop_steps]
