"""The zoo on MNIST: Conv4, ResNet-18, ViT-Tiny and Swin-T, CRBG against edge-popup at 90% sparsity.

    nice -n 5 python benchmarks/mnist_zoo.py                      # MNIST through TFDS (--dataset mnist)
    nice -n 5 python benchmarks/mnist_zoo.py --dataset npz:PATH   # or arrays x_train, y_train

Runs the eight ``configs/mnist_zoo.py`` runs (every model and method) one after another, each
through the ordinary command line (the exact command is recorded with its row)::

    python run.py --config configs/mnist_zoo.py:MODEL,METHOD --config.dataset=DATASET \
        --workdir runs/mnist_zoo/MODEL-METHOD

then writes OUT/results.jsonl (one line per run; rows of runs not named by ``--models``/``--methods``
are kept) and OUT/table.md, and prints the table. A run
whose workdir already holds ``summary.json`` is not run again, so an interrupted benchmark
resumes (an interrupted run itself resumes from its last checkpoint); delete the workdirs after
changing the code. Accuracy is the binary ticket's on the validation split carved from the
MNIST training set (test sets are not used; the committed results were measured on ``npz:``
arrays of the 60,000-image MNIST training set, as their rows say); a BatchNorm model's ticket carries running
statistics recomputed on the binary ticket (the harness's ``bn_recalibration_batches``).
``ms/step`` is the run's training seconds (``train_seconds`` of its last metrics record:
evaluation excluded, compilation and checkpointing included, summed over resumptions) per step.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from configs import mnist_zoo  # noqa: E402

METHOD_NAMES = {"crbg": "CRBG", "edgepopup": "edge-popup"}
MODEL_NAMES = {"conv4": "Conv4", "resnet18": "ResNet-18", "vit_tiny": "ViT-Tiny", "swin_t": "Swin-T"}


def command(model: str, method: str, dataset: str, workdirs: str) -> list[str]:
    """The run's command line, relative to the repository root."""
    return ["python", "run.py", "--config", f"configs/mnist_zoo.py:{model},{method}", f"--config.dataset={dataset}",
            "--workdir", os.path.join(workdirs, f"{model}-{method}")]


def run(cmd: list[str]) -> None:
    """Runs ``cmd`` from the repository root (progress bar to this stderr)."""
    result = subprocess.run([sys.executable, *cmd[1:]], cwd=ROOT, stdout=subprocess.DEVNULL)
    if result.returncode:
        sys.exit(f"error: `{' '.join(cmd)}` exited with {result.returncode}")


def layer_range(layer_sparsity: dict[str, float]) -> str:
    """Per-layer sparsity in one cell: the least and the most sparse gated leaf, named."""
    lo, hi = (f"{100 * layer_sparsity[k]:.1f}% ({k.removesuffix('/kernel')})"
              for k in (min(layer_sparsity, key=layer_sparsity.get), max(layer_sparsity, key=layer_sparsity.get)))
    return f"{lo} to {hi}"


def train_seconds(workdir: str) -> float:
    """The run's training seconds: ``train_seconds`` of the last record of its metrics.jsonl."""
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return float(json.loads(f.readlines()[-1])["train_seconds"])


def make_row(model: str, method: str, cmd: list[str], summary: dict[str, Any]) -> dict:
    """One results.jsonl line from a run's summary.json, metrics.jsonl and config."""
    config = mnist_zoo.get_config(f"{model},{method}")
    seconds = train_seconds(os.path.join(ROOT, cmd[-1]))
    return {"model": model, "method": method, "dataset": summary["dataset"], "width": config.width,
            "num_epochs": config.num_epochs, "batch_size": config.batch_size, "logit_scale": config.logit_scale,
            "gated_weights": summary["gated_weights"], "val_accuracy": summary["val_accuracy"],
            "stochastic_val_accuracy": summary["stochastic_val_accuracy"], "sparsity": summary["sparsity"],
            "layer_sparsity": summary["layer_sparsity"], "num_steps": summary["num_steps"],
            "train_seconds": seconds, "ms_per_step": 1000 * seconds / summary["num_steps"], "command": " ".join(cmd)}


def job_order(row: dict) -> tuple[int, int]:
    """A row's place in the table: the configs' order of models, then of methods."""
    return list(mnist_zoo.MODELS).index(row["model"]), list(mnist_zoo.METHODS).index(row["method"])


def shown_command(row: dict) -> str:
    """The row's command with a local ``npz:`` path shown as ``npz:PATH`` (the row records the path)."""
    dataset = row["dataset"]
    return row["command"].replace(dataset, "npz:PATH") if dataset.startswith("npz:") else row["command"]


def table(rows: list[dict]) -> str:
    lines = ["| model (width, gated weights) | method | epochs | val accuracy | sparsity | per-layer sparsity | ms/step "
             "| command |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {MODEL_NAMES[r['model']]} (x{r['width']:g}, {r['gated_weights']:,}) | {METHOD_NAMES[r['method']]} "
            f"| {r['num_epochs']} ({r['num_steps']:,} steps) | {100 * r['val_accuracy']:.2f}% "
            f"| {100 * r['sparsity']:.2f}% | {layer_range(r['layer_sparsity'])} | {r['ms_per_step']:.0f} "
            f"| `{shown_command(r)}` |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(mnist_zoo.MODELS))
    ap.add_argument("--methods", default=",".join(mnist_zoo.METHODS))
    ap.add_argument("--dataset", default="mnist", help="config.dataset of every run: mnist (TFDS) or npz:PATH")
    ap.add_argument("--workdirs", default="runs/mnist_zoo", help="parent of the runs' workdirs (repository-relative)")
    ap.add_argument("--out", default="benchmarks/results/mnist_zoo")
    args = ap.parse_args()
    models, methods = args.models.split(","), args.methods.split(",")
    for kind, asked, allowed in (("model", models, mnist_zoo.MODELS), ("method", methods, mnist_zoo.METHODS)):
        unknown = sorted(set(asked) - set(allowed))
        if unknown:
            sys.exit(f"error: unknown {kind}(s) {unknown}; allowed: {', '.join(allowed)}")
    out = os.path.join(ROOT, args.out)
    os.makedirs(out, exist_ok=True)
    results_path = os.path.join(out, "results.jsonl")
    # Rows of runs not asked for this time stay (--models/--methods re-measure a part of the table).
    kept = []
    if os.path.exists(results_path):
        with open(results_path) as f:
            kept = [json.loads(line) for line in f if line.strip()]
    rows = []
    jobs = [(model, method) for model in models for method in methods]
    kept = [r for r in kept if (r["model"], r["method"]) not in jobs]
    for i, (model, method) in enumerate(jobs):
        cmd = command(model, method, args.dataset, args.workdirs)
        summary_path = os.path.join(ROOT, cmd[-1], "summary.json")
        if not os.path.exists(summary_path):
            print(f"[{i + 1}/{len(jobs)}] {' '.join(cmd)}", file=sys.stderr, flush=True)
            run(cmd)
        with open(summary_path) as f:
            summary = json.load(f)
        if summary["dataset"] != args.dataset:
            sys.exit(f"error: {cmd[-1]} holds a run on dataset {summary['dataset']!r}, not --dataset {args.dataset!r}; "
                     "allowed: another --workdirs, or that --dataset")
        rows.append(make_row(model, method, cmd, summary))
        with open(results_path, "w") as f:  # after every run, so an interruption loses nothing
            f.writelines(json.dumps(r) + "\n" for r in sorted(kept + rows, key=job_order))
    print(write_table(out, sorted(kept + rows, key=job_order)))


def write_table(out: str, rows: list[dict]) -> str:
    """Writes OUT/table.md from ``rows``; returns the table."""
    text = table(rows)
    total = f"{sum(r['train_seconds'] for r in rows) / 60:.1f} min of training in all"
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write(f"Binary-ticket validation accuracy on MNIST at a target sparsity of 0.9, seed 0 ({total}).\n\n"
                f"{text}\n")
    return text


if __name__ == "__main__":
    main()
