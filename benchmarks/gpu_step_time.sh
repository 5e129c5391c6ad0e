#!/usr/bin/env bash
# The GPU benchmark as one command on a lent machine (no network there: jax, flax, optax, orbax and
# ml_collections must already be installed). Prints the card, JAX's version and devices, then one
# JSON line of median step times per model group (images/s = batch / ms * 1000).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python -c "import jax; print('jax', jax.__version__, jax.devices())"
python benchmarks/step_time.py --json --models lenet300,conv4 --batch 128 --reps 100
python benchmarks/step_time.py --json --models resnet50 --batch 256 --reps 30
