"""ImageNet recipe shared by the imagenet_* configs: edge-popup's schedule (cosine over 100
epochs after 5 warm-up epochs, batch 256, label smoothing 0.1, random-resized crop + flip) on a prepared
imagenet2012 (TFDS), with CRBG's optimiser (Adam lr 0.01 on the gates). Each experiment's config sets
its model, method and sparsity on top.
"""
import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
    c = default.get_config()
    c.method = "crbg"
    c.dataset = "imagenet2012"
    c.sparsity = 0.7
    c.batch_size = 256
    c.num_epochs = 100
    c.lr_schedule = "cosine"
    c.learning_rate = 0.01
    c.warmup_epochs = 5.0
    c.label_smoothing = 0.1
    c.augment = "imagenet"
    c.val_fraction = 0.01  # 12,811 held-out training images; test = the official validation set
    c.synthetic_shape = (224, 224, 3)
    c.eval_batch_size = 250
    c.log_every = 100
    c.eval_every = 5000
    c.checkpoint_every = 2500
    return c
