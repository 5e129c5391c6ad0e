"""A structured ticket compiles to a narrower dense model with the masked model's outputs."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from slt_jax import load_ticket
from slt_jax.compaction import compact_ticket, count_macs
from slt_jax.data import load_dataset, preprocess
from slt_jax.models import create_model
from slt_jax.train import train_and_evaluate


@pytest.mark.parametrize("model, use_bias, structured_policy", [
    ("digits_mlp", True, ""),
    ("digits_mlp", False, r"^Dense_[01]/"),  # the classifier keeps one gate per weight
    ("conv2", False, ""),
])
def test_compact_model_matches_masked_model(tiny_config, tmp_path, model, use_bias, structured_policy):
    c = tiny_config
    c.model, c.use_bias, c.structured, c.sparsity, c.width = model, use_bias, True, 0.5, 0.25 if model == "conv2" else 1.0
    c.structured_policy = structured_policy
    train_and_evaluate(c, str(tmp_path))
    ticket = load_ticket(str(tmp_path / "ticket"))
    module, params = compact_ticket(ticket)

    closed = sum(int((~np.asarray(m)).sum()) for m in jax.tree.leaves(ticket.gate_masks))
    assert closed > 0, "the test needs a ticket that closes some units"
    full = ticket.masked_params()
    assert count_macs(params, ticket.meta["input_shape"]) < count_macs(full, ticket.meta["input_shape"])

    data = load_dataset(c)
    x = jnp.asarray(preprocess(data.x_val, ticket.meta["preprocessing"]))
    masked_logits = create_model(ticket.meta["model"]).apply({"params": full}, x)
    compact_logits = module.apply({"params": jax.tree.map(jnp.asarray, params)}, x)
    np.testing.assert_allclose(compact_logits, masked_logits, rtol=1e-5, atol=1e-5)
    assert (np.argmax(compact_logits, -1) == ticket.predict(data.x_val)).all()


def test_unstructured_ticket_is_refused(tiny_config, tmp_path):
    tiny_config.num_steps = 2
    train_and_evaluate(tiny_config, str(tmp_path))
    with pytest.raises(ValueError, match="structured"):
        compact_ticket(load_ticket(str(tmp_path / "ticket")))
