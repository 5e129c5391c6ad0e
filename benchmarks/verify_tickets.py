"""Independent check of tickets on the validation split they were tuned on.

    python benchmarks/verify_tickets.py --config configs/mnist_lenet300_crbg.py \
        --config.dataset=npz:PATH/mnist_train.npz runs/mnist_lenet300_crbg/ticket [TICKET ...]

Writes the config's validation split (raw images, as the dataset stores them) to an npz and runs
tests/independent_verifier.py on every ticket: it checks the ticket is a true SLT (every weight
its regenerated initial value or exactly 0, the mask binary and as recorded) and recomputes
sparsity from the mask and accuracy with its own numpy forward pass (MLPs and ConvNets; it
refuses other models in one line).
"""
import os
import subprocess
import sys
import tempfile

import numpy as np
from absl import app
from ml_collections import config_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
VERIFIER = os.path.join(ROOT, "tests", "independent_verifier.py")
_CONFIG = config_flags.DEFINE_config_file("config", os.path.join(ROOT, "configs/default.py"), "run config")


def main(argv) -> None:
    from slt_jax.data import load_dataset

    data = load_dataset(_CONFIG.value)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "val.npz")
        np.savez(path, x_val=data.x_val, y_val=data.y_val)
        for ticket in argv[1:]:
            out = subprocess.run([sys.executable, VERIFIER, ticket, path, "--x", "x_val", "--y", "y_val"],
                                 capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ROOT})
            print(ticket, out.stdout.strip() or out.stderr.strip().splitlines()[-1])
            if out.returncode:
                sys.exit(out.returncode)


if __name__ == "__main__":
    app.run(main)
