"""Inference speed-up and FLOPs ratio of a structured ticket compiled to a smaller dense model.

    python run.py --config configs/mnist_lenet300_crbg_structured.py --workdir runs/mnist_crbg_structured
    python benchmarks/compaction.py runs/mnist_crbg_structured[/ticket] [--batch 1000] [--reps 50] [--multiple 1] [--json]

Any ticket ``slt_jax.compaction`` compiles: the MLPs, Conv2-Conv8, ResNet-18 (``resnet18``,
``resnet18_imagenet``; a ResNet pass at batch 1000 takes a second or more on a CPU, so pass a
small ``--reps``) and the ViTs (heads and MLP units). Times the jitted forward pass of the masked model (full shapes, zeros in place;
BatchNorm on the ticket's running statistics) and of the compact model (pruned units deleted),
interleaved, on the same random inputs, checks their logits agree, and reports the
multiply-accumulate and parameter counts of both and the compact model's widths. XLA's CPU
convolutions run markedly slower on channel counts that are not a multiple of 8 (a 15->15 3x3
conv took 1.7x the time of a 16->16 one); ``--multiple 8`` keeps closed channels up to one.
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


def median_ms(calls: dict[str, tuple], x, reps: int) -> dict[str, float]:
    """Median milliseconds of each ``fn(variables, x)``, the calls interleaved so that a load that
    changes during the benchmark (a shared machine) weighs on all of them alike."""
    for fn, variables in calls.values():
        fn(variables, x).block_until_ready()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(reps):
        for name, (fn, variables) in calls.items():
            t = time.perf_counter()
            fn(variables, x).block_until_ready()
            times[name].append(time.perf_counter() - t)
    return {name: float(np.median(ts) * 1e3) for name, ts in times.items()}


def widths(module) -> dict[str, list]:
    """The compact model's widths: kept inputs, hidden units and conv channels, or a ResNet's stem
    channels and each block's (inner, output) channels, or a ViT's (heads, MLP units) per block."""
    if getattr(module, "block_widths", None) is not None:
        return {"blocks": [list(b) for b in module.block_widths]}
    if hasattr(module, "features"):  # an MLP reading only the kept input features
        return {"inputs": [len(module.features)], **widths(module.body)}
    if hasattr(module, "blocks"):
        return {"stem": [module.stem_width], "blocks": [[b.inner, b.out] for b in module.blocks]}
    return {k: list(getattr(module, k)) for k in ("channels", "hidden", "dense") if hasattr(module, k)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("ticket")
    ap.add_argument("--batch", type=int, default=1000)
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--multiple", type=int, default=1,
                    help="keep closed units up to a multiple of this per layer (8: XLA's CPU convs run faster)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    # A run's workdir stands for its ticket/; a path that is neither, or a ticket that cannot be
    # compacted, is one line on stderr and exit 2.
    path = args.ticket
    inside = os.path.join(path, "ticket")
    if not os.path.isfile(os.path.join(path, "ticket.json")) and os.path.isfile(os.path.join(inside, "ticket.json")):
        path = inside
    try:
        ticket = load_ticket(path)
        module, variables = compact_ticket(ticket, args.multiple)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        sys.exit(2)
    # Weights go in as arguments, on the device: closed over, XLA would fold them into the program.
    masked = jax.tree.map(jnp.asarray, {"params": ticket.masked_params(), **ticket.model_state()})
    variables = jax.tree.map(jnp.asarray, variables)
    full_fn, compact_fn = jax.jit(ticket.model.apply), jax.jit(module.apply)
    shape = tuple(ticket.meta["input_shape"])
    x = jax.random.normal(jax.random.PRNGKey(0), (args.batch, *shape))
    logits = full_fn(masked, x)
    size = lambda tree: sum(int(np.size(leaf)) for leaf in jax.tree.leaves(tree))  # noqa: E731
    result = {
        "model": ticket.meta["model"]["name"],
        **median_ms({"masked_ms": (full_fn, masked), "compact_ms": (compact_fn, variables)}, x, args.reps),
        "masked_macs": count_macs(ticket.model, shape), "compact_macs": count_macs(module, shape),
        "masked_params": size(masked["params"]), "compact_params": size(variables["params"]),
        "max_abs_logit_diff": float(jnp.max(jnp.abs(logits - compact_fn(variables, x)))),
        "max_abs_logit": float(jnp.max(jnp.abs(logits))),
        "batch": args.batch, "multiple": args.multiple, "device": jax.devices()[0].device_kind,
        "compact_widths": widths(module),
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
