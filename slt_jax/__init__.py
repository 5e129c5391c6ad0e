"""slt_jax: strong lottery tickets in JAX/Flax.

Public API (gate and mask trees are shaped like the params, None where a leaf is not gated)::

    sample_gates, expected_density, binary_mask      gate families (slt_jax.gates)
    gate_shapes, apply_masks, leaf_masks             which leaves are gated; masks on params (slt_jax.masking)
    sparsity_report                                  a binary ticket's sparsity, total and per leaf
    CRBG, EdgePopup, IteRand, create_method          methods (slt_jax.methods); IteRand.redraw re-draws weights
    gated, Gated                                     a Linen module with "frozen" and "gates" collections
    with_penalty                                     the method's penalty and multiplier inside Optax
    gates_only, stop_frozen                          Optax on the gates only (slt_jax.optim)
    TrainState, make_train_step, classification_loss, make_eval_fn   the step (slt_jax.step)
    init_variables, round_frozen, weights_key        the frozen network (slt_jax.frozen)
    params_by_generation                             the weights IteRand re-draws, generation by generation
    make_mesh, shard_batch, replicate                data-parallel devices (slt_jax.sharding)
    create_model                                     the model zoo
    load_ticket, save_ticket                         tickets (slt_jax.ticket)
    train_and_evaluate                               the harness behind run.py (slt_jax.train)

NNX models: ``slt_jax.nnx_gating``.
"""
from slt_jax.frozen import init_variables, params_by_generation, round_frozen, weights_key
from slt_jax.gates import binary_mask, expected_density, sample_gates
from slt_jax.masking import apply_masks, gate_shapes, leaf_masks, sparsity_report
from slt_jax.methods import CRBG, EdgePopup, IteRand, create_method
from slt_jax.models import create_model
from slt_jax.module import Gated, gated
from slt_jax.optim import gates_only, stop_frozen
from slt_jax.penalty_optax import with_penalty
from slt_jax.sharding import make_mesh, replicate, shard_batch
from slt_jax.step import TrainState, classification_loss, make_eval_fn, make_train_step
from slt_jax.ticket import load_ticket, save_ticket


def __getattr__(name):
    # The training stack (orbax, tqdm) loads only when asked for: a ticket loads without it.
    if name == "train_and_evaluate":
        from slt_jax.train import train_and_evaluate

        return train_and_evaluate
    raise AttributeError(name)


__all__ = ["CRBG", "EdgePopup", "Gated", "IteRand", "TrainState", "apply_masks", "binary_mask", "classification_loss",
           "create_method", "create_model", "expected_density", "gate_shapes", "gated", "gates_only",
           "init_variables", "leaf_masks", "load_ticket", "make_eval_fn", "make_mesh", "make_train_step",
           "params_by_generation", "replicate", "round_frozen", "sample_gates", "save_ticket", "shard_batch",
           "sparsity_report", "stop_frozen", "train_and_evaluate", "weights_key", "with_penalty"]
