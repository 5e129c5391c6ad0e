"""CRBG on Swin-T (patch 2, window 4 at 32x32), CIFAR-10.

Recipe: edge-popup's CIFAR-10 schedule (cosine over 100 epochs, batch 128, 4-pixel pad-crop + flip)
with CRBG's optimiser, Adam lr 0.01 on the gates; the sparsity target is met by dual ascent.

Target: the paper: 80% at 50% sparsity.
Result: not yet measured (needs a GPU and the prepared dataset).

Prepare cifar10 once (see slt_jax.data.tfds_source), then::

    TFDS_DATA_DIR=DIR python run.py --config configs/cifar10_swin_t_crbg.py

Smoke test (any machine, a few seconds to a minute)::

    python run.py --config configs/cifar10_swin_t_crbg.py --config.dataset=synthetic --config.num_steps=2 --config.batch_size=8
"""
import ml_collections

from configs import cifar10_recipe


def get_config() -> ml_collections.ConfigDict:
    c = cifar10_recipe.get_config()
    c.model = "swin_t"
    c.sparsity = 0.5
    return c
