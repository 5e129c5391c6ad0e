"""Data parallelism on 8 simulated CPU devices: the batch is split over ``data``, the state is
replicated, the gate noise is the same on every device count, one step differs only by float
summation order, and every device count finds an equally good ticket."""
import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from slt_jax import load_ticket, masking, sharding
from slt_jax.run_config import ConfigError
from slt_jax.train import Run, train_and_evaluate

from conftest import ROOT


def test_shard_batch_splits_rows_over_devices():
    mesh = sharding.make_mesh(8)
    x = np.arange(64 * 3, dtype=np.float32).reshape(64, 3)
    y = np.arange(64, dtype=np.int32)
    xs, ys = sharding.shard_batch((x, y), mesh)
    for global_array, host in ((xs, x), (ys, y)):
        assert global_array.sharding.spec == P("data") and global_array.shape == host.shape
        shards = sorted(global_array.addressable_shards, key=lambda s: s.index[0].start)
        assert len({s.device for s in shards}) == 8
        for i, shard in enumerate(shards):  # device i holds rows 8i .. 8i+7, and only those
            np.testing.assert_array_equal(np.asarray(shard.data), host[8 * i:8 * (i + 1)])


def test_train_step_keeps_state_replicated_and_batch_sharded(tiny_config, tmp_path):
    tiny_config.num_devices = 8
    run = Run(tiny_config, str(tmp_path))
    state = sharding.replicate(run.initial_state(), run.mesh)
    step = run.train_step()
    xs, ys = sharding.shard_batch(run.dataset.train_batch(0, 0, tiny_config.batch_size), run.mesh)
    assert xs.sharding.spec == P("data") and len(xs.sharding.device_set) == 8
    new_state, metrics = step(state, run.frozen, xs, ys)
    for leaf in jax.tree.leaves(new_state) + jax.tree.leaves(metrics) + jax.tree.leaves(run.frozen):
        assert leaf.sharding.is_fully_replicated and len(leaf.sharding.device_set) == 8
    # Replicated gates and one replicated key: every device computed the same gate values.
    for leaf in jax.tree.leaves(new_state.gates):
        shards = [np.asarray(s.data) for s in leaf.addressable_shards]
        assert all(np.array_equal(shards[0], s) for s in shards[1:])


def _gates(ticket_dir) -> dict[str, np.ndarray]:
    """A ticket's binary gates keyed by leaf name."""
    return {k: np.asarray(v) for k, v in masking.named_leaves(load_ticket(str(ticket_dir)).gate_masks).items()}


@pytest.fixture(scope="module")
def runs_by_device_count(tmp_path_factory):
    from configs import default

    out = {}
    for n in (1, 2, 8):
        c = default.get_config()
        c.num_epochs, c.num_steps, c.batch_size, c.log_every, c.eval_every, c.checkpoint_every = 0, 60, 64, 10, 30, 0
        c.progress = c.plots = False
        c.num_devices = n
        workdir = tmp_path_factory.mktemp(f"devices{n}")
        train_and_evaluate(c, str(workdir))
        records = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
        out[n] = (records, _gates(workdir / "ticket"))
    return out


@pytest.mark.slow  # a step compiled on 2 and on 8 devices
@pytest.mark.parametrize("n", [2, 8])
def test_device_count_changes_one_step_only_by_summation_order(tiny_config, tmp_path, n):
    """From the same state and batch, one step on n devices draws bit-identical gate noise and
    differs from one device only by float summation order. Across steps such differences grow
    (a near-zero gradient whose sign flips moves a gate by Adam's full step), and how XLA:CPU
    orders its sums depends on the CPU, so no later step is compared."""
    outputs = {}
    for devices in (1, n):
        tiny_config.num_devices = devices
        run = Run(tiny_config, str(tmp_path))
        state = jax.device_put(run.initial_state(), sharding.replicated(run.mesh), may_alias=False)
        key = jax.random.fold_in(state.rng, state.step)
        noise = jax.device_get(run.method.train_masks(state.gates, key, state.step))
        xs, ys = sharding.shard_batch(run.dataset.train_batch(0, 0, tiny_config.batch_size), run.mesh)
        new_state, metrics = run.train_step()(state, run.frozen, xs, ys)
        outputs[devices] = noise, float(metrics["cross_entropy"]), jax.device_get(new_state.gates)
    (noise1, ce1, gates1), (noise_n, ce_n, gates_n) = outputs[1], outputs[n]
    for a, b in zip(jax.tree.leaves(noise1), jax.tree.leaves(noise_n)):
        np.testing.assert_array_equal(np.asarray(a).view(np.uint32), np.asarray(b).view(np.uint32))
    assert abs(ce_n - ce1) <= 1e-5 * abs(ce1)
    diff = np.concatenate([np.abs(np.ravel(a) - np.ravel(b)) for a, b in zip(jax.tree.leaves(gates1),
                                                                            jax.tree.leaves(gates_n))])
    assert np.mean(diff > 1e-3) <= 1e-3, np.max(diff)


@pytest.mark.slow  # three 60-step runs, on 1, 2 and 8 devices
@pytest.mark.parametrize("n", [2, 8])
def test_device_count_gives_an_equally_good_ticket(runs_by_device_count, n):
    ref_records, ref_masks = runs_by_device_count[1]
    records, masks = runs_by_device_count[n]
    assert [r["step"] for r in records] == [r["step"] for r in ref_records]
    assert masks.keys() == ref_masks.keys() and all(masks[k].shape == ref_masks[k].shape for k in masks)
    final, ref = records[-1], ref_records[-1]
    assert min(final["val_accuracy"], ref["val_accuracy"]) >= 0.8
    assert abs(final["val_accuracy"] - ref["val_accuracy"]) <= 0.1
    assert abs(final["sparsity"] - ref["sparsity"]) <= 0.02


def test_batch_that_does_not_divide_over_devices_is_refused(tiny_config, tmp_path):
    tiny_config.num_devices = 8
    tiny_config.batch_size = 60
    with pytest.raises(ConfigError, match=r"batch_size=60 does not divide over 8 devices; allowed: a multiple of 8"):
        train_and_evaluate(tiny_config, str(tmp_path))
    assert not (tmp_path / "checkpoints").exists()


MULTIPROCESS_DRIVER = """
import os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
os.environ["JAX_PLATFORMS"] = "cpu"
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU collectives across processes
process_id, port, workdir = int(sys.argv[1]), sys.argv[2], sys.argv[3]
jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=process_id)
from configs import default
from slt_jax.train import train_and_evaluate
c = default.get_config()
c.num_epochs, c.num_steps, c.batch_size, c.log_every, c.eval_every, c.checkpoint_every = 0, 20, 64, 10, 20, 10
c.progress = c.plots = False
train_and_evaluate(c, workdir)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # two jax.distributed processes and a reference run
def test_two_processes_find_the_ticket_of_one(tmp_path):
    """2 processes x 2 CPU devices under jax.distributed (each feeding its half of every batch,
    orbax saving collectively, process 0 writing files) against 1 process x 4 devices."""
    from configs import default

    driver = tmp_path / "driver.py"
    driver.write_text(MULTIPROCESS_DRIVER)
    port, multi = str(_free_port()), tmp_path / "multi"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | {"PYTHONPATH": ROOT}
    procs = [subprocess.Popen([sys.executable, str(driver), str(i), port, str(multi)], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    for p in procs:
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0, out[-3000:]

    c = default.get_config()
    c.num_epochs, c.num_steps, c.batch_size, c.log_every, c.eval_every, c.checkpoint_every = 0, 20, 64, 10, 20, 10
    c.progress = c.plots = False
    c.num_devices = 4
    single = tmp_path / "single"
    train_and_evaluate(c, str(single))

    assert sorted(os.listdir(multi / "checkpoints")) == ["10", "20"]
    losses = [[json.loads(line)["loss"] for line in open(d / "metrics.jsonl")] for d in (multi, single)]
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-4)
    a, b = (_gates(d / "ticket") for d in (multi, single))
    agree = sum(int((a[k] == b[k]).sum()) for k in b) / sum(m.size for m in b.values())
    assert agree >= 0.995
