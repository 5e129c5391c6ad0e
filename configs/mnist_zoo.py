"""The zoo on MNIST: Conv4, ResNet-18, ViT-Tiny or Swin-T, CRBG or edge-popup, target sparsity 0.9.

The argument after the colon is "MODEL,METHOD" (MODEL: conv4, resnet18, vit_tiny, swin_t; METHOD:
crbg, edgepopup)::

    python run.py --config configs/mnist_zoo.py:conv4,crbg --config.dataset=mnist --workdir runs/mnist_zoo/conv4-crbg

``python benchmarks/mnist_zoo.py`` runs all eight and writes the table. MNIST 28x28x1; validation is
10% carved from the 60,000 training images (54,000 left for training, 421 steps per epoch at
batch 128).

The published figures (benchmarks/results/mnist_zoo) were measured on ``npz:`` arrays of the MNIST
training set (``x_train``, ``y_train``: 60,000 images; validation carved from it, the test set
unused); pass such arrays with ``--config.dataset=npz:PATH`` to measure on the same footing. With
``mnist`` (TFDS) the training images are the same 60,000, but the validation split drawn from them
differs, and the run also reports TFDS's test split.

Budget: the six runs were sized to fit about 50 minutes of wall time together (they took about
40) on a 2-core CPU shared with other jobs, where a step took (calibration, 30-150 step runs under that load):
Conv4 x1 ~900 ms, Conv4 x0.5 ~430-500 ms, ResNet-18 x0.25 ~650-700 ms, ViT-Tiny x1 ~4,400 ms,
ViT-Tiny x0.25 ~940 ms. Hence every model is width-scaled (``width`` multiplies every channel
count / hidden size; depth and layout unchanged):

* Conv4 x0.5 (convs 32, 32, 64, 64; FC 128, 128), 2 epochs;
* ResNet-18 x0.25 (stages 16, 32, 64, 128 channels, CIFAR stem), 1 epoch;
* ViT-Tiny x0.25 (hidden 48, 3 heads, MLP 192, 12 blocks, patch 4), 1 epoch;
* Swin-T x0.25 (stages 24, 48, 96, 192 channels with 3, 6, 12, 24 heads, depths 2, 2, 6, 2;
  patch 2, window 4: 14, 7, 4, 2 tokens a side, 28x28 padded as ``slt_jax.models.swin`` says),
  1 epoch. Added after the six and sized the same way: ~720 ms a step in a 30-step run under
  load 6-8, ~520 ms in 100-step runs under load 5; the two 1-epoch runs then trained in about 6
  minutes each (825-852 ms a step, compilation included, under load 6-8).
  The heads must divide every stage's channels: widths with int(96 * width) a multiple of 3
  (x0.125, x0.25, x0.5; not x0.2).

CRBG and edge-popup of one model share everything but their own recipes (CRBG: Adam 0.05 on the
gates, constant; edge-popup: SGD 0.1, momentum 0.9, weight decay 1e-4, cosine, per-layer top-k):
same epochs, batch 128, seed 0, loss and ``logit_scale``.

CRBG's multiplier needs steps to reach its target: with the recipe's integral gain
(``crbg.dual_lr=0.05``, sized for thousands of steps) Conv4 ended its 842 steps at 80.3%
sparsity (``--config.crbg.dual_lr=0.05``), so ``dual_lr`` is scaled to the budget:
``dual_lr * num_steps = 0.05 * 8,420``, the 20-epoch LeNet run's (0.5 for 2 epochs, 1.0 for 1).

The loss temperature ``logit_scale`` is what the architectures needed to learn as tickets at all
(checked with edge-popup, whose first mask is a random 10%; append ``--config.num_steps=N`` and
the ``--config.logit_scale`` shown to the command above):

* Conv4: 7 gated layers, ReLU, no normalisation, no biases: keeping 10% of the weights shrinks
  the logits by about sqrt(0.1) per layer, ~3e-4 of the dense scale. At ``logit_scale=5`` the
  loss stays at 2.30 (val 33% after 150 steps); at 1000 it learns (val 82% after 100 steps).
* ResNet-18: BatchNorm restores the scale after every convolution; the LeNet value 5 learns
  (val 76% after 100 steps).
* ViT-Tiny: the LayerNorm before the head restores the scale, and at 5 the random ticket's
  logits start confident (training loss ~6 in the first steps, against ln 10 = 2.3 for a uniform
  guess) and it stays at chance (val 9.7% after 150 steps); at 1 it learns, slowly (val 29%
  after 150 steps).
* Swin-T: a LayerNorm before the head too, and the same picture: at 5 the first steps' loss is
  ~11 and it is at chance after 100 steps (val 9.9%); at 1 it learns (loss 0.67 and val 79.5%
  after 100 steps).

ResNet-18's BatchNorm statistics are averaged over training steps; for CRBG those steps use noisy
gates, not the ticket, so ``benchmarks/mnist_zoo.py`` also reports the ticket with statistics
recomputed on the binary ticket.
"""
from __future__ import annotations

import ml_collections

from configs import default

METHODS = ("crbg", "edgepopup")
STEPS_PER_EPOCH = 421  # 54,000 training images (10% of 60,000 carved off for validation) at batch 128
# Per model: width multiplier, epochs, batch size and loss temperature (the same for both methods).
MODELS: dict[str, dict[str, float | int]] = {
    "conv4": {"width": 0.5, "num_epochs": 2, "batch_size": 128, "logit_scale": 1000.0},
    "resnet18": {"width": 0.25, "num_epochs": 1, "batch_size": 128, "logit_scale": 5.0},
    "vit_tiny": {"width": 0.25, "num_epochs": 1, "batch_size": 128, "logit_scale": 1.0},
    "swin_t": {"width": 0.25, "num_epochs": 1, "batch_size": 128, "logit_scale": 1.0},
}


def budget_dual_lr(num_epochs: int) -> float:
    """CRBG's multiplier gain for ``num_epochs``: dual_lr * num_steps that of the 20-epoch LeNet recipe
    (0.05 * 8,420 steps); at the recipe's 0.05, Conv4's 842 steps ended at 80.3%."""
    return 0.05 * 8420 / (num_epochs * STEPS_PER_EPOCH)


def get_config(arg: str = "conv4,crbg") -> ml_collections.ConfigDict:
    """The run of ``arg`` = "MODEL,METHOD"; a ValueError names a bad value and what is allowed."""
    parts = arg.split(",")
    if len(parts) != 2:
        raise ValueError(f"config argument {arg!r} is not MODEL,METHOD; allowed: MODEL in {', '.join(MODELS)}, "
                         f"METHOD in {', '.join(METHODS)}, e.g. configs/mnist_zoo.py:conv4,crbg")
    model, method = (p.strip() for p in parts)
    if model not in MODELS:
        raise ValueError(f"unknown model {model!r} in config argument {arg!r}; allowed: {', '.join(MODELS)}")
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r} in config argument {arg!r}; allowed: {', '.join(METHODS)}")
    c = default.get_config()
    c.model, c.method = model, method
    c.dataset = "mnist"
    c.sparsity = 0.9
    c.seed = 0
    c.width = MODELS[model]["width"]
    c.num_epochs = int(MODELS[model]["num_epochs"])
    c.batch_size = int(MODELS[model]["batch_size"])
    c.logit_scale = MODELS[model]["logit_scale"]
    c.crbg.dual_lr = budget_dual_lr(c.num_epochs)
    c.log_every = 25
    c.eval_every = 100_000  # evaluate once, after the last step (evaluations are slow on this CPU)
    c.checkpoint_every = STEPS_PER_EPOCH  # an interrupted run resumes from its last epoch
    return c
