"""Find a strong lottery ticket: flags -> config -> train_and_evaluate -> one JSON line.

    python run.py                                       # CRBG on the embedded digits
    python run.py --config configs/X.py --workdir DIR --config.sparsity=0.9
"""
import signal


class _PendingSignal:
    """SIGTERM or SIGINT during start-up (imports, flag parsing) is remembered, not fatal: the run's own
    handler (slt_jax.checkpoint.PreemptionFlag) takes it over and stops cleanly with one line."""

    signum = None

    def __call__(self, signum, frame):
        self.signum = self.signum or signum


for _s in (signal.SIGTERM, signal.SIGINT):
    signal.signal(_s, _PendingSignal())  # one instance per signal is fine: either one's signum is taken over
del _s

import logging  # noqa: E402
import sys  # noqa: E402

from absl import app, flags  # noqa: E402
from absl import logging as absl_logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from slt_jax import cli  # noqa: E402


def _bad_flags(message: str) -> None:
    """absl and ml_collections report bad flags with tracebacks; the CLI promises one line."""
    sys.exit(cli.fail(message, cli.EXIT_BAD_INPUT))


class _ConfigFileError(Exception):
    """A config file that cannot be loaded: raised past absl, which would keep only the first line."""

    def __init__(self, path: str, reason: str):
        super().__init__(reason)
        self.path, self.reason = path, reason


def _reason(error: BaseException) -> str:
    if isinstance(error, AttributeError) and getattr(error, "name", None) == "get_config":
        return "it defines no get_config()"
    if isinstance(error, SyntaxError):
        return f"SyntaxError: {error.msg} (line {error.lineno})"
    return f"{type(error).__name__}: {error}"


def _checked_config_file(parse):
    """Wraps ml_collections' config-file parser: whatever the file raises, or a get_config() that returns
    None, becomes a _ConfigFileError naming the reason in full."""

    def checked(path):
        absl_logger = logging.getLogger("absl")
        level = absl_logger.level
        absl_logger.setLevel(logging.ERROR)  # its warning that get_config() returned None: reported below
        try:
            config = parse(path)
        except Exception as e:  # noqa: BLE001 - the config file is user code: anything it raises is bad input
            # ml_collections re-raises TypeError/ValueError as the same type with a traceback as its text.
            original = e.__context__ if "Error whilst parsing config file" in str(e) and e.__context__ else e
            raise _ConfigFileError(path.split(":", 1)[0], _reason(original)) from None
        finally:
            absl_logger.setLevel(level)
        if config is None:
            raise _ConfigFileError(path.split(":", 1)[0], "get_config() returned None")
        return config

    return checked


def _define_config_flag():
    try:
        holder = config_flags.DEFINE_config_file("config", "configs/default.py", "ml_collections config file.",
                                                 lock_config=True)
    except (AttributeError, KeyError) as e:  # ml_collections resolves every --config.KEY when the flag is defined
        message = e.args[0].args[0] if isinstance(e.args[0], KeyError) else str(e.args[0])
        key, *hint = message.split("\n")  # "'KEY'", then maybe 'Did you mean ...'
        names = [a.split("=", 1)[0] for a in sys.argv[1:]]
        flag = next((n for n in names if n.endswith("." + key.strip("'"))), key)
        _bad_flags(f"unknown config key {flag}{'; ' + ' '.join(hint) if hint else ''}; "
                   "allowed: the keys the config file defines (configs/default.py lists them)")
    except flags.Error as e:
        _bad_flags(str(e).splitlines()[0])
    parser = flags.FLAGS["config"].parser
    parser.parse = _checked_config_file(parser.parse)
    return holder


_CONFIG = _define_config_flag()
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (default: runs/MODEL-METHOD-CONFIGHASH).")

_CONFIG_FILE_ALLOWED = "a Python file whose get_config() returns an ml_collections.ConfigDict, such as configs/default.py"


def _parse_flags(argv: list[str]) -> list[str]:
    try:
        rest = flags.FLAGS(argv)
        _CONFIG.value.get("model")  # ml_collections defers a config file's load error to its first use
    except _ConfigFileError as e:
        _bad_flags(f"config file {e.path} cannot be loaded ({e.reason}); allowed: {_CONFIG_FILE_ALLOWED}")
    except flags.Error as e:
        _bad_flags(str(e))
    except OSError as e:
        reason = str(e).strip().splitlines()[-1].strip()  # e.g. [Errno 2] No such file or directory: 'PATH'
        _bad_flags(f"config file cannot be loaded ({reason}); allowed: a path to an ml_collections config file "
                   "such as configs/default.py")
    return rest


def main(argv) -> None:
    del argv
    absl_logging.set_verbosity(absl_logging.ERROR)  # orbax and tfds log routine events through absl...
    logging.getLogger("slt_jax").setLevel(logging.WARNING)  # ...but ours, e.g. a skipped corrupt checkpoint, must show
    code = cli.run(_CONFIG.value, _WORKDIR.value)
    for s in (signal.SIGTERM, signal.SIGINT):  # the run has ended and said so: a signal now must not kill the
        signal.signal(s, signal.SIG_IGN)      # interpreter's shutdown (Python restores SIG_DFL, not SIG_IGN)
    sys.exit(code)


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
