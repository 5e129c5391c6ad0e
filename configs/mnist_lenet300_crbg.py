"""CRBG, one gate per weight, LeNet-300-100 on MNIST (validation split carved from the training set).

    python run.py --config configs/mnist_lenet300_crbg.py \
        --config.dataset=npz:../shared/data/mnist_train.npz --workdir runs/mnist_crbg
"""
from configs import default


def get_config():
    c = default.get_config()
    c.model = "lenet300"
    c.dataset = "npz:../shared/data/mnist_train.npz"
    c.sparsity = 0.9
    c.batch_size = 128
    c.num_epochs = 20
    c.learning_rate = 0.05
    c.logit_scale = 5.0  # the loss's temperature; a 90%-sparse LeNet's logits are tiny
    c.eval_every = 1000
    c.log_every = 50
    c.checkpoint_every = 1000
    return c
