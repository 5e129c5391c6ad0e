"""CRBG with one gate per unit (structured), LeNet-300-100 on MNIST.

    python run.py --config configs/mnist_lenet300_crbg_structured.py \
        --config.dataset=npz:../shared/data/mnist_train.npz --workdir runs/mnist_crbg_structured

A closed gate removes a hidden unit with all its incoming weights; sparsity counts those. The
classifier's units cannot be removed (closing one would delete a class), so its 1,000 weights keep
one gate each (``structured_policy`` picks the leaves with unit gates), which scores far higher than
leaving the classifier ungated (README, "MNIST, LeNet-300-100"). The ticket compiles to a narrower dense LeNet
(``slt_jax.compaction``; benchmarks/compaction.py).
"""
from configs import mnist_lenet300_crbg


def get_config():
    c = mnist_lenet300_crbg.get_config()
    c.structured = True
    c.structured_policy = r"^Dense_[01]/kernel$"
    c.sparsity = 0.5
    return c
