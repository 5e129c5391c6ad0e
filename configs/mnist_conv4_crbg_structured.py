"""CRBG with one gate per conv channel (structured), Conv4 x0.5 on MNIST: a ticket that compiles to
a smaller dense Conv4 that runs faster on the CPU.

    python run.py --config configs/mnist_conv4_crbg_structured.py --config.dataset=mnist \
        --workdir runs/mnist_conv4_crbg_structured
    python benchmarks/compaction.py runs/mnist_conv4_crbg_structured/ticket --multiple 8

Conv4 x0.5 (convs 32, 32, 64, 64; FC 128, 128; 483,872 weights, no biases) on MNIST (28x28x1;
validation is 10% carved from the training set), 1 epoch (421 steps at batch 128), target 50%
sparsity, seed 0: about 3-4 minutes on a 2-core CPU. ``benchmarks/mnist_conv4_structured.py``
runs it beside unstructured CRBG and edge-popup and measures the compacted ticket's speed.

Which layers are gated, and how (the recipe):

* the four convs: one gate per output channel (a closed channel takes its 3x3 filters and, in the
  compact model, the next layer's inputs from it);
* Dense_1: one gate per unit; the classifier Dense_2: one gate per weight, since closing a class
  unit would delete the class (as configs/mnist_lenet300_crbg_structured.py);
* Dense_0 (3,136 -> 128): no gates of its own. It holds 83% of the weights but 2% of the
  multiply-accumulates; with a gate per unit, CRBG meets a weight budget most cheaply there (one
  unit is 3,136 weights, one Conv_3 channel 576), which leaves the convs, where the time goes,
  nearly whole. Ungated, its rows still go with the Conv_3 channels they read (49 rows per closed
  channel), so the target pushes the convs, and the weights removed from Dense_0 count in the
  compacted network's size. The harness's ``sparsity`` counts the gated weights only, so the
  honest figure is the compacted network's weights over the 483,872 built
  (``benchmarks/mnist_conv4_structured.py`` reports both).

``logit_scale`` (the loss's temperature) is sized to the target density: the zoo's 1000 was set for
a 10% ticket, whose logits are about 0.1^(7/2) of the dense net's (7 gated layers, ReLU, no
normalisation: each layer scales them by about the square root of its density); at 50% they are
280x larger, and with 1000 CRBG's cheapest way to lower the cross-entropy was to close every
channel of the first two convs (10% validation accuracy). ``logit_scale(s)`` keeps
1000 * 0.1^(7/2) / (1 - s)^(7/2): 1000 at 0.9, 21 at 0.7, 3.6 at 0.5. CRBG's integral gain
``dual_lr`` is scaled to the budget as in configs/mnist_zoo.py.

The published figures were measured on ``npz:`` arrays of the MNIST training set (``x_train``,
``y_train``: 60,000 images; validation carved from it, the test set unused); pass such arrays with
``--config.dataset=npz:PATH`` to measure on the same footing. With ``mnist`` (TFDS) the training
images are the same 60,000, but the validation split drawn from them differs, and the run also
reports TFDS's test split.
"""
from __future__ import annotations

import ml_collections

from configs import mnist_zoo

ZOO_SCALE, ZOO_DENSITY, GATED_LAYERS = 1000.0, 0.1, 7  # configs/mnist_zoo.py: Conv4's logit_scale, for a 10% ticket


def logit_scale(sparsity: float) -> float:
    """The loss temperature for a Conv4 ticket of this sparsity: the zoo's 1000 at 0.9, scaled by the
    logits' shrinkage, (density / 0.1)^(-7/2)."""
    return ZOO_SCALE * (ZOO_DENSITY / (1.0 - sparsity)) ** (GATED_LAYERS / 2)


def dual_lr(num_epochs: int) -> float:
    """CRBG's integral gain for a budget of ``num_epochs``: dual_lr * steps of the 20-epoch LeNet recipe
    (0.05 * 8,420), as configs/mnist_zoo.py scales it."""
    return 0.05 * 8420 / (num_epochs * mnist_zoo.STEPS_PER_EPOCH)


def get_config() -> ml_collections.ConfigDict:
    c = mnist_zoo.get_config("conv4,crbg")
    c.sparsity = 0.5
    c.num_epochs = 1
    c.logit_scale = logit_scale(c.sparsity)
    c.crbg.dual_lr = dual_lr(c.num_epochs)
    c.structured = True
    c.gate_policy = r"^(Conv_\d+|Dense_[12])/kernel$"
    c.structured_policy = r"^(Conv_\d+|Dense_1)/kernel$"
    return c
