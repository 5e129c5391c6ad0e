"""edge-popup on Wide-ResNet-50-2 (ImageNet stem), ImageNet: the reference recipe.

Recipe (edge-popup, ImageNet): SGD lr 0.256, momentum 0.875, weight decay 3.05e-05, cosine over 100
epochs, batch 256, label smoothing 0.1. Its 5 warm-up epochs are not applied: the methods'
optimisers take no warm-up yet.

Target: edge-popup's 73.3% top-1 at 30% kept (70% sparsity), signed Kaiming constant weights.
Result: not yet measured (needs a GPU and the prepared dataset).

Prepare imagenet2012 once (see slt_jax.data.tfds_source), then::

    TFDS_DATA_DIR=DIR python run.py --config configs/imagenet_wrn50_edgepopup.py

Smoke test (any machine, a few seconds to a minute)::

    python run.py --config configs/imagenet_wrn50_edgepopup.py --config.dataset=synthetic --config.num_steps=2 --config.batch_size=8
"""
import ml_collections

from configs import imagenet_recipe


def get_config() -> ml_collections.ConfigDict:
    c = imagenet_recipe.get_config()
    c.model = "wrn50_2_imagenet"
    c.method = "edgepopup"
    c.learning_rate = 0.256
    c.edgepopup.momentum = 0.875
    c.edgepopup.weight_decay = 3.05e-05
    return c
