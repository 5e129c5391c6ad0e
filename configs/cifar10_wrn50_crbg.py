"""CRBG on Wide-ResNet-50-2 (CIFAR stem, non-affine BatchNorm), CIFAR-10.

Recipe: edge-popup's CIFAR-10 schedule (cosine over 100 epochs, batch 128, 4-pixel pad-crop + flip)
with CRBG's optimiser, Adam lr 0.01 on the gates; the sparsity target is met by dual ascent.

Target: the paper: 88% at 90.5% sparsity.
Result: not yet measured (needs a GPU and the prepared dataset).

Prepare cifar10 once (see slt_jax.data.tfds_source), then::

    TFDS_DATA_DIR=DIR python run.py --config configs/cifar10_wrn50_crbg.py

Smoke test (any machine, a few seconds to a minute)::

    python run.py --config configs/cifar10_wrn50_crbg.py --config.dataset=synthetic --config.num_steps=2 --config.batch_size=8
"""
import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
    c = default.get_config()
    c.model = "wrn50_2"
    c.method = "crbg"
    c.dataset = "tfds:cifar10"
    c.sparsity = 0.905
    c.batch_size = 128
    c.num_epochs = 100
    c.lr_schedule = "cosine"
    c.learning_rate = 0.01
    c.augment = "cifar"
    c.synthetic_shape = (32, 32, 3)
    c.eval_batch_size = 500
    c.log_every = 100
    c.eval_every = 1750  # ~5 epochs
    c.checkpoint_every = 1750
    return c
