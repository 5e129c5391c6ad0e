"""Nothing lost, nothing silently wrong: signals at any phase, a second run in a busy workdir, a full disk,
an unreadable checkpoint, other data under the same workdir, a damaged metrics.jsonl and broken config
files, through the real ``run.py`` or the real ``train_and_evaluate``.

The ``run.py`` scenarios run concurrently in one module fixture (each is a short subprocess); every
interrupted run must end, after a rerun, with the ticket and metrics of one uninterrupted reference run.
They are marked slow (CI runs them, .ci/run; a plain ``pytest`` does not). The broken config files
fail before any training: those runs are forked from one process that imported run.py's
dependencies once (tests/forked_run_py.py) and stay in the default suite.
"""
import concurrent.futures
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import default
from slt_jax.checkpoint import StorageError
from slt_jax.train import train_and_evaluate

from conftest import ROOT, assert_same_ticket, checkpoint_steps, run_metrics, wait_for_checkpoint

NUM_STEPS, EVERY = 40, 20
ARGS = [f"--config.num_steps={NUM_STEPS}", f"--config.checkpoint_every={EVERY}", "--config.num_epochs=0",
        "--config.log_every=10", "--config.eval_every=20", "--config.num_devices=1", "--config.progress=False",
        "--config.plots=False"]
TIMEOUT = 300  # generous: the test machine is shared; a run takes seconds
FILE_SIZE_LIMIT = 100_000  # bytes: below one checkpoint's data file (~0.8 MB), above every other file
ENV = dict(os.environ)  # + a persistent compilation cache for the module's runs (set by the ``cli`` fixture)


def _config(**overrides):
    """The in-process twin of ARGS."""
    c = default.get_config()
    c.num_steps, c.checkpoint_every, c.num_epochs, c.log_every, c.eval_every = NUM_STEPS, EVERY, 0, 10, 20
    c.num_devices, c.progress, c.plots = 1, False, False
    for k, v in overrides.items():
        setattr(c, k, v)
    return c


def _command(workdir, *extra, before=()):
    return [sys.executable, "run.py", *before, "--workdir", str(workdir), *ARGS, *extra]


def _start(workdir, *extra) -> subprocess.Popen:
    return subprocess.Popen(_command(workdir, *extra), cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _finish(command) -> tuple[int, str, str]:
    p = subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=TIMEOUT)
    return p.returncode, p.stdout, p.stderr




def _catches(pid: int, signum: int) -> bool:
    """Whether process ``pid`` has installed a handler for ``signum`` (Linux: SigCgt in /proc/PID/status)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            mask = next(line.split()[1] for line in f if line.startswith("SigCgt:"))
    except (OSError, StopIteration):
        return False
    return bool(int(mask, 16) >> (signum - 1) & 1)


def _files(workdir) -> dict[str, bytes]:
    return {str(p.relative_to(workdir)): p.read_bytes() for p in workdir.rglob("*") if p.is_file()}


def _without_landing(stderr: str) -> str:
    """stderr less CRBG's landing warning: these runs' 40 steps land short of the target, which is
    said (tests/test_sparsity_landing.py) and is not the fault under test."""
    return "\n".join(line for line in stderr.splitlines() if "MISSED its target sparsity" not in line)


def _one_line(stderr: str, prefix: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(prefix), stderr
    return lines[0]


def _resumable_copy(reference, workdir):
    """The reference without its ticket and last checkpoint: a rerun resumes at step 20."""
    shutil.copytree(reference, workdir)
    shutil.rmtree(workdir / "ticket")
    shutil.rmtree(workdir / "checkpoints" / str(NUM_STEPS))
    (workdir / "summary.json").unlink()
    return workdir


# ---- run.py scenarios, run concurrently ------------------------------------------------------------------

CONFIG_FILES = {  # name -> (file content, strings the error line must contain besides the file's path)
    "raises": ('raise RuntimeError("broken at import")\n', ["RuntimeError: broken at import"]),
    "syntax_error": ("def get_config(:\n", ["SyntaxError", "line 1"]),
    "no_get_config": ("X = 1\n", ["defines no get_config()"]),
    "empty": ("", ["defines no get_config()"]),
    "import_error": ("import surely_not_a_module_xyz\n", ["No module named 'surely_not_a_module_xyz'"]),
    "returns_none": ("def get_config():\n    return None\n", ["get_config() returned None"]),
    "wrong_type": ("from configs import default\n\ndef get_config():\n    c = default.get_config()\n"
                   "    c.batch_size = 'sixty-four'\n    return c\n",
                   ["'batch_size'", "sixty-four", "cannot be casted to type <class 'int'>"]),
}


def _wait_for_record(proc, workdir) -> None:
    """Blocks until ``proc`` has logged its first metrics record (step 10), i.e. is in training."""
    deadline = time.time() + TIMEOUT
    while time.time() < deadline:
        if (workdir / "metrics.jsonl").exists() and (workdir / "metrics.jsonl").read_text().endswith("\n"):
            return
        assert proc.poll() is None, f"run exited ({proc.returncode}) before logging: {proc.stderr.read()}"
        time.sleep(0.01)
    raise TimeoutError("no metrics record appeared")


def _busy_workdir_sigint_then_sigterm_in_final_phase(d):
    """Run A pauses in training while run B tries the same workdir, then gets SIGINT. Its rerun A2 gets
    SIGTERM as soon as its last checkpoint is committed, i.e. in the final phase (evaluation, ticket,
    plots, exit); if A2 stopped before writing the ticket, a third run writes it."""
    workdir = d / "busy"
    out = {"workdir": workdir}
    a = _start(workdir, "--config.plots=True")  # plots: a longer final phase
    try:
        _wait_for_record(a, workdir)
        a.send_signal(signal.SIGSTOP)
        before = _files(workdir)
        out["b"] = _finish(_command(workdir))
        out["unchanged"] = before == _files(workdir)
        a.send_signal(signal.SIGCONT)
        a.send_signal(signal.SIGINT)
        a_out, a_err = a.communicate(timeout=TIMEOUT)
        out["a"] = (a.returncode, a_out, a_err)
        out["pid"], out["interrupted_at"] = a.pid, checkpoint_steps(workdir)[-1]
        a = _start(workdir, "--config.plots=True")
        while wait_for_checkpoint(a, workdir, after=out["interrupted_at"]) != NUM_STEPS:
            time.sleep(0.01)
        a.send_signal(signal.SIGTERM)
        a_out, a_err = a.communicate(timeout=TIMEOUT)
        out["final_phase"] = (a.returncode, a_out, a_err)
        if not (workdir / "ticket").exists():
            out["rerun"] = _finish(_command(workdir))
    except Exception as e:  # noqa: BLE001 - each test reports what it needed and did not get
        out["error"] = e
    finally:
        if a.poll() is None:
            a.send_signal(signal.SIGCONT)
            a.kill()
            a.communicate()
    return out


def _sigterm_at_startup(d):
    workdir = d / "startup"
    proc = _start(workdir)
    deadline = time.time() + 3  # unfixed, run.py never catches SIGTERM during start-up: send it anyway
    while time.time() < deadline and not _catches(proc.pid, signal.SIGTERM):
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=TIMEOUT)
    return proc.returncode, out, err, workdir


def _file_size_limit(d, reference):
    """Resumes at step 20 under a file-size limit that the next checkpoint exceeds (SIGXFSZ ignored, so the
    write fails with EFBIG as on a full disk), then reruns without it. The limit is set in the child
    before run.py is exec'd: no preexec_fn in a threaded test process."""
    workdir = _resumable_copy(reference, d / "fsize")
    limit = (f"import os, resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
             f"resource.setrlimit(resource.RLIMIT_FSIZE, ({FILE_SIZE_LIMIT}, {FILE_SIZE_LIMIT})); "
             "os.execv(sys.executable, [sys.executable] + sys.argv[1:])")
    limited = _finish([sys.executable, "-c", limit, *_command(workdir)[1:]])
    kept = checkpoint_steps(workdir)
    return {"limited": limited, "kept": kept, "rerun": _finish(_command(workdir)), "workdir": workdir}


def _cut_mid_line(path):
    text = path.read_bytes()
    second = text.index(b"\n") + 1
    path.write_bytes(text[: second + 20])  # step 10 intact, step 20 cut off, 30 and 40 gone


def _garble(path):
    lines = path.read_bytes().splitlines(keepends=True)
    lines[0] = b'{"step": 10, "loss": 0.\x00\xff garbage\n'  # step 10 unreadable
    path.write_bytes(b"".join(lines))


METRICS_DAMAGE = {  # name -> (damage, steps whose records are lost, strings of the warning)
    "truncated": (_cut_mid_line, [EVERY], [f"no record of step(s) {EVERY}"]),
    "deleted": (lambda path: path.unlink(), [10, EVERY], ["is missing", f"steps 1 to {EVERY} are lost"]),
    "garbled": (_garble, [10], ["dropped 1", "line 1", "no record of step(s) 10"]),
}


def _damaged_metrics(d, reference, name):
    """Resumes at step 20 with a damaged metrics.jsonl."""
    workdir = _resumable_copy(reference, d / f"metrics-{name}")
    METRICS_DAMAGE[name][0](workdir / "metrics.jsonl")
    return (*_finish(_command(workdir)), workdir)


def _other_data(d):
    """Trains on an npz, changes one bit of one pixel in it, reruns the same command."""
    from sklearn.datasets import load_digits

    from slt_jax.data.arrays import split_off

    digits = load_digits()  # the arrays of dataset=digits, so the compiled programs are the reference's
    x_train, y_train, x_test, y_test = split_off(digits.images.astype(np.uint8), digits.target, 0.2, seed=0)
    data, workdir = d / "data.npz", d / "npz"
    np.savez(data, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    first = _finish(_command(workdir, f"--config.dataset=npz:{data}"))
    before = _files(workdir)
    x_train[0, 0, 0] ^= 1  # same path, shapes and dtypes
    np.savez(data, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    second = _finish(_command(workdir, f"--config.dataset=npz:{data}"))
    return {"first": first, "second": second, "unchanged": before == _files(workdir), "data": data}


@pytest.fixture(scope="module")
def reference(cli):
    return cli["reference"]


@pytest.fixture(scope="module")
def cli(tmp_path_factory):
    """Every run.py scenario's outcome. The runs share a persistent compilation cache, filled by the
    reference run before the others start."""
    d = tmp_path_factory.mktemp("cli")
    ENV.update(JAX_COMPILATION_CACHE_DIR=str(d / "jax-cache"), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    results = {}
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        reference = pool.submit(_finish, _command(d / "reference"))
        code, _, err = reference.result()
        assert code == 0, err
        results["reference"] = d / "reference"
        jobs = {"busy": (_busy_workdir_sigint_then_sigterm_in_final_phase, d), "startup": (_sigterm_at_startup, d),
                "fsize": (_file_size_limit, d, results["reference"]), "data": (_other_data, d)}
        jobs.update({f"metrics:{name}": (_damaged_metrics, d, results["reference"], name) for name in METRICS_DAMAGE})
        futures = {name: pool.submit(*job) for name, job in jobs.items()}
        results.update({name: f.exception() or f.result() for name, f in futures.items()})
    return results


def _outcome(cli, name, *keys):
    """A scenario's outcome (or the part of it named by ``keys``); a scenario that failed raises here."""
    result = cli[name]
    for key in keys:
        if isinstance(result, dict) and key not in result and "error" in result:
            raise result["error"]
        result = result[key]
    if isinstance(result, Exception):
        raise result
    return result


@pytest.fixture(scope="module")
def config_file_runs(tmp_path_factory):
    """name -> (exit code, stderr) of run.py with each broken config file."""
    d = tmp_path_factory.mktemp("config-files")
    commands = []
    for name, (content, _) in CONFIG_FILES.items():
        (d / f"{name}.py").write_text(content)
        commands.append(["--config", str(d / f"{name}.py"), "--workdir", str(d / "unused"), *ARGS])
    p = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "forked_run_py.py")], input=json.dumps(commands),
                       cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT)
    assert p.returncode == 0, p.stderr[-3000:]
    return {name: tuple(result) for name, result in zip(CONFIG_FILES, json.loads(p.stdout))}


@pytest.mark.parametrize("name", list(CONFIG_FILES))
def test_broken_config_file_gives_one_line_naming_it_and_the_error(config_file_runs, name):
    code, stderr = config_file_runs[name]
    line = _one_line(stderr, "error: config file ")
    assert code == 2, stderr
    assert f"{name}.py" in line and "allowed" in line, line
    for text in CONFIG_FILES[name][1]:
        assert text in line, f"{text!r} not in {line!r}"


@pytest.mark.slow
def test_second_run_in_a_busy_workdir_is_refused_and_changes_nothing(cli):
    busy = cli["busy"]
    code, _, stderr = _outcome(cli, "busy", "b")
    line = _one_line(stderr, "error: ")
    assert code == 2, stderr
    assert str(busy["workdir"]) in line and f"pid {busy['pid']}" in line and "in use" in line, line
    assert busy["unchanged"]
    steps = [r["step"] for r in run_metrics(busy["workdir"])]
    assert steps == sorted(set(steps)), steps  # no step logged twice


@pytest.mark.slow
def test_sigint_checkpoints_and_exits_130_with_one_line(cli):
    code, out, err = _outcome(cli, "busy", "a")
    assert code == 130, err
    line = _one_line(err, "interrupted: SIGINT at step")
    assert "checkpoint saved" in line and "run the same command" in line, line
    assert f"SIGINT at step {cli['busy']['interrupted_at']}: checkpoint saved" in line, line
    assert 10 <= cli["busy"]["interrupted_at"] < NUM_STEPS and not out.strip()


@pytest.mark.slow
def test_sigterm_in_the_final_phase_exits_cleanly_and_a_rerun_finishes(cli, reference):
    code, out, err = _outcome(cli, "busy", "final_phase")
    assert code == 0, err
    if "rerun" in cli["busy"]:  # stopped before the ticket was written
        line = _one_line(err, "preempted: SIGTERM")
        assert "run the same command" in line, line
        code, out, err = cli["busy"]["rerun"]
        assert code == 0, err
    assert json.loads(out.strip().splitlines()[-1])["num_steps"] == NUM_STEPS and not _without_landing(err).strip(), err
    assert_same_ticket(cli["busy"]["workdir"], reference)


@pytest.mark.slow
def test_sigterm_during_startup_exits_cleanly_with_one_line(cli):
    code, out, err, workdir = _outcome(cli, "startup")
    assert code == 0, err
    line = _one_line(err, "preempted: SIGTERM during start-up")
    assert "run the same command" in line, line
    assert not out.strip() and not checkpoint_steps(workdir) and not (workdir / "metrics.jsonl").exists()


@pytest.mark.slow
def test_file_size_limit_gives_one_line_naming_the_path_and_what_was_kept(cli, reference):
    fsize = _outcome(cli, "fsize")
    code, _, err = fsize["limited"]
    line = _one_line(err, "error: cannot write")
    assert code == 4, err
    assert str(fsize["workdir"] / "checkpoints") in line and "File too large" in line, line
    assert f"kept: the checkpoint(s) of step {EVERY} in" in line, line
    assert fsize["kept"] == [EVERY]
    code, _, err = fsize["rerun"]  # the disk has room again: nothing was lost
    assert code == 0, err
    assert_same_ticket(fsize["workdir"], reference)


@pytest.mark.slow
def test_other_data_under_the_same_workdir_is_refused_and_nothing_written(cli):
    data = _outcome(cli, "data")
    assert data["first"][0] == 0, data["first"][2]
    code, _, err = data["second"]
    line = _one_line(err, "error: ")
    assert code == 2, err
    assert f"npz:{data['data']}" in line and "other data" in line, line
    assert data["unchanged"]


@pytest.mark.slow
@pytest.mark.parametrize("name", list(METRICS_DAMAGE))
def test_damaged_metrics_are_repaired_with_a_warning(cli, reference, name):
    """Resumed at step 20: intact records up to 20 are kept, 30 and 40 are logged again; what is lost is said."""
    code, _, err, workdir = _outcome(cli, f"metrics:{name}")
    assert code == 0, err
    lines = _without_landing(err).strip().splitlines()
    assert len(lines) == 1 and str(workdir / "metrics.jsonl") in lines[0], err
    for text in METRICS_DAMAGE[name][2]:
        assert text in lines[0], lines[0]
    assert_same_ticket(workdir, reference, drop_steps=METRICS_DAMAGE[name][1])


# ---- in-process: resume faults ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished run of ``_config()`` with its checkpoints, in-process."""
    workdir = tmp_path_factory.mktemp("finished")
    train_and_evaluate(_config(), str(workdir))
    return workdir


def test_io_error_while_resuming_stops_and_touches_nothing(finished_run, tmp_path, monkeypatch):
    """A transient read error is not corruption: no checkpoint may be set aside or deleted for it."""
    workdir = tmp_path / "run"
    shutil.copytree(finished_run, workdir)
    before = _files(workdir)
    restore = ocp.CheckpointManager.restore

    def failing_restore(self, step, *args, **kwargs):
        if "state" in kwargs.get("args", {}).keys():  # the fingerprint reads fine, the state does not
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return restore(self, step, *args, **kwargs)

    monkeypatch.setattr(ocp.CheckpointManager, "restore", failing_restore)
    with pytest.raises(StorageError) as e:
        train_and_evaluate(_config(), str(workdir))
    message = str(e.value)
    assert "\n" not in message and f"checkpoint {NUM_STEPS}" in message and "Input/output error" in message, message
    assert "without changing anything" in message, message
    assert _files(workdir) == before
    assert not (tmp_path / "run" / "checkpoints.corrupt").exists()
