"""What a run writes to its workdir besides metrics.jsonl and checkpoints/.

``config.json`` when training starts (the config as run, the method's defaults resolved); when it ends, ``ticket/`` (the ticket,
``slt_jax.ticket.save_ticket``, with what it records about the network, ``ticket_meta``), the
plots (``slt_jax.plots``, when ``config.plots``) and ``summary.json`` (``run_summary``, also
``run.py``'s last line). JSON files are written whole or not at all.
"""
from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Any

import jax
import ml_collections

from slt_jax.gates import gate_count
from slt_jax.step import TrainState
from slt_jax.ticket import ZOO_INIT_KWARGS, save_ticket, ticket_size

if TYPE_CHECKING:
    from slt_jax.training_run import Run


def _write_json(path: str, obj: Any) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
    os.replace(tmp, path)


def write_config(workdir: str, config: ml_collections.ConfigDict, method_settings: dict[str, Any]) -> None:
    """``WORKDIR/config.json``: the config the run was started with, a None that means "the
    method's default" (``learning_rate``, ``lr_schedule``) replaced by the value the method used
    (``method_settings``: its dataclass fields as built)."""
    recorded = json.loads(config.to_json())
    for key, value in method_settings.items():
        if key in recorded and recorded[key] is None:
            recorded[key] = value
    _write_json(os.path.join(workdir, "config.json"), recorded)


def ticket_meta(run: Run) -> dict[str, Any]:
    """What ``ticket.json`` records about the network, so the ticket reloads without this run."""
    cfg = run.config
    meta = {"model": run.spec, "input_shape": list(run.dataset.input_shape), "seed": cfg.seed,
            "init_kwargs": ZOO_INIT_KWARGS, "gate_policy": cfg.gate_policy, "structured": cfg.structured,
            "structured_policy": cfg.structured_policy, "structured_inputs": cfg.structured_inputs,
            "method": cfg.method,
            "frozen_dtype": cfg.frozen_dtype,  # the ticket is defined on weights rounded to it
            "dataset": cfg.dataset, "preprocessing": run.dataset.preprocessing}
    if run.method.ticket_weights:  # e.g. biprop's sign(w0) * alpha(mask), replayed by the ticket
        meta["weights"] = run.method.ticket_weights
    if cfg.frozen_from:
        meta["frozen_from"] = {"path": os.path.abspath(cfg.frozen_from), "sha256": run.frozen_sha256}
    return meta


def run_summary(run: Run, final: dict[str, Any], binary: Any, train_seconds: float, workdir: str) -> dict[str, Any]:
    """The run's result: ``final`` (``slt_jax.evaluation.evaluate`` on val and test), the ticket's
    gates and size in bits (``binary``: the binary gate masks), and what produced it."""
    config = run.config
    return {
        "method": config.method, "model": config.model, "dataset": config.dataset, "seed": config.seed,
        "target_sparsity": config.sparsity, "structured": config.structured,
        "test_accuracy": final.get("test_accuracy"), "val_accuracy": final["val_accuracy"],
        "stochastic_val_accuracy": final["stochastic_val_accuracy"], "binary_gap": final["binary_gap"],
        "sparsity": final["sparsity"], "layer_sparsity": final["layer_sparsity"],
        "gated_weights": final["gated_weights"], "num_gates": gate_count(binary), "num_steps": run.num_steps,
        "ticket_size": ticket_size(binary, final["gated_weights"]),
        "train_seconds": round(train_seconds, 2), "workdir": workdir,
    }


def write_outputs(run: Run, state: TrainState, summary: dict[str, Any], binary: Any, workdir: str) -> dict[str, Any]:
    """Writes ``WORKDIR/ticket``, the plots and ``WORKDIR/summary.json``; returns the summary, with the
    plots' paths when there are plots."""
    config = run.config
    meta = {**ticket_meta(run), "size": summary["ticket_size"],
            "metrics": {k: summary[k] for k in ("val_accuracy", "test_accuracy", "sparsity", "binary_gap")}}
    generation = jax.device_get(state.method_state["generation"]) if run.redraws else None
    save_ticket(os.path.join(workdir, "ticket"), meta, binary, jax.device_get(state.model_state),
                coding=config.ticket_coding, generation=generation, frozen=run.current_weights())
    if config.plots:
        from slt_jax.plots import write_run_plots  # matplotlib takes a second to import: only when plotting

        summary = {**summary, "plots": write_run_plots(workdir, summary, jax.device_get(state.gates), binary)}
    _write_json(os.path.join(workdir, "summary.json"), summary)
    return summary
