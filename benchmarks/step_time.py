"""Median train-step time: dense weight training vs CRBG vs edge-popup, batch 128 (``--batch``), synthetic data.

    python benchmarks/step_time.py            # a table
    python benchmarks/step_time.py --json     # one JSON line
    python benchmarks/step_time.py --models lenet300 --reps 200

CRBG and edge-popup run the project's own jitted step (``slt_jax.step.make_train_step``) built
by the real harness (``slt_jax.train.Run``) on the ``synthetic`` dataset: the methods' masking,
penalty, optimiser and metrics are all inside the timed step. "Dense" trains the weights of the
same Flax model with the same loss and Adam, as an ordinary Flax training step would.
``crbg_gated_ms`` is the same CRBG step written as the Linen guide (docs/guide-linen.md) writes it:
``slt_jax.gated``'s module, the data loss differentiated w.r.t. the gates, ``slt_jax.with_penalty(method,
tx)`` carrying the penalty and the multiplier, the frozen weights an input of the jitted step and
never an output; it should cost what the library's step costs (``gated_over_step``). The
``*_out_mib`` / ``*_temp_mib`` columns are XLA's compiled memory analysis of the two steps: the
bytes a step returns and its scratch buffers. ``crbg_sample_ms`` times CRBG's gate sample alone (a
Gaussian per gate): the dense step plus it is a floor under the CRBG step, reported as
``crbg_floor_over_dense``.

Each step is compiled and warmed up first; every timed call ends with ``block_until_ready``.
If PyTorch is importable, the same architecture's dense and edge-popup steps in plain PyTorch
are timed too (after ours, never interleaved with them), clearly labelled ``torch_*``: a
reference for what this CPU can do.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time
from typing import Any, Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import optax  # noqa: E402

import slt_jax  # noqa: E402
from configs import default  # noqa: E402
from slt_jax import sharding  # noqa: E402
from slt_jax.step import classification_loss  # noqa: E402
from slt_jax.train import Run  # noqa: E402

BATCH = 128  # the default; --batch changes it
# resnet50 (CIFAR stem, BatchNorm statistics) is for accelerators: ``--models resnet50 --batch 256``.
INPUT_SHAPES = {"lenet300": (28, 28, 1), "conv4": (32, 32, 3), "resnet50": (32, 32, 3)}
TORCH_MODELS = ("lenet300", "conv4")


def bench_config(model: str, method: str, batch: int = BATCH, **overrides: Any) -> ml_collections.ConfigDict:
    c = default.get_config()
    c.model, c.method, c.dataset = model, method, "synthetic"
    c.synthetic_shape = INPUT_SHAPES[model]
    c.synthetic_size = max(2 * batch, 256)  # enough for the validation and test splits
    c.batch_size, c.num_epochs, c.num_steps = batch, 0, 1000
    c.num_devices, c.progress, c.plots = 1, False, False
    c.sparsity = 0.5
    for k, v in overrides.items():
        setattr(c, k, v)
    return c


def median_ms(steps: dict[str, Callable[[], Any]], reps: int, warmup: int = 3) -> dict[str, float]:
    """Median wall time in ms of each ``step()``, which must block until its result is ready.

    The steps take turns, one call each per round, so a load change on a shared machine hits
    them all alike and their ratios stay meaningful.
    """
    for step in steps.values():
        for _ in range(warmup):  # the first call compiles
            step()
    times = {name: [] for name in steps}
    for _ in range(reps):
        for name, step in steps.items():
            t = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t)
    return {name: 1e3 * statistics.median(ts) for name, ts in times.items()}


def first_batch(run: Run) -> tuple[jax.Array, jax.Array]:
    x, y = run.dataset.train_batch(0, 0, run.config.batch_size)
    return sharding.shard_batch((x, y), run.mesh)


def method_step(run: Run) -> Callable[[], Any]:
    """One call of the project's jitted step, state threaded through (it is donated)."""
    train_step = run.train_step()
    state = sharding.replicate(run.initial_state(), run.mesh)
    x, y = first_batch(run)
    holder = [state]

    def step():
        holder[0], metrics = train_step(holder[0], run.frozen, x, y)
        jax.block_until_ready((holder[0], metrics))

    return step


def sample_step(run: Run) -> Callable[[], Any]:
    """The method's training sample of the gates alone (for CRBG: one Gaussian per gate, clipped):
    work the method's step cannot skip, so ``dense_ms + crbg_sample_ms`` is a floor under ``crbg_ms``."""
    sample = jax.jit(run.method.train_masks)
    gates, key, step = run.initial_state().gates, jax.random.PRNGKey(0), jnp.int32(0)
    return lambda: jax.block_until_ready(sample(gates, key, step))


def gated_step(run: Run) -> tuple[Callable[[], Any], Any]:
    """The method's step as the Linen guide writes it: ``gated`` + ``with_penalty``, frozen weights an
    input; the step and its compiled form (for the memory analysis)."""
    method = run.method
    model = slt_jax.gated(run.model, method)
    tx = slt_jax.with_penalty(method, run.optimizer)
    state = run.initial_state()
    frozen, gates = run.frozen_params(run.frozen), state.gates
    loss_of = classification_loss()

    @functools.partial(jax.jit, donate_argnums=(0, 1))  # the gates and their optimiser state, never the weights
    def train_step(gates, opt_state, frozen, step, key, x, y):
        def loss_fn(gates):
            logits = model.apply({"frozen": frozen, "gates": gates}, x, deterministic=False, rngs={"gates": key},
                                 step=step, train=True)
            return loss_of(logits, y)

        updates, opt_state = tx.update(jax.grad(loss_fn)(gates), opt_state, gates)
        return optax.apply_updates(gates, updates), opt_state

    holder = [gates, tx.init(gates)]
    x, y = first_batch(run)
    key = jax.random.fold_in(state.rng, 0)
    compiled = train_step.lower(*holder, frozen, jnp.int32(0), key, x, y).compile()

    def step():
        holder[:] = train_step(*holder, frozen, jnp.int32(0), key, x, y)
        jax.block_until_ready(holder)

    return step, compiled


def method_compiled(run: Run) -> Any:
    """The library's jitted step (``make_train_step``), compiled for this run's state and batch."""
    return run.train_step().lower(run.initial_state(), run.frozen, *first_batch(run)).compile()


def memory_mib(compiled: Any) -> dict[str, float]:
    """XLA's memory analysis of a compiled step: bytes it returns and scratch buffers, in MiB."""
    m = compiled.memory_analysis()
    return {"out_mib": m.output_size_in_bytes / 2**20, "temp_mib": m.temp_size_in_bytes / 2**20}


def dense_step(run: Run) -> Callable[[], Any]:
    """Ordinary weight training of the same model and loss with Adam."""
    opt, cross_entropy = optax.adam(1e-3), classification_loss()

    mutable = list(run.initial_model_state)  # BatchNorm statistics, updated as in the method step

    @jax.jit
    def train_step(params, model_state, opt_state, x, y):
        def loss_fn(p):
            logits, new_state = run.model.apply({"params": p, **model_state}, x, train=True, mutable=mutable)
            return cross_entropy(logits, y), (jnp.mean(jnp.argmax(logits, -1) == y), new_state)

        (loss, (acc, model_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), model_state, opt_state, {"loss": loss, "train_accuracy": acc}

    params = run.frozen_params(run.frozen)
    holder = [params, run.initial_model_state, opt.init(params)]
    x, y = first_batch(run)

    def step():
        params, model_state, opt_state, metrics = train_step(*holder, x, y)
        holder[:] = params, model_state, opt_state
        jax.block_until_ready((holder, metrics))

    return step


def torch_steps(model: str, batch: int = BATCH) -> dict[str, Callable[[], Any]]:
    """Reference steps in plain PyTorch (NCHW), if torch is importable: the same architecture's
    dense Adam step, and edge-popup as its reference code does it (a full sort of |scores| per
    layer per forward, straight-through backward, SGD with momentum on the scores)."""
    if model not in TORCH_MODELS:
        return {}
    try:
        import torch
        from torch import nn
        from torch.nn import functional as F
    except ImportError:
        return {}

    class TopK(torch.autograd.Function):
        @staticmethod
        def forward(ctx, scores, density):
            mask = torch.zeros_like(scores)
            _, idx = scores.abs().flatten().sort()
            mask.view(-1)[idx[int((1 - density) * scores.numel()):]] = 1
            return mask

        @staticmethod
        def backward(ctx, grad):
            return grad, None

    class Masked(nn.Module):
        def __init__(self, layer: nn.Module):
            super().__init__()
            self.layer = layer
            layer.weight.requires_grad_(False)
            self.scores = nn.Parameter(torch.empty_like(layer.weight).uniform_(-0.01, 0.01))

        def forward(self, x):
            w = self.layer.weight * TopK.apply(self.scores, 0.5)
            if isinstance(self.layer, nn.Linear):
                return F.linear(x, w)
            return F.conv2d(x, w, padding=1)

    def net(masked: bool) -> nn.Module:
        wrap = Masked if masked else (lambda layer: layer)
        if model == "lenet300":
            dims = [784, 300, 100, 10]
            layers = [nn.Flatten()]
        else:
            layers = []
            for cin, cout in [(3, 64), (64, 64), (64, 128), (128, 128)]:
                layers += [wrap(nn.Conv2d(cin, cout, 3, padding=1, bias=False)), nn.ReLU()]
                if cout == cin:  # the second conv of a pair
                    layers.append(nn.MaxPool2d(2))
            dims = [8192, 256, 256, 10]
            layers.append(nn.Flatten())
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
            layers += [wrap(nn.Linear(a, b, bias=False))] + ([nn.ReLU()] if i < len(dims) - 2 else [])
        return nn.Sequential(*layers)

    x = torch.randn(batch, *((1, 28, 28) if model == "lenet300" else (3, 32, 32)))
    y = torch.randint(0, 10, (batch,))

    def step_of(module: nn.Module, opt: torch.optim.Optimizer) -> Callable[[], Any]:
        def step():
            opt.zero_grad()
            F.cross_entropy(module(x), y).backward()
            opt.step()
        return step

    dense, popup = net(False), net(True)
    return {"torch_dense_ms": step_of(dense, torch.optim.Adam(dense.parameters(), 1e-3)),
            "torch_edgepopup_ms": step_of(popup, torch.optim.SGD([p for p in popup.parameters() if p.requires_grad],
                                                                 0.1, momentum=0.9))}


def gated_memory(run: Run, gated_compiled: Any) -> dict[str, float]:
    """The Linen guide's step and the library's step, side by side: bytes out and scratch, in MiB."""
    ours = memory_mib(method_compiled(run))
    gated = memory_mib(gated_compiled)
    return {"crbg_out_mib": ours["out_mib"], "crbg_gated_out_mib": gated["out_mib"],
            "crbg_temp_mib": ours["temp_mib"], "crbg_gated_temp_mib": gated["temp_mib"]}


def measure(model: str, reps: int, batch: int = BATCH) -> dict[str, float]:
    runs = {m: Run(bench_config(model, m, batch), "") for m in ("crbg", "edgepopup")}
    steps = {"dense_ms": dense_step(runs["crbg"]), "crbg_ms": method_step(runs["crbg"]),
             "edgepopup_ms": method_step(runs["edgepopup"]), "crbg_sample_ms": sample_step(runs["crbg"])}
    memory = {}
    if not runs["crbg"].initial_model_state:  # the gated() user step here keeps no BatchNorm statistics
        steps["crbg_gated_ms"], compiled = gated_step(runs["crbg"])
        memory = gated_memory(runs["crbg"], compiled)
    out = median_ms(steps, reps)
    out.update(memory)
    # Timed apart from ours: PyTorch's OpenMP threads keep spinning after each op and would steal
    # the cores from the XLA step that follows (interleaved, they made our dense Conv4 step 1.7x slower).
    out.update(median_ms(torch_steps(model, batch), reps))
    out["crbg_over_dense"] = out["crbg_ms"] / out["dense_ms"]
    out["crbg_floor_over_dense"] = (out["dense_ms"] + out["crbg_sample_ms"]) / out["dense_ms"]
    out["edgepopup_over_dense"] = out["edgepopup_ms"] / out["dense_ms"]
    if "crbg_gated_ms" in out:
        out["gated_over_step"] = out["crbg_gated_ms"] / out["crbg_ms"]
    if "torch_dense_ms" in out:
        out["torch_edgepopup_over_dense"] = out["torch_edgepopup_ms"] / out["torch_dense_ms"]
        out["torch_edgepopup_over_ours"] = out["torch_edgepopup_ms"] / out["edgepopup_ms"]
    return {k: round(v, 3) for k, v in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON line instead of a table")
    parser.add_argument("--models", default="lenet300,conv4", help=f"comma-separated: {', '.join(INPUT_SHAPES)}")
    parser.add_argument("--batch", type=int, default=BATCH, help="global batch size")
    parser.add_argument("--reps", type=int, default=100, help="timed steps per measurement")
    args = parser.parse_args()
    unknown = sorted(set(args.models.split(",")) - set(INPUT_SHAPES))
    if unknown or args.batch < 1:
        parser.error(f"--models={args.models} --batch={args.batch}; allowed: models among {', '.join(INPUT_SHAPES)}, "
                     "batch >= 1")
    results = {m: measure(m, args.reps, args.batch) for m in args.models.split(",")}
    if args.json:
        print(json.dumps(results))
        return
    print(f"{jax.devices()[0].device_kind}, {os.cpu_count()} CPUs, batch {args.batch}, median of {args.reps} steps (ms)")
    for m, r in results.items():
        print(f"{m}:")
        for k, v in r.items():
            print(f"  {k:28s}{v:10.3f}")


if __name__ == "__main__":
    main()
