"""What makes CRBG's tickets better or worse than edge-popup's at 80-95% sparsity (issue 14).

    python benchmarks/crbg_study.py --cells all --targets 0.9 --seeds 0              # screen, MNIST
    python benchmarks/crbg_study.py --cells crbg,edgepopup_layer,edgepopup_global --targets 0.9,0.95 --seeds 0,1,2
    python benchmarks/crbg_study.py --cells crbg,edgepopup_global --targets 0.9 --seeds 0 --num_epochs 50
    python benchmarks/crbg_study.py --datasets mnist_shifted,digits --cells crbg,edgepopup_layer,edgepopup_global --targets 0.9 --seeds 0,1,2
    python benchmarks/crbg_study.py --datasets mnist,mnist_shifted --cells crbg_per_layer,crbg_erk,crbg_fan_in --seeds 0,1,2
    python benchmarks/crbg_study.py --dataset npz:PATH --datasets mnist,mnist_rotated   # MNIST from local arrays

The allocation cells give CRBG a fixed split of the budget over the layers
(``crbg.density_constraint``, ``slt_jax.methods.crbg``): uniform (per-layer edge-popup's), ERK, or
``fan_in``, the split global edge-popup's initial scores U(+-1/sqrt(fan_in)) make, so the two
methods can be compared at one allocation. ``crbg_margin*`` bound the gates (``crbg.gate_margin``).

A cell is one method and recipe: CRBG (configs/mnist_lenet300_crbg.py) with one change, or
edge-popup (configs/mnist_lenet300_edgepopup.py) per layer or with a global top-k. Every cell runs
LeNet-300-100 with the same data, seeds, loss (``logit_scale=5``), batch, epochs and evaluation;
accuracy is the binary ticket's on the validation split carved from the training data (test sets
are not used). ``--dataset`` is where MNIST comes from: ``mnist`` (TFDS, the default) or
``npz:PATH`` with the 60,000-image training set as ``x_train``, ``y_train`` (the committed results
were measured on such arrays; their rows say ``"source": "npz:..."``). The study's datasets
(``--datasets``, its table's columns):

* ``mnist``: that data;
* ``mnist_shifted``: the same images, each moved by its own random offset of up to 5 pixels
  in x and y (zeros shifted in; offsets from a fixed seed), written once to OUT/data/SOURCE
  (SOURCE: ``--dataset`` as a file name, e.g. ``mnist``): for an MLP a task of another kind, since
  no weight sees the same pixel twice;
* ``mnist_rotated``: the same images, each turned by its own random angle of up to 60 degrees
  (bilinear, angles from a fixed seed), added after the study's recipes were chosen: data nobody
  here tuned on. (Inverted digits would not be: inputs are standardised, so 255 - x becomes -x,
  which random weights symmetric about 0 cannot tell from x.)
* ``digits``: scikit-learn's 8x8 digits, the default run's data and budget (60 epochs at batch 64).

Writes OUT/results.jsonl (one row per run, with the ``--dataset`` it read as ``source``; a rerun
skips the runs it holds for that source, so phases add up), OUT/table.md (mean ± std over seeds @
achieved sparsity, one row per cell, one column per dataset, target and epochs; the MNIST columns
from the rows of the current source) and prints the table. A row does not record the code that
made it: delete the file after changing the code, and OUT/runs too (a run whose workdir holds a
final checkpoint resumes from it instead of training again).
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from collections import defaultdict
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import sweep  # noqa: E402
from benchmarks.mnist_pareto import accuracy_cell  # noqa: E402
from configs import mnist_lenet300_crbg, mnist_lenet300_edgepopup, mnist_zoo  # noqa: E402

MAX_SHIFT = 5
MAX_ANGLE = 60.0
DIGITS_BUDGET = {"num_epochs": 60, "batch_size": 64}  # the default run's; --num_epochs is MNIST's

# Every CRBG cell starts from the paper's objective held by the PI multiplier alone (the recipe the
# study was run on, before the shift onto the target became CRBG's default); the shift cells turn it on.
PI_LANDING = {"crbg.shift_onto_target": False, "crbg.target_ramp": 0.0}
# cell -> (base config, overrides as dotted keys). One change from the recipe per CRBG cell.
CELLS: dict[str, tuple[str, dict[str, Any]]] = {
    "crbg": ("crbg", {}),
    "edgepopup_layer": ("edgepopup", {}),
    "edgepopup_global": ("edgepopup", {"edgepopup.scope": "global"}),
    "crbg_lr0.02": ("crbg", {"learning_rate": 0.02}),
    "crbg_lr0.1": ("crbg", {"learning_rate": 0.1}),
    "crbg_cosine": ("crbg", {"lr_schedule": "cosine"}),
    "crbg_sigma0.25": ("crbg", {"crbg.temp_start": 0.25, "crbg.temp_end": 0.25}),
    "crbg_sigma1": ("crbg", {"crbg.temp_start": 1.0, "crbg.temp_end": 1.0}),
    "crbg_sigma1to0.1": ("crbg", {"crbg.temp_start": 1.0, "crbg.temp_end": 0.1}),
    "crbg_rank": ("crbg", {"crbg.binary_rule": "rank"}),
    "crbg_no_decision": ("crbg", {"crbg.decision_weight": 0.0}),
    "crbg_decision3": ("crbg", {"crbg.decision_weight": 3.0}),
    "crbg_dual_ascent": ("crbg", {"crbg.dual_kp": 0.0}),
    "crbg_hard_concrete": ("crbg", {"crbg.family": "hard_concrete"}),
    "crbg_straight_through": ("crbg", {"crbg.family": "gaussian_st"}),
    # Straight-through combined with the screen's other single changes.
    "crbg_st_lr0.02": ("crbg", {"crbg.family": "gaussian_st", "learning_rate": 0.02}),
    "crbg_st_rank": ("crbg", {"crbg.family": "gaussian_st", "crbg.binary_rule": "rank"}),
    "crbg_st_fan_in": ("crbg", {"crbg.family": "gaussian_st", "crbg.density_constraint": "fan_in"}),
    # Straight-through gates fall short of high targets: a 4x integral gain for the multiplier.
    "crbg_st_dual0.2": ("crbg", {"crbg.family": "gaussian_st", "crbg.dual_lr": 0.2}),
    "crbg_kaiming_normal": ("crbg", {"weight_init": "kaiming_normal"}),
    "edgepopup_global_kaiming_normal": ("edgepopup", {"edgepopup.scope": "global", "weight_init": "kaiming_normal"}),
    "crbg_uniform": ("crbg", {"weight_init": "uniform"}),
    "edgepopup_global_uniform": ("edgepopup", {"edgepopup.scope": "global", "weight_init": "uniform"}),
    "crbg_per_layer": ("crbg", {"crbg.density_constraint": "per_layer"}),
    "crbg_erk": ("crbg", {"crbg.density_constraint": "erk"}),
    "crbg_fan_in": ("crbg", {"crbg.density_constraint": "fan_in"}),
    "crbg_margin0.5": ("crbg", {"crbg.gate_margin": 0.5}),
    "crbg_margin1": ("crbg", {"crbg.gate_margin": 1.0}),
    # Issue 21's landing: the gates shifted onto a target ramped over 30% of the budget, every step.
    "crbg_shift": ("crbg", {"crbg.shift_onto_target": True, "crbg.target_ramp": 0.3}),
    "crbg_st_shift": ("crbg", {"crbg.family": "gaussian_st", "crbg.shift_onto_target": True,
                               "crbg.target_ramp": 0.3}),
    # The shift per leaf: every gated leaf held on its own ramped target, as per-layer top-k holds it.
    "crbg_shift_per_layer": ("crbg", {"crbg.shift_onto_target": True, "crbg.target_ramp": 0.3,
                                      "crbg.density_constraint": "per_layer"}),
    "crbg_shift_fan_in": ("crbg", {"crbg.shift_onto_target": True, "crbg.target_ramp": 0.3,
                                   "crbg.density_constraint": "fan_in"}),
    "crbg_st_shift_per_layer": ("crbg", {"crbg.family": "gaussian_st", "crbg.shift_onto_target": True,
                                         "crbg.target_ramp": 0.3, "crbg.density_constraint": "per_layer"}),
    # The per-layer shift with one more change (the zoo's ConvNets).
    **{f"crbg_spl_{name}": ("crbg", {"crbg.shift_onto_target": True, "crbg.target_ramp": 0.3,
                                     "crbg.density_constraint": "per_layer", **change})
       for name, change in {"sigma0.25": {"crbg.temp_start": 0.25, "crbg.temp_end": 0.25},
                            "sigma0.5to0.1": {"crbg.temp_end": 0.1},
                            "lr0.1": {"learning_rate": 0.1},
                            "cosine": {"lr_schedule": "cosine"},
                            "no_decision": {"crbg.decision_weight": 0.0}}.items()},
    # The zoo screen's best changes to the default: the noise annealed to sigma 0.05 with the decision
    # term 100x (the trained network then computes with nearly binary gates), and with straight-through gates.
    "crbg_shift_anneal_decide": ("crbg", {"crbg.shift_onto_target": True, "crbg.target_ramp": 0.3,
                                          "crbg.temp_end": 0.05, "crbg.decision_weight": 100.0}),
    "crbg_st_shift_anneal_decide": ("crbg", {"crbg.family": "gaussian_st", "crbg.shift_onto_target": True,
                                             "crbg.target_ramp": 0.3, "crbg.temp_end": 0.05,
                                             "crbg.decision_weight": 100.0}),
}
DATASETS = ("mnist", "mnist_shifted", "mnist_rotated", "digits")
# The models: LeNet-300-100 (the recipe's configs) and the zoo (configs/mnist_zoo.py, its width, loss
# temperature and budget; MNIST-derived datasets only).
MODELS = ("lenet300", *mnist_zoo.MODELS)


def shifted(x: np.ndarray) -> np.ndarray:
    """Every (N, H, W) image moved by its own offset in [-MAX_SHIFT, MAX_SHIFT]^2 (seed 0), zeros shifted in."""
    h, w = x.shape[1:3]
    offsets = np.random.default_rng(0).integers(-MAX_SHIFT, MAX_SHIFT + 1, size=(len(x), 2))
    pad = np.pad(x, ((0, 0), (MAX_SHIFT, MAX_SHIFT), (MAX_SHIFT, MAX_SHIFT)))
    out = np.empty_like(x)
    for i, (dy, dx) in enumerate(offsets):
        out[i] = pad[i, MAX_SHIFT - dy:MAX_SHIFT - dy + h, MAX_SHIFT - dx:MAX_SHIFT - dx + w]
    return out


def rotated(x: np.ndarray) -> np.ndarray:
    """Every image turned about its centre by its own angle in [-MAX_ANGLE, MAX_ANGLE] degrees (seed 0)."""
    from scipy import ndimage

    angles = np.random.default_rng(0).uniform(-MAX_ANGLE, MAX_ANGLE, size=len(x))
    out = np.empty_like(x)
    for i, angle in enumerate(angles):
        out[i] = np.clip(ndimage.rotate(x[i].astype(np.float32), angle, reshape=False, order=1), 0, 255)
    return out


# derived dataset -> the transform of MNIST's images that makes it (labels unchanged)
DERIVED = {"mnist_shifted": shifted, "mnist_rotated": rotated}


def slug(source: str) -> str:
    """``source`` as a file name: mnist -> mnist, npz:/data/mnist.npz -> npz_data_mnist_npz."""
    return re.sub(r"[^A-Za-z0-9]+", "_", source).strip("_")


def write_derived(name: str, source: str, path: str) -> None:
    """OUT/data's copy of ``source``'s training set (``npz:PATH`` or a TFDS name) transformed into ``name``."""
    from slt_jax.data import training_arrays

    x, y = training_arrays(source)
    if x.ndim == 4 and x.shape[-1] == 1:  # TFDS stores MNIST as (N, 28, 28, 1); the transforms take (N, H, W)
        x = x[..., 0]
    tmp = path + ".tmp.npz"
    np.savez(tmp, x_train=DERIVED[name](x), y_train=y)
    os.replace(tmp, path)


def dataset_overrides(name: str, source: str, out: str) -> dict[str, Any]:
    """The config keys that select ``name`` made from ``source`` (and, for digits, its budget)."""
    if name == "mnist":
        return {"dataset": source}
    if name in DERIVED:
        path = os.path.join(out, "data", slug(source), f"{name}.npz")
        if not os.path.exists(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            write_derived(name, source, path)
        return {"dataset": f"npz:{path}"}
    return {"dataset": "digits", **DIGITS_BUDGET}


def base_config(model: str, base: str, num_epochs: int | None) -> ml_collections.ConfigDict:
    """The recipe a cell changes: LeNet's own configs (``num_epochs``), or the zoo's config of
    ``model`` with its own budget unless ``num_epochs`` is given."""
    if model == "lenet300":
        config = (mnist_lenet300_crbg if base == "crbg" else mnist_lenet300_edgepopup).get_config()
        config.num_epochs = num_epochs
        return config
    config = mnist_zoo.get_config(f"{model},{base}")
    if num_epochs is not None:
        config.num_epochs = num_epochs
        config.crbg.dual_lr = mnist_zoo.budget_dual_lr(num_epochs)
    return config


def cell_config(cell: str, model: str, dataset: str, target: float, seed: int, num_epochs: int | None, source: str,
                out: str) -> ml_collections.ConfigDict:
    base, overrides = CELLS[cell]
    config = base_config(model, base, num_epochs)
    landing = PI_LANDING if base == "crbg" else {}
    for key, value in {**landing, **overrides, **dataset_overrides(dataset, source, out)}.items():
        parent, _, leaf = key.rpartition(".")
        (config[parent] if parent else config)[leaf] = value
    config.sparsity, config.seed = target, seed
    config.progress, config.plots, config.checkpoint_every = False, False, 0
    return config


def run_one(cell: str, model: str, dataset: str, target: float, seed: int, num_epochs: int | None, source: str,
            out: str) -> dict[str, Any]:
    from slt_jax.train import train_and_evaluate

    config = cell_config(cell, model, dataset, target, seed, num_epochs, source, out)
    name = f"{cell}-{dataset}-s{target}-seed{seed}-e{config.num_epochs}"
    workdir = os.path.join(out, "runs", slug(source), name if model == "lenet300" else f"{model}-{name}")
    s = train_and_evaluate(config, workdir)
    return {"cell": cell, "model": model, "dataset": dataset, "source": source, "target_sparsity": target,
            "seed": seed, "num_epochs": config.num_epochs, "val_accuracy": s["val_accuracy"],
            "sparsity": s["sparsity"], "layer_sparsity": s["layer_sparsity"], "binary_gap": s["binary_gap"],
            "train_seconds": s["train_seconds"]}


def model_of(row: dict[str, Any]) -> str:
    """The row's model; rows from before the zoo joined the study are LeNet-300-100's."""
    return row.get("model", "lenet300")


def table(rows: list[dict[str, Any]]) -> str:
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        groups[(r["cell"], model_of(r), r["dataset"], r["target_sparsity"], r["num_epochs"])].append(r)
    columns = sorted({k[1:] for k in groups}, key=lambda c: (MODELS.index(c[0]), DATASETS.index(c[1]), c[2], c[3]))
    cells = [c for c in CELLS if any(k[0] == c for k in groups)]
    lines = ["| cell | " + " | ".join(f"{'' if m == 'lenet300' else m + ' '}{d} {t:.2f}, {e} ep"
                                      for m, d, t, e in columns) + " |",
             "|---" * (len(columns) + 1) + "|"]
    for cell in cells:
        out = [accuracy_cell(groups.get((cell, *column), [])) for column in columns]
        lines.append(f"| {cell} | " + " | ".join(out) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cells", default="crbg,edgepopup_layer,edgepopup_global", help="comma list, or 'all'")
    ap.add_argument("--dataset", default="mnist", help="where MNIST comes from: mnist (TFDS) or npz:PATH")
    ap.add_argument("--datasets", default="mnist", help=f"the study's columns, comma list of {', '.join(DATASETS)}")
    ap.add_argument("--targets", default="0.9")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--models", default="lenet300", help=f"comma list of {', '.join(MODELS)}")
    ap.add_argument("--num_epochs", type=int, default=None,
                    help="epochs on MNIST (default: LeNet 10, a zoo model its config's); the digits keep their own")
    ap.add_argument("--out", default="benchmarks/results/crbg_study")
    args = ap.parse_args()
    cells = list(CELLS) if args.cells == "all" else args.cells.split(",")
    models, datasets = args.models.split(","), args.datasets.split(",")
    for kind, given, allowed in (("cell", cells, CELLS), ("dataset", datasets, DATASETS), ("model", models, MODELS)):
        unknown = sorted(set(given) - set(allowed))
        if unknown:
            sys.exit(f"error: unknown {kind}(s) {unknown}; allowed: {', '.join(allowed)}")
    if "digits" in datasets and models != ["lenet300"]:
        sys.exit(f"error: --datasets digits runs LeNet-300-100 only, got --models {args.models}; allowed: lenet300")

    def epochs(model: str, dataset: str) -> int | None:
        if dataset == "digits":
            return DIGITS_BUDGET["num_epochs"]
        if model == "lenet300":
            return args.num_epochs or 10
        return args.num_epochs or int(mnist_zoo.MODELS[model]["num_epochs"])

    jobs = [(c, m, d, float(t), int(s), epochs(m, d)) for m in models for d in datasets
            for t in args.targets.split(",") for c in cells for s in args.seeds.split(",")]
    # the digits do not depend on --dataset: their rows count whatever source they were run beside
    rows = [r for r in sweep.saved_rows(args.out) if r["dataset"] == "digits" or r.get("source") == args.dataset]
    rows = sweep.run_missing(
        args.out, jobs, rows,
        key=lambda r: (r["cell"], model_of(r), r["dataset"], r["target_sparsity"], r["seed"], r["num_epochs"]),
        run=lambda *job: run_one(*job, args.dataset, args.out))
    sweep.write_table(args.out, "Binary-ticket validation accuracy (mean ± std over seeds) @ achieved sparsity; "
                      "columns without a model name: LeNet-300-100 (digits: LeNet on 8x8 inputs; the "
                      "64-256-256-10 default MLP is not used), others: configs/mnist_zoo.py's model, width and "
                      "loss temperature.", table(rows))


if __name__ == "__main__":
    main()
