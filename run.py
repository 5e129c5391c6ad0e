"""Find a strong lottery ticket: flags -> config -> train_and_evaluate -> one JSON line.

    python run.py                                       # CRBG on the embedded digits
    python run.py --config configs/X.py --workdir DIR --config.sparsity=0.9
"""
import sys

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", "configs/default.py", "ml_collections config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (default: runs/MODEL-METHOD-CONFIGHASH).")


def main(argv) -> None:
    del argv
    absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs every save at INFO
    from slt_jax import cli

    sys.exit(cli.run(_CONFIG.value, _WORKDIR.value))


if __name__ == "__main__":
    app.run(main)
