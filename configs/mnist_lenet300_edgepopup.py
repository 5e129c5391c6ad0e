"""Edge-popup (the baseline), LeNet-300-100 on MNIST, same data, budget and evaluation as CRBG.

    python run.py --config configs/mnist_lenet300_edgepopup.py \
        --config.dataset=npz:../shared/data/mnist_train.npz --workdir runs/mnist_edgepopup

Reference recipe (GUIDE section 2): SGD, momentum 0.9, weight decay 1e-4 on the scores, cosine
learning rate, top-k per layer (``--config.edgepopup.scope=global`` for one k over all layers).
"""
from configs import mnist_lenet300_crbg


def get_config():
    c = mnist_lenet300_crbg.get_config()
    c.method = "edgepopup"
    c.sparsity = 0.5
    c.learning_rate = 0.1
    c.lr_schedule = "cosine"
    return c
