"""Accuracy vs sparsity of binary tickets on MNIST LeNet-300-100: CRBG (per weight and per unit)
against edge-popup (per-layer and global top-k), same data, seeds, budget and evaluation.

    python benchmarks/mnist_pareto.py --dataset npz:../shared/data/mnist_train.npz

Accuracy is the binary ticket's on the validation split carved from the MNIST training set
(the test set is withheld). Writes OUT/results.jsonl (one line per run; an interrupted benchmark
resumes from it), OUT/table.md and OUT/pareto.png, and prints the table. A row is reused only by
a run of the same variant, target, seed, epochs and dataset, and the table shows only rows of the
current epochs and dataset; a row does not record the code that made it, so delete the file after
changing the code.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from configs import mnist_lenet300_crbg, mnist_lenet300_crbg_structured, mnist_lenet300_edgepopup  # noqa: E402

VARIANTS = {
    "crbg": lambda: mnist_lenet300_crbg.get_config(),
    "crbg_structured": lambda: mnist_lenet300_crbg_structured.get_config(),
    "edgepopup_layer": lambda: mnist_lenet300_edgepopup.get_config(),
    "edgepopup_global": lambda: _with(mnist_lenet300_edgepopup.get_config(), scope="global"),
}


def _with(config, scope):
    config.edgepopup.scope = scope
    return config


def run_one(variant: str, sparsity: float, seed: int, args) -> dict:
    from slt_jax.train import train_and_evaluate

    config = VARIANTS[variant]()
    config.dataset, config.sparsity, config.seed = args.dataset, sparsity, seed
    config.num_epochs, config.progress, config.plots = args.num_epochs, False, False
    config.checkpoint_every = 0
    workdir = os.path.join(args.out, "runs", f"{variant}-s{sparsity}-seed{seed}")
    s = train_and_evaluate(config, workdir)
    return {"variant": variant, "target_sparsity": sparsity, "seed": seed, "num_epochs": args.num_epochs,
            "dataset": args.dataset, "val_accuracy": s["val_accuracy"],
            "sparsity": s["sparsity"], "binary_gap": s["binary_gap"], "train_seconds": s["train_seconds"],
            "num_steps": s["num_steps"]}


def table(rows: list[dict]) -> str:
    groups = defaultdict(list)
    for r in rows:
        groups[(r["variant"], r["target_sparsity"])].append(r)
    targets = sorted({r["target_sparsity"] for r in rows})
    variants = [v for v in VARIANTS if any(r["variant"] == v for r in rows)]
    lines = ["| target sparsity | " + " | ".join(variants) + " |", "|---" * (len(variants) + 1) + "|"]
    for t in targets:
        cells = []
        for v in variants:
            g = groups.get((v, t), [])
            if not g:
                cells.append("")
                continue
            acc = np.array([r["val_accuracy"] for r in g]) * 100
            sp = np.mean([r["sparsity"] for r in g]) * 100
            cells.append(f"{acc.mean():.2f} ± {acc.std():.2f} @ {sp:.1f}% (n={len(g)})")
        lines.append(f"| {t:.2f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    # Zoom on the informative range; a run at chance level is drawn on the bottom edge as a "v".
    accuracies = [r["val_accuracy"] * 100 for r in rows]
    floor = max(min(a for a in accuracies if a > 50) - 1.0, 50) if any(a > 50 for a in accuracies) else 0
    for v in VARIANTS:
        g = defaultdict(list)
        for r in rows:
            if r["variant"] == v:
                g[r["target_sparsity"]].append(r)
        if not g:
            continue
        ts = sorted(g)
        x = [np.mean([r["sparsity"] for r in g[t]]) * 100 for t in ts]
        acc = [np.array([r["val_accuracy"] for r in g[t]]) * 100 for t in ts]
        means = np.array([a.mean() for a in acc])
        line = ax.errorbar(x, np.maximum(means, floor), yerr=[a.std() for a in acc], marker="o", capsize=3, label=v)
        low = means < floor
        if low.any():
            ax.plot(np.array(x)[low], np.full(low.sum(), floor), "v", color=line[0].get_color(), markersize=10)
    ax.set_ylim(bottom=floor)
    ax.set_xlabel("sparsity of the binary ticket (% of gated weights removed)")
    ax.set_ylabel("validation accuracy (%); v: below the axis")
    ax.set_title("LeNet-300-100 on MNIST: binary tickets")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="npz:../shared/data/mnist_train.npz")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--sparsities", default="0.5,0.7,0.8,0.9,0.95,0.98")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--num_epochs", type=int, default=5)
    ap.add_argument("--out", default="benchmarks/results/mnist_pareto")
    args = ap.parse_args()
    unknown = set(args.variants.split(",")) - set(VARIANTS)
    if unknown:
        sys.exit(f"error: unknown variant(s) {sorted(unknown)}; allowed: {', '.join(VARIANTS)}")
    os.makedirs(args.out, exist_ok=True)
    results_path = os.path.join(args.out, "results.jsonl")
    saved = [json.loads(l) for l in open(results_path)] if os.path.exists(results_path) else []
    rows = [r for r in saved if (r.get("num_epochs"), r.get("dataset")) == (args.num_epochs, args.dataset)]
    done = {(r["variant"], r["target_sparsity"], r["seed"]) for r in rows}
    jobs = [(v, float(s), int(seed)) for v in args.variants.split(",") for s in args.sparsities.split(",")
            for seed in args.seeds.split(",")]
    for i, job in enumerate(jobs):
        if job in done:
            continue
        print(f"[{i + 1}/{len(jobs)}] {job[0]} sparsity={job[1]} seed={job[2]}", file=sys.stderr, flush=True)
        row = run_one(*job, args)
        rows.append(row)
        with open(results_path, "a") as f:
            f.write(json.dumps(row) + "\n")
    text = table(rows)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(f"Binary-ticket validation accuracy (mean ± std over seeds) @ achieved sparsity; "
                f"{args.num_epochs} epochs each.\n\n{text}\n")
    plot(rows, os.path.join(args.out, "pareto.png"))
    print(text)


if __name__ == "__main__":
    main()
