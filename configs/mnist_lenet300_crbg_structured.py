"""Structured CRBG on MNIST: pixels and hidden units, LeNet-300-100 built 4x wide (784-1200-400-10).

    python run.py --config configs/mnist_lenet300_crbg_structured.py \
        --config.dataset=npz:../shared/data/mnist_train.npz --workdir runs/mnist_crbg_structured

Input gates (``structured_inputs``): one gate per row of Dense_0 (a pixel) and per row of Dense_1
(a first-layer unit, h = z * relu(W x)); they take precedence over ``structured_policy``, so the
second layer's units stay and the classifier keeps one gate per weight (closing a class unit would
delete a class). Sparsity counts the weights of the network built, 784-1200-400-10 (1,424,800
kernel weights), as closed by the mask; the ticket compiles to a smaller dense LeNet
(``slt_jax.compaction``; its size is in the README beside 784-300-100-10's 266,200 weights).

Why this recipe: ``python benchmarks/lenet_structured.py --recipes all`` (README, "Structured
LeNet-300-100"): unit gates alone reach 69.7% at 78%; input gates on pixels and units 82.5%, with
Adam 0.02 84.1%; building the network 2x / 4x wide and keeping the same fraction gives the gates
more units to choose from: 86.2% / 88.7% (seed 0, 10 epochs).
"""
from configs import mnist_lenet300_crbg


def get_config():
    c = mnist_lenet300_crbg.get_config()
    c.structured = True
    c.structured_inputs = r"^Dense_[01]/kernel$"
    c.structured_policy = r"^Dense_[01]/kernel$"  # only leaves without input gates: none here (see above)
    c.width = 4.0
    c.learning_rate = 0.02
    c.sparsity = 0.8
    c.num_epochs = 10
    return c
