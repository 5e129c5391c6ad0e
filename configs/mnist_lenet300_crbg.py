"""CRBG, one gate per weight, LeNet-300-100 on MNIST (validation split carved from the training set).

    python run.py --config configs/mnist_lenet300_crbg.py --config.dataset=mnist --workdir runs/mnist_crbg

The published figures were measured on ``npz:`` arrays of the MNIST training set (``x_train``,
``y_train``: 60,000 images; validation carved from it, the test set unused); pass such arrays with
``--config.dataset=npz:PATH`` to measure on the same footing. With ``mnist`` (TFDS) the training
images are the same 60,000, but the validation split drawn from them differs, and the run also
reports TFDS's test split.
"""
from configs import default


def get_config():
    c = default.get_config()
    c.model = "lenet300"
    c.dataset = "mnist"
    c.sparsity = 0.9
    c.batch_size = 128
    c.num_epochs = 20
    c.learning_rate = 0.05
    c.logit_scale = 5.0  # the loss's temperature; a 90%-sparse LeNet's logits are tiny
    c.eval_every = 1000
    c.log_every = 50
    c.checkpoint_every = 1000
    return c
