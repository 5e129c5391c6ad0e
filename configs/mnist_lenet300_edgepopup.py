"""Edge-popup (the baseline), LeNet-300-100 on MNIST, same data, budget and evaluation as CRBG.

    python run.py --config configs/mnist_lenet300_edgepopup.py --config.dataset=mnist --workdir runs/mnist_edgepopup

Reference recipe (GUIDE section 2): SGD, momentum 0.9, weight decay 1e-4 on the scores, cosine
learning rate, top-k per layer (``--config.edgepopup.scope=global`` for one k over all layers).

The published figures were measured on ``npz:`` arrays of the MNIST training set (``x_train``,
``y_train``: 60,000 images; validation carved from it, the test set unused); pass such arrays with
``--config.dataset=npz:PATH`` to measure on the same footing. With ``mnist`` (TFDS) the training
images are the same 60,000, but the validation split drawn from them differs, and the run also
reports TFDS's test split.
"""
from configs import mnist_lenet300_crbg


def get_config():
    c = mnist_lenet300_crbg.get_config()
    c.method = "edgepopup"
    c.sparsity = 0.5
    c.learning_rate = 0.1
    c.lr_schedule = "cosine"
    return c
