"""slt_jax: strong lottery tickets in JAX/Flax.

Public API::

    sample_gates, expected_density, binary_mask     (slt_jax.gates)
    gate_shapes, apply_masks                        (slt_jax.masking)
    create_method, create_model                     (slt_jax.methods, slt_jax.models)
    train_and_evaluate                              (slt_jax.train)
    load_ticket, save_ticket                        (slt_jax.ticket)
"""
from slt_jax.gates import binary_mask, expected_density, sample_gates
from slt_jax.masking import apply_masks, gate_shapes
from slt_jax.methods import create_method
from slt_jax.models import create_model
from slt_jax.ticket import load_ticket, save_ticket


def __getattr__(name):
    # The training stack (orbax, tqdm) loads only when asked for: a ticket loads without it.
    if name == "train_and_evaluate":
        from slt_jax.train import train_and_evaluate

        return train_and_evaluate
    raise AttributeError(name)


__all__ = ["apply_masks", "binary_mask", "create_method", "create_model", "expected_density", "gate_shapes",
           "load_ticket", "sample_gates", "save_ticket", "train_and_evaluate"]
