"""Find a strong lottery ticket: flags -> config -> train_and_evaluate -> one JSON line.

    python run.py                                       # CRBG on the embedded digits
    python run.py --config configs/X.py --workdir DIR --config.sparsity=0.9
"""
import logging
import sys

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from slt_jax import cli


def _bad_flags(message: str) -> None:
    """absl and ml_collections report bad flags with tracebacks; the CLI promises one line."""
    sys.exit(cli.fail(message, cli.EXIT_BAD_INPUT))


def _define_config_flag():
    try:
        return config_flags.DEFINE_config_file("config", "configs/default.py", "ml_collections config file.",
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


_CONFIG = _define_config_flag()
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (default: runs/MODEL-METHOD-CONFIGHASH).")


def _parse_flags(argv: list[str]) -> list[str]:
    try:
        rest = flags.FLAGS(argv)
        _CONFIG.value.get("model")  # ml_collections defers a config file's load error to its first use
    except flags.Error as e:
        _bad_flags(str(e).splitlines()[0])
    except OSError as e:
        reason = str(e).strip().splitlines()[-1].strip()  # e.g. [Errno 2] No such file or directory: 'PATH'
        _bad_flags(f"config file cannot be loaded ({reason}); allowed: a path to an ml_collections config file "
                   "such as configs/default.py")
    return rest


def main(argv) -> None:
    del argv
    absl_logging.set_verbosity(absl_logging.ERROR)  # orbax and tfds log routine events through absl...
    logging.getLogger("slt_jax").setLevel(logging.WARNING)  # ...but ours, e.g. a skipped corrupt checkpoint, must show
    sys.exit(cli.run(_CONFIG.value, _WORKDIR.value))


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
