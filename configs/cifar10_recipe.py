"""CIFAR-10 recipe shared by the cifar10_* configs: edge-popup's schedule (cosine over 100 epochs,
batch 128, 4-pixel pad-crop + flip) on a prepared cifar10 (TFDS), with CRBG's optimiser (Adam lr
0.01 on the gates). Each experiment's config sets its model, method and sparsity on top.
"""
import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
    c = default.get_config()
    c.method = "crbg"
    c.dataset = "cifar10"
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
