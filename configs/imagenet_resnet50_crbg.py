"""CRBG on ResNet-50 (ImageNet stem, non-affine BatchNorm), ImageNet (ILSVRC-2012).

Recipe: edge-popup's ImageNet schedule (cosine over 100 epochs, batch 256, label smoothing 0.1,
random-resized crop + flip) with CRBG's optimiser, Adam lr 0.01 on the gates (gates must travel
~0.5; SGD's 0.256 suits scores, not gate means).

Target: beat edge-popup's ResNet-50: 68.6% top-1 at 30% kept (70% sparsity).
Result: not yet measured (needs a GPU and the prepared dataset).

Prepare imagenet2012 once (see slt_jax.data.tfds_source), then::

    TFDS_DATA_DIR=DIR python run.py --config configs/imagenet_resnet50_crbg.py

Smoke test (any machine, a few seconds to a minute)::

    python run.py --config configs/imagenet_resnet50_crbg.py --config.dataset=synthetic --config.num_steps=2 --config.batch_size=8
"""
import ml_collections

from configs import imagenet_recipe


def get_config() -> ml_collections.ConfigDict:
    c = imagenet_recipe.get_config()
    c.model = "resnet50_imagenet"
    return c
