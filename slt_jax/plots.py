"""PNG figures of a run, drawn from ``WORKDIR/metrics.jsonl``, the summary and the final gates.

``write_run_plots`` writes, into the workdir:

* ``training_curves.png``: loss; validation accuracy of the binary ticket and of one sample of
  the training masks (CRBG: a noisy gate draw; their distance is the binary gap); sparsity of the
  binary ticket, 1 - expected density (CRBG) and the target.
* ``layer_sparsity.png``: the binary ticket's sparsity per gated leaf.
* ``gate_histogram.png``: the final gate parameters (CRBG: e.g. mu; edge-popup: scores), split
  into the gates the binary ticket keeps and those it drops.

Figures are built with ``matplotlib.figure.Figure``, never pyplot: no global backend or figure
state is touched, so plotting is safe in a notebook, a thread or a headless job alike.
"""
from __future__ import annotations

import json
import os
from typing import Any, Mapping

import jax
import numpy as np
from matplotlib.figure import Figure

PLOT_FILES = ("training_curves.png", "layer_sparsity.png", "gate_histogram.png")


def read_metrics(path: str) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` file, in order."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _series(records: list[dict[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
    # Evaluation keys appear only on evaluation steps: take the records that have them.
    rows = [(r["step"], r[key]) for r in records if r.get(key) is not None]
    steps, values = zip(*rows) if rows else ((), ())
    return np.asarray(steps), np.asarray(values, float)


def plot_training_curves(records: list[dict[str, Any]], path: str, target_sparsity: float | None = None,
                         title: str = "") -> Figure:
    """Loss, validation accuracy and sparsity against the step, as three panels."""
    fig = Figure(figsize=(13, 3.6), layout="constrained")
    ax_loss, ax_acc, ax_sp = fig.subplots(1, 3)

    for key, label in (("loss", "loss (CE + penalty)"), ("cross_entropy", "cross-entropy")):
        steps, values = _series(records, key)
        if len(steps):
            ax_loss.plot(steps, values, label=label)
    ax_loss.set(xlabel="step", title="training loss")
    ax_loss.legend()

    for key, label, style in (("val_accuracy", "binary ticket", "o-"),
                              ("stochastic_val_accuracy", "training masks (one sample)", "x--")):
        steps, values = _series(records, key)
        if len(steps):
            ax_acc.plot(steps, values, style, label=label)
    ax_acc.set(xlabel="step", title="validation accuracy")
    ax_acc.legend()

    steps, values = _series(records, "sparsity")
    if len(steps):
        ax_sp.plot(steps, values, "o-", label="binary ticket")
    steps, values = _series(records, "expected_density")
    if len(steps):
        ax_sp.plot(steps, 1.0 - values, label="1 - expected density")
    if target_sparsity is not None:
        ax_sp.axhline(target_sparsity, color="gray", linestyle=":", label="target")
    ax_sp.set(xlabel="step", title="sparsity (fraction of gated weights removed)", ylim=(0, 1))
    ax_sp.legend()

    if title:
        fig.suptitle(title)
    fig.savefig(path, dpi=100)
    return fig


def plot_layer_sparsity(layer_sparsity: Mapping[str, float], path: str, overall: float | None = None,
                        title: str = "") -> Figure:
    """One horizontal bar per gated leaf: the fraction of its weights the ticket removes."""
    names = list(layer_sparsity)
    values = [layer_sparsity[n] for n in names]
    fig = Figure(figsize=(6.5, 1.2 + 0.4 * len(names)), layout="constrained")
    ax = fig.subplots()
    y = np.arange(len(names))
    ax.barh(y, values)
    for yi, v in zip(y, values):
        ax.text(min(v + 0.01, 0.9), yi, f"{v:.1%}", va="center")
    ax.set_yticks(y, names)
    ax.invert_yaxis()  # first layer on top, as in the model
    if overall is not None:
        ax.axvline(overall, color="gray", linestyle=":", label=f"overall {overall:.1%}")
        ax.legend(loc="lower right")
    ax.set(xlim=(0, 1), xlabel="sparsity (fraction removed)", title=title or "per-layer sparsity")
    fig.savefig(path, dpi=100)
    return fig


def plot_gate_histogram(gates: Any, kept: Any, path: str,
                        parameter: str = "gate parameter", title: str = "", bins: int = 100) -> Figure:
    """Histogram of every gate parameter, pooled over leaves, kept and dropped gates stacked.

    ``gates`` is a gate tree and ``kept`` the binary ticket (bool arrays, the same tree), so the
    keep rule of any gate family or method shows as the boundary between the two colours.
    """
    params = np.concatenate([np.ravel(np.asarray(g, np.float32)) for g in jax.tree.leaves(gates)])
    keep = np.concatenate([np.ravel(np.asarray(k, bool)) for k in jax.tree.leaves(kept)])
    fig = Figure(figsize=(6.5, 3.6), layout="constrained")
    ax = fig.subplots()
    edges = np.histogram_bin_edges(params, bins=bins)
    ax.hist([params[keep], params[~keep]], bins=edges, stacked=True, color=["tab:blue", "tab:gray"],
            label=[f"kept ({keep.mean():.1%})", f"dropped ({1 - keep.mean():.1%})"])
    ax.set_yscale("log")  # both extremes stay visible even when one holds almost every gate
    ax.set(xlabel=parameter, ylabel="gates", title=title or f"final {parameter}s ({params.size:,} gates)")
    ax.legend()
    fig.savefig(path, dpi=100)
    return fig


def write_run_plots(workdir: str, summary: Mapping[str, Any], gates: Any, kept: Any) -> list[str]:
    """Writes the ``PLOT_FILES`` of a finished run into ``workdir``; returns their file names.

    ``summary`` is the run's summary (method, model, target_sparsity, sparsity, layer_sparsity);
    ``gates`` the final gate tree and ``kept`` the binary ticket, both shaped like the params.
    """
    method = summary["method"]
    name = f"{method} on {summary['model']}"
    curves, layers, hist = (os.path.join(workdir, f) for f in PLOT_FILES)
    plot_training_curves(read_metrics(os.path.join(workdir, "metrics.jsonl")), curves,
                         summary.get("target_sparsity"), title=name)
    plot_layer_sparsity(summary["layer_sparsity"], layers, summary.get("sparsity"),
                        title=f"per-layer sparsity, {name}")
    parameter = "gate parameter" if method == "crbg" else "score"
    plot_gate_histogram(gates, kept, hist, parameter=parameter, title=f"final {parameter}s, {name}")
    return list(PLOT_FILES)
