"""Accuracy vs sparsity, and time to accuracy, of binary tickets on MNIST LeNet-300-100: every
method (CRBG, edge-popup per layer and global, supermask, IteRand, biprop) on one budget.

    python benchmarks/mnist_pareto.py                        # MNIST through TFDS (--dataset mnist)
    python benchmarks/mnist_pareto.py --dataset npz:PATH     # or arrays x_train, y_train

Every variant gets the same data (``--dataset``, any ``config.dataset`` string; the committed
results were measured on ``npz:`` arrays of the 60,000-image MNIST training set), seeds, loss
(``logit_scale`` of the MNIST configs), epochs, batch size and evaluation grid (the binary ticket on
the validation split carved from the training set, every 100 steps; test sets are not used). CRBG
runs configs/mnist_lenet300_crbg.py (``crbg``: its default, the gates shifted onto a ramped target;
``crbg_pi``: held by the PI multiplier alone, the default before issue 21), edge-popup
configs/mnist_lenet300_edgepopup.py; supermask,
IteRand and biprop run the edge-popup config with their method and ``learning_rate`` /
``lr_schedule`` cleared to None, i.e. each method's own recipe (its dataclass defaults): supermask
SGD 100 constant; biprop and IteRand subclass edge-popup and keep its SGD 0.1 cosine, the value the
edge-popup config sets explicitly, so clearing changes nothing for them today and follows their own
recipe should it change. ``crbg_structured``
(CRBG with one gate per hidden unit, the classifier per weight: the structured recipe before input
gates; today's is benchmarks/lenet_structured.py's) can be named in --variants but is not run by default.

Per run, from WORKDIR/metrics.jsonl: the steps and training seconds (evaluations excluded,
compilation included) until the first evaluation at which the binary ticket's validation accuracy
reaches 95% and 97% with a ticket at most half a point less sparse than the target (null if
never), and ms per step (all training seconds / steps, so compilation
included).

Writes OUT/results.jsonl (one line per run; an interrupted benchmark resumes from it), OUT/table.md
(accuracy per variant and target; time to accuracy per variant at target 0.90) and OUT/pareto.png,
and prints both tables. A row is reused only by a run of the same variant, target, seed, epochs and
dataset, and the tables show only rows of the current epochs and dataset; a row does not record the
code that made it, so delete the file after changing the code. Rows without the time fields (older
files) count in the accuracy table only.
"""
from __future__ import annotations

import argparse
import os
import sys
from collections import defaultdict
from typing import Any, Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import lenet_structured, sweep  # noqa: E402
from configs import mnist_lenet300_crbg, mnist_lenet300_edgepopup  # noqa: E402


def _edgepopup(scope: str) -> ml_collections.ConfigDict:
    config = mnist_lenet300_edgepopup.get_config()
    config.edgepopup.scope = scope
    return config


def _own_recipe(method: str) -> ml_collections.ConfigDict:
    """The edge-popup MNIST config (data, loss, batch, epochs) run by ``method`` with its own learning rate."""
    config = mnist_lenet300_edgepopup.get_config()
    config.method = method
    config.learning_rate, config.lr_schedule = None, None  # None: the method's dataclass default
    return config


def _crbg_pi() -> ml_collections.ConfigDict:
    """The CRBG config held on its target by the PI multiplier alone (CRBG's default before issue 21)."""
    config = mnist_lenet300_crbg.get_config()
    config.crbg.shift_onto_target, config.crbg.target_ramp = False, 0.0
    return config


VARIANTS: dict[str, Callable[[], ml_collections.ConfigDict]] = {
    "crbg": mnist_lenet300_crbg.get_config,
    "crbg_pi": _crbg_pi,
    "crbg_structured": lambda: lenet_structured.recipe("units"),
    "edgepopup_layer": lambda: _edgepopup("layer"),
    "edgepopup_global": lambda: _edgepopup("global"),
    "supermask": lambda: _own_recipe("supermask"),
    "iterand": lambda: _own_recipe("iterand"),
    "biprop": lambda: _own_recipe("biprop"),
}
DEFAULT_VARIANTS = [v for v in VARIANTS if v != "crbg_structured"]  # structured CRBG is benchmarked elsewhere
THRESHOLDS = (0.95, 0.97)  # validation accuracies whose first crossing is timed
TIME_TARGET = 0.9  # the target sparsity of the time-to-accuracy table


def benchmark_config(variant: str, sparsity: float, seed: int, args: argparse.Namespace) -> ml_collections.ConfigDict:
    """The variant's config on the benchmark's shared data, budget and evaluation grid."""
    config = VARIANTS[variant]()
    config.dataset, config.sparsity, config.seed = args.dataset, sparsity, seed
    config.num_epochs, config.progress, config.plots = args.num_epochs, False, False
    config.checkpoint_every = 0
    # The harness evaluates only at logged steps, so eval_every is a multiple of log_every.
    config.eval_every, config.log_every = 100, 50
    return config


def _key(kind: str, threshold: float) -> str:
    return f"{kind}_to_{round(threshold * 100)}"


SPARSITY_SLACK = 0.005  # a timed ticket is at most half a point denser than the target


def time_to_accuracy(records: list[dict[str, Any]], num_steps: int, target: float) -> dict[str, Any]:
    """steps_to_95, seconds_to_95, ... (None if never reached) and step_ms from a run's metric records.

    Only evaluations whose ticket is within ``SPARSITY_SLACK`` of the target sparsity count: CRBG's and
    supermask's tickets start dense and reach the target during training, and an early, denser ticket
    would be timed unfairly against edge-popup's, which is at the target from the first step."""
    evals = [r for r in records if "val_accuracy" in r and r["sparsity"] >= target - SPARSITY_SLACK]
    out: dict[str, Any] = {}
    for t in THRESHOLDS:
        hit = next((r for r in evals if r["val_accuracy"] >= t), None)
        out[_key("steps", t)] = hit["step"] if hit else None
        out[_key("seconds", t)] = hit["train_seconds"] if hit else None
    out["step_ms"] = round(records[-1]["train_seconds"] / num_steps * 1000, 3) if records else None
    return out


def run_one(variant: str, sparsity: float, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    from slt_jax.train import train_and_evaluate

    workdir = os.path.join(args.out, "runs", f"{variant}-s{sparsity}-seed{seed}")
    s = train_and_evaluate(benchmark_config(variant, sparsity, seed, args), workdir)
    return {"variant": variant, "target_sparsity": sparsity, "seed": seed, "num_epochs": args.num_epochs,
            "dataset": args.dataset, "val_accuracy": s["val_accuracy"],
            "sparsity": s["sparsity"], "binary_gap": s["binary_gap"], "train_seconds": s["train_seconds"],
            "num_steps": s["num_steps"],
            **time_to_accuracy(sweep.read_jsonl(os.path.join(workdir, "metrics.jsonl")), s["num_steps"], sparsity)}


def _variants_present(rows: list[dict[str, Any]]) -> list[str]:
    return [v for v in VARIANTS if any(r["variant"] == v for r in rows)]


def accuracy_cell(runs: list[dict[str, Any]]) -> str:
    """Validation accuracy mean ± std over the runs @ their mean sparsity, in %; "" for no runs."""
    if not runs:
        return ""
    acc = np.array([r["val_accuracy"] for r in runs]) * 100
    sparsity = np.mean([r["sparsity"] for r in runs]) * 100
    return f"{acc.mean():.2f} ± {acc.std():.2f} @ {sparsity:.1f}% (n={len(runs)})"


def table(rows: list[dict[str, Any]]) -> str:
    groups = defaultdict(list)
    for r in rows:
        groups[(r["variant"], r["target_sparsity"])].append(r)
    targets = sorted({r["target_sparsity"] for r in rows})
    variants = _variants_present(rows)
    lines = ["| target sparsity | " + " | ".join(variants) + " |", "|---" * (len(variants) + 1) + "|"]
    for t in targets:
        cells = []
        for v in variants:
            cells.append(accuracy_cell(groups.get((v, t), [])))
        lines.append(f"| {t:.2f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def time_cell(rows: list[dict[str, Any]], key: str, digits: int) -> str:
    """Mean ± std over the seeds that reached; "(k/n)" when only k of the n known seeds did, "?" if none known."""
    known = [r[key] for r in rows if key in r]  # rows written before the time fields existed: unknown
    reached = np.array([v for v in known if v is not None], dtype=float)
    if not known:
        return "?"
    if not reached.size:
        return f"n/r (0/{len(known)})"
    cell = f"{reached.mean():.{digits}f} ± {reached.std():.{digits}f}"
    return cell if reached.size == len(known) else f"{cell} ({reached.size}/{len(known)})"


def time_table(rows: list[dict[str, Any]]) -> str:
    """One row per variant at TIME_TARGET: steps and seconds to each threshold, ms per step, final accuracy.
    Variants whose rows were all made before the time fields existed are left out."""
    at_target = [r for r in rows if r["target_sparsity"] == TIME_TARGET and "step_ms" in r]
    header = ["variant"] + [f"{kind} to {round(t * 100)}%" for t in THRESHOLDS for kind in ("steps", "seconds")]
    header += ["ms/step", "final accuracy"]
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for v in _variants_present(at_target):
        g = [r for r in at_target if r["variant"] == v]
        cells = [time_cell(g, _key(kind, t), digits) for t in THRESHOLDS
                 for kind, digits in (("steps", 0), ("seconds", 1))]
        acc = np.array([r["val_accuracy"] for r in g]) * 100
        cells += [time_cell(g, "step_ms", 2), f"{acc.mean():.2f} ± {acc.std():.2f} (n={len(g)})"]
        lines.append(f"| {v} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: str) -> None:
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


def check_variants(variants: list[str], args: argparse.Namespace) -> None:
    """Exits before any run if a variant is unknown or its config is refused (e.g. a method not registered)."""
    from slt_jax.run_config import ConfigError, validate_config

    unknown = set(variants) - set(VARIANTS)
    if unknown:
        sys.exit(f"error: unknown variant(s) {sorted(unknown)}; allowed: {', '.join(VARIANTS)}")
    for v in variants:
        try:
            validate_config(benchmark_config(v, TIME_TARGET, 0, args))
        except ConfigError as e:
            sys.exit(f"error: variant {v}: {e}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="mnist", help="config.dataset of every run: mnist (TFDS) or npz:PATH")
    ap.add_argument("--variants", default=",".join(DEFAULT_VARIANTS))
    ap.add_argument("--sparsities", default="0.5,0.7,0.8,0.9,0.95,0.98")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--num_epochs", type=int, default=10)
    ap.add_argument("--out", default="benchmarks/results/mnist_pareto_all")
    args = ap.parse_args()
    check_variants(args.variants.split(","), args)
    rows = [r for r in sweep.saved_rows(args.out)
            if (r.get("num_epochs"), r.get("dataset")) == (args.num_epochs, args.dataset)]
    jobs = [(v, float(s), int(seed)) for v in args.variants.split(",") for s in args.sparsities.split(",")
            for seed in args.seeds.split(",")]
    rows = sweep.run_missing(args.out, jobs, rows, key=lambda r: (r["variant"], r["target_sparsity"], r["seed"]),
                             run=lambda *job: run_one(*job, args))
    accuracy, timing = table(rows), time_table(rows)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(f"Binary-ticket validation accuracy (mean ± std over seeds) @ achieved sparsity; "
                f"{args.num_epochs} epochs each.\n\n{accuracy}\n\n"
                f"Time to accuracy at target {TIME_TARGET:.2f}: steps and training seconds (evaluations excluded, "
                f"compilation included) to the first evaluation (every 100 steps) with validation accuracy >= "
                f"each threshold, mean ± std over the seeds that reached it; (k/n): k of n seeds reached it, "
                f"n/r: none did, ?: not recorded.\n\n{timing}\n")
    plot(rows, os.path.join(args.out, "pareto.png"))
    print(f"{accuracy}\n\n{timing}")


if __name__ == "__main__":
    main()
