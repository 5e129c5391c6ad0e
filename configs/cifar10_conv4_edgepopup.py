"""edge-popup on Conv4, CIFAR-10: the reference recipe (Ramanujan et al. 2020).

Recipe (edge-popup, CIFAR-10): SGD lr 0.1, momentum 0.9, weight decay 0.0001, cosine over 100
epochs, batch 128, 4-pixel pad-crop + flip.

Target: edge-popup's curve: about 86% top-1 at its best k (30-70% kept).
Result: not yet measured (needs a GPU and the prepared dataset).

Prepare cifar10 once (see slt_jax.data.tfds_source), then::

    TFDS_DATA_DIR=DIR python run.py --config configs/cifar10_conv4_edgepopup.py

Smoke test (any machine, a few seconds to a minute)::

    python run.py --config configs/cifar10_conv4_edgepopup.py --config.dataset=synthetic --config.num_steps=2 --config.batch_size=8
"""
import ml_collections

from configs import cifar10_recipe


def get_config() -> ml_collections.ConfigDict:
    c = cifar10_recipe.get_config()
    c.model = "conv4"
    c.method = "edgepopup"
    c.sparsity = 0.5
    c.learning_rate = 0.1
    c.edgepopup.momentum = 0.9
    c.edgepopup.weight_decay = 0.0001
    return c
