"""Bytes the train step holds, per frozen-weight option, and what each option costs in step time.

    python benchmarks/memory.py            # a table
    python benchmarks/memory.py --json     # one JSON line

For LeNet-300-100 and Conv4 (batch 128, synthetic data, CRBG with one gate per weight):

* ``frozen_bytes``: the step's ``frozen`` input for ``frozen_dtype`` float32 / bfloat16, and for
  ``regenerate_frozen`` (only the seed's PRNG key is held);
* ``gate_bytes`` and ``opt_state_bytes`` for CRBG (Adam: two moments per gate) and edge-popup
  (SGD momentum: one per score), and for structured CRBG (one gate per unit), which shows the
  optimiser state follows the gates, not the weights;
* XLA's own accounting of the compiled CRBG step (``argument`` and ``temp`` bytes), and the step's
  median time, per option.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

from slt_jax import sharding  # noqa: E402
from slt_jax.train import Run  # noqa: E402
from step_time import bench_config, first_batch, median_ms, method_step  # noqa: E402

OPTIONS = {"float32": {"frozen_dtype": "float32"}, "bfloat16": {"frozen_dtype": "bfloat16"},
           "regenerated": {"regenerate_frozen": True}}


def nbytes(tree: Any) -> int:
    return sum(leaf.nbytes for leaf in jax.tree.leaves(tree))


def optimiser_report(model: str) -> dict[str, Any]:
    out = {}
    for name, method, structured in (("crbg", "crbg", False), ("edgepopup", "edgepopup", False),
                                     ("crbg_structured", "crbg", True)):
        run = Run(bench_config(model, method, structured=structured), "")
        state = run.initial_state()
        out[name] = {"gates": sum(g.size for g in jax.tree.leaves(state.gates)), "gate_bytes": nbytes(state.gates),
                     "opt_state_bytes": nbytes(state.opt_state)}
        out[name]["opt_state_per_gate_byte"] = round(out[name]["opt_state_bytes"] / out[name]["gate_bytes"], 4)
    return out


def compiled_bytes(run: Run) -> dict[str, int]:
    """XLA's accounting of the compiled CRBG step: its inputs, and its scratch space."""
    step = run.train_step()
    state = sharding.replicate(run.initial_state(), run.mesh)
    x, y = first_batch(run)
    analysis = step.lower(state, run.frozen, x, y).compile().memory_analysis()
    return {"argument_bytes": int(analysis.argument_size_in_bytes), "temp_bytes": int(analysis.temp_size_in_bytes)}


def measure(model: str, reps: int) -> dict[str, Any]:
    runs = {name: Run(bench_config(model, "crbg", **opts), "") for name, opts in OPTIONS.items()}
    weights = nbytes(runs["float32"].frozen)
    frozen = {name: {"frozen_bytes": nbytes(run.frozen), "saved_bytes": weights - nbytes(run.frozen),
                     **compiled_bytes(run)} for name, run in runs.items()}
    times = median_ms({name: method_step(run) for name, run in runs.items()}, reps)
    for name in frozen:
        frozen[name]["crbg_step_ms"] = round(times[name], 3)
    return {"weights": sum(w.size for w in jax.tree.leaves(runs["float32"].frozen)), "frozen": frozen,
            "optimiser": optimiser_report(model)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON line instead of a table")
    parser.add_argument("--models", default="lenet300,conv4", help="comma-separated: lenet300, conv4")
    parser.add_argument("--reps", type=int, default=50, help="timed steps per option")
    args = parser.parse_args()
    results = {m: measure(m, args.reps) for m in args.models.split(",")}
    if args.json:
        print(json.dumps(results))
        return
    for model, r in results.items():
        print(f"{model}: {r['weights']:,} weights")
        print(f"  {'frozen option':14s}{'frozen bytes':>14s}{'saved':>12s}{'XLA args':>12s}{'XLA temp':>12s}"
              f"{'CRBG step ms':>14s}")
        for name, f in r["frozen"].items():
            print(f"  {name:14s}{f['frozen_bytes']:>14,}{f['saved_bytes']:>12,}{f['argument_bytes']:>12,}"
                  f"{f['temp_bytes']:>12,}{f['crbg_step_ms']:>14.3f}")
        print(f"  {'method':16s}{'gates':>12s}{'gate bytes':>14s}{'opt state bytes':>17s}{'per gate byte':>15s}")
        for name, o in r["optimiser"].items():
            print(f"  {name:16s}{o['gates']:>12,}{o['gate_bytes']:>14,}{o['opt_state_bytes']:>17,}"
                  f"{o['opt_state_per_gate_byte']:>15.4f}")


if __name__ == "__main__":
    main()
