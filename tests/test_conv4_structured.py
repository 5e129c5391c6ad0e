"""configs/mnist_conv4_crbg_structured.py: its gate layout, and a real run of its recipe whose channel
ticket compiles to a narrower Conv4 computing the masked model's logits.

tests/test_compaction.py checks Conv4 channel tickets with every hidden layer gated per unit; this
recipe leaves Dense_0 ungated, so its rows must follow the Conv_3 channels left open.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import mnist_conv4_crbg_structured as structured
from configs import mnist_zoo
from slt_jax import load_ticket, masking
from slt_jax.compaction import compact_ticket
from slt_jax.data import load_dataset, preprocess
from slt_jax.models import create_model
from slt_jax.run_config import model_spec, validate_config
from slt_jax.train import train_and_evaluate

MNIST_SHAPE = (28, 28, 1)


def test_config_gates_channels_units_and_classifier_weights():
    """Convs per channel, Dense_1 per unit, the classifier per weight, Dense_0 not at all (built at
    full size, abstractly); the loss temperature and multiplier gain agree with the zoo's Conv4."""
    c = structured.get_config()
    validate_config(c)
    model = create_model(model_spec(c, 10))
    params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, *MNIST_SHAPE))))["params"]
    gates = masking.named_leaves(masking.gate_shapes(params, c.gate_policy, c.structured, c.structured_policy))
    kernels = masking.named_leaves(params)
    per_unit = [f"Conv_{i}/kernel" for i in range(4)] + ["Dense_1/kernel"]
    assert set(gates) == {*per_unit, "Dense_2/kernel"}
    for name in per_unit:
        assert gates[name].shape == (1,) * (kernels[name].ndim - 1) + kernels[name].shape[-1:]
    assert gates["Dense_2/kernel"].shape == kernels["Dense_2/kernel"].shape

    zoo = mnist_zoo.get_config("conv4,crbg")
    assert structured.logit_scale(zoo.sparsity) == pytest.approx(zoo.logit_scale)
    assert structured.dual_lr(zoo.num_epochs) == zoo.crbg.dual_lr
    assert structured.logit_scale(0.5) < structured.logit_scale(0.7) < zoo.logit_scale


@pytest.mark.slow  # a Conv4 trained, then compiled narrower: over a minute on 2 busy cores
def test_tiny_run_compiles_to_a_narrower_conv4(tmp_path):
    """Two steps of the recipe on synthetic 28x28x1 images at 1/4 width: the ticket closes channels
    (CRBG's gates start around the keep threshold), compiles with the masked model's logits, and
    the compact Dense_0 keeps 7x7 rows per open Conv_3 channel and all its units."""
    c = structured.get_config()
    c.dataset, c.synthetic_shape, c.synthetic_size, c.val_fraction = "synthetic", MNIST_SHAPE, 64, 0.25
    c.width, c.num_epochs, c.num_steps, c.batch_size, c.eval_batch_size = 0.25, 0, 2, 8, 64
    c.log_every = c.eval_every = 2
    c.checkpoint_every, c.num_devices, c.progress, c.plots = 0, 1, False, False
    train_and_evaluate(c, str(tmp_path))
    ticket = load_ticket(str(tmp_path / "ticket"))
    module, variables = compact_ticket(ticket)

    open_conv3 = int(np.asarray(ticket.gate_masks["Conv_3"]["kernel"]).sum())
    built = ticket.frozen_params()
    assert module.channels[-1] == open_conv3 < built["Conv_3"]["kernel"].shape[-1]
    assert variables["params"]["Dense_0"]["kernel"].shape == (7 * 7 * open_conv3, built["Dense_0"]["kernel"].shape[-1])

    x = jnp.asarray(preprocess(load_dataset(c).x_val, ticket.meta["preprocessing"]))
    masked_logits = ticket.model.apply({"params": ticket.masked_params()}, x)
    assert np.abs(masked_logits).max() > 0, "the test needs logits that are not all 0"
    np.testing.assert_allclose(module.apply(variables, x), masked_logits, rtol=1e-5,
                               atol=1e-5 * float(np.abs(masked_logits).max()))
