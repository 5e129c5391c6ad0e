"""Inference speed-up and FLOPs ratio of a structured ticket compiled to a smaller dense model.

    python run.py --config configs/mnist_lenet300_crbg_structured.py --workdir runs/mnist_crbg_structured
    python benchmarks/compaction.py runs/mnist_crbg_structured/ticket [--batch 1000] [--json]

Times the jitted forward pass of the masked model (full shapes, zeros in place) and of the
compact model (pruned units deleted) on the same random inputs, checks their logits agree, and
reports the multiply-accumulate counts of both.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from slt_jax import load_ticket  # noqa: E402
from slt_jax.compaction import compact_ticket, count_macs  # noqa: E402
from slt_jax.models import create_model  # noqa: E402


def median_ms(fn, x, reps: int) -> float:
    fn(x).block_until_ready()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn(x).block_until_ready()
        times.append(time.perf_counter() - t)
    return float(np.median(times) * 1e3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("ticket")
    ap.add_argument("--batch", type=int, default=1000)
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    ticket = load_ticket(args.ticket)
    module, params = compact_ticket(ticket)
    masked = ticket.masked_params()
    shape = tuple(ticket.meta["input_shape"])
    x = jax.random.normal(jax.random.PRNGKey(0), (args.batch, *shape))
    full_fn = jax.jit(lambda x: create_model(ticket.meta["model"]).apply({"params": masked}, x))
    compact_fn = jax.jit(lambda x: module.apply({"params": jax.tree.map(jnp.asarray, params)}, x))
    max_diff = float(jnp.max(jnp.abs(full_fn(x) - compact_fn(x))))
    result = {
        "masked_ms": median_ms(full_fn, x, args.reps), "compact_ms": median_ms(compact_fn, x, args.reps),
        "masked_macs": count_macs(masked, shape), "compact_macs": count_macs(params, shape),
        "max_abs_logit_diff": max_diff, "batch": args.batch, "device": jax.devices()[0].device_kind,
    }
    result["speedup"] = result["masked_ms"] / result["compact_ms"]
    result["flops_ratio"] = result["compact_macs"] / result["masked_macs"]
    if args.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k:>20}: {v}")


if __name__ == "__main__":
    main()
