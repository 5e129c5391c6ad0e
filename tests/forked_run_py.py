"""Runs ``run.py`` once per command line, each in its own process, without paying for the imports each time.

Used by tests that run the real CLI many times and only need each run's exit status and stderr
(tests/test_bad_input.py). A fresh ``python run.py`` spends seconds importing JAX, Flax and the
rest before it parses a flag; this process imports them once, then forks one child per command
line. The child is a new process like any other: ``sys.argv`` is the command line, ``run.py`` runs
as ``__main__`` (its flags, its signal handlers, its ``sys.exit``), its stderr goes to a pipe and
its exit status is its own. The parent never initialises a JAX backend, so no XLA thread exists
when it forks.

    python tests/forked_run_py.py < commands.json > results.json

stdin: a JSON list of argument lists (without ``run.py``); stdout: a JSON list of
``[exit status, stderr]``, in order. A child that runs past ``--timeout`` seconds is killed by
SIGALRM (exit status -14).
"""
import argparse
import json
import os
import runpy
import sys
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _child(args: list[str], stderr_fd: int, timeout: int) -> None:
    """In the forked child: run.py with ``args``; never returns."""
    import signal

    code = 1
    try:
        signal.alarm(timeout)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(stderr_fd, 2)
        sys.argv = ["run.py", *args]
        runpy.run_path(os.path.join(ROOT, "run.py"), run_name="__main__")
        code = 0
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            code = e.code or 0
        else:  # sys.exit("message"): Python prints it and exits 1
            print(e.code, file=sys.stderr)
    except BaseException:  # noqa: BLE001 - as the interpreter would: the traceback, exit status 1
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def run_all(commands: list[list[str]], timeout: int) -> list[tuple[int, str]]:
    """Each command line's (exit status, stderr), one forked child at a time."""
    results = []
    for args in commands:
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read)
            _child(args, write, timeout)
        os.close(write)
        with os.fdopen(read, "r", errors="replace") as f:
            stderr = f.read()
        _, status = os.waitpid(pid, 0)
        results.append((os.waitstatus_to_exitcode(status), stderr))
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--timeout", type=int, default=120, help="seconds each child may run")
    timeout = ap.parse_args().timeout
    commands = json.load(sys.stdin)
    os.chdir(ROOT)
    sys.path[0] = ROOT  # as for `python run.py`: the script's folder, not tests/
    # What run.py imports before it parses a flag, and what a failing run reaches before it stops.
    import absl.app  # noqa: F401
    import ml_collections.config_flags  # noqa: F401
    import sklearn.datasets  # noqa: F401

    import slt_jax.cli  # noqa: F401
    import slt_jax.data  # noqa: F401
    json.dump(run_all(commands, timeout), sys.stdout)


if __name__ == "__main__":
    main()
