"""IteRand: edge-popup whose pruned weights are partly re-drawn every K steps. The re-draws touch
pruned weights only, the weights stay a function of the seed and each weight's generation, a
resumed run replays them bit for bit, and the ticket (which stores generations, no floats)
regenerates exactly the weights the run computed with."""
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from slt_jax import load_ticket, masking
from slt_jax.frozen import redrawn_weights
from slt_jax.methods import IteRand
from slt_jax.checkpoint import Checkpointer
from slt_jax.run_config import ConfigError, fingerprint, validate_config
from slt_jax.ticket import TicketError
from slt_jax.train import Run, data_fingerprint, train_and_evaluate

from conftest import assert_same_ticket, run_default_cli, verify_on_digits_test_split

SHAPE = (200, 50)


def _tree(value):
    return {"Dense_0": {"kernel": value, "bias": None}}


def test_a_redraw_replaces_a_fraction_of_the_pruned_weights_and_no_kept_one():
    method = IteRand(num_steps=1000, sparsity=0.7, redraw_every=100, redraw_fraction=0.25)
    scores = _tree(jax.random.normal(jax.random.PRNGKey(0), SHAPE))
    params = {"Dense_0": {"kernel": jnp.zeros(SHAPE), "bias": jnp.zeros(50)}}
    candidate = {"Dense_0": {"kernel": jnp.ones(SHAPE), "bias": jnp.ones(50)}}
    state = method.init_state(scores)
    state, new = method.redraw(jax.random.PRNGKey(1), scores, state, params, candidate, 3)
    kept = np.asarray(method.binary_masks(scores)["Dense_0"]["kernel"])
    w, g = np.asarray(new["Dense_0"]["kernel"]), np.asarray(state["generation"]["Dense_0"]["kernel"])
    assert state["generation"]["Dense_0"]["bias"] is None and np.all(np.asarray(new["Dense_0"]["bias"]) == 0)
    assert not w[kept].any() and not g[kept].any()  # kept weights: untouched, generation 0
    taken = w[~kept] == 1
    np.testing.assert_array_equal(g[~kept], np.where(taken, 3, 0))
    n = taken.size
    assert abs(taken.mean() - 0.25) < 5 * np.sqrt(0.25 * 0.75 / n)  # each pruned weight with probability r


def test_schedule_and_settings():
    method = IteRand(num_steps=1000, redraw_every=300)
    assert [t for t in range(1, 1001) if method.is_redraw_step(t)] == [300, 600, 900]
    with pytest.raises(ValueError, match="redraw_every=0; allowed: an integer >= 1"):
        IteRand(num_steps=1, redraw_every=0)
    with pytest.raises(ValueError, match=r"redraw_fraction=1.5; allowed: a number in \(0, 1\]"):
        IteRand(num_steps=1, redraw_fraction=1.5)
    with pytest.raises(ValueError, match="init_state\\(gates\\)"):
        method.init_state()


def test_replaying_generations_gives_the_weights_of_successive_redraws():
    rng = np.random.default_rng(0)
    draws = {j: _tree(rng.normal(size=SHAPE).astype(np.float32)) for j in range(4)}
    draws = {j: {"Dense_0": {"kernel": d["Dense_0"]["kernel"], "bias": np.full(3, j, np.float32)}}
             for j, d in draws.items()}
    generation = _tree(rng.integers(0, 4, SHAPE))
    out = redrawn_weights(lambda j: draws[j], generation)
    g = generation["Dense_0"]["kernel"]
    for j in range(4):
        np.testing.assert_array_equal(out["Dense_0"]["kernel"][g == j], draws[j]["Dense_0"]["kernel"][g == j])
    np.testing.assert_array_equal(out["Dense_0"]["bias"], draws[0]["Dense_0"]["bias"])  # not gated: generation 0


def _config(**overrides):
    """tiny_config (conftest.py) with IteRand re-drawing after steps 20 and 40 of 60, checkpoints at 30 and 60."""
    c = default.get_config()
    c.update(num_epochs=0, num_steps=60, batch_size=64, log_every=10, eval_every=30, checkpoint_every=30,
             num_devices=1, progress=False, plots=False, method="iterand", sparsity=0.7)
    c.iterand.redraw_every = 20
    c.update(overrides)
    return c


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A finished IteRand run (two re-draws) on the digits."""
    workdir = tmp_path_factory.mktemp("iterand") / "reference"
    train_and_evaluate(_config(), str(workdir))
    return workdir


@pytest.mark.slow  # on a 60-step IteRand run with two re-draws, like the two tests after it
def test_the_ticket_regenerates_the_weights_the_run_computed_with(reference):
    config = _config()
    run = Run(config, str(reference))
    # The run's final weights, replayed from its last checkpoint's generations.
    checkpointer = Checkpointer(str(reference / "checkpoints"), {**fingerprint(config),
                                                                  "data": data_fingerprint(run.dataset),
                                                                  **run.fingerprint()})
    state = checkpointer.restore_latest(run.initial_state())
    checkpointer.close()
    generation = jax.device_get(state.method_state["generation"])
    assert int(state.step) == 60 and {int(v) for g in jax.tree.leaves(generation) for v in np.unique(g)} == {0, 1, 2}
    run.restore_weights(state)
    weights = masking.named_leaves(jax.device_get(run.frozen_params(run.frozen)))
    ticket = load_ticket(str(reference / "ticket"))
    replayed = masking.named_leaves(ticket.frozen_params())
    for name, kept in masking.named_leaves(ticket.gate_masks).items():  # bit for bit, on every kept weight
        np.testing.assert_array_equal(np.asarray(replayed[name])[kept].view(np.uint32),
                                      np.asarray(weights[name])[kept].view(np.uint32), err_msg=name)


@pytest.mark.slow
def test_resuming_after_a_redraw_gives_the_same_ticket(reference, tmp_path):
    resumed = tmp_path / "resumed"
    shutil.copytree(reference, resumed)
    for leftover in ("checkpoints/60", "ticket", "summary.json"):  # back to step 30, after the first re-draw
        shutil.rmtree(resumed / leftover) if (resumed / leftover).is_dir() else (resumed / leftover).unlink()
    train_and_evaluate(_config(), str(resumed))
    assert_same_ticket(resumed, reference)
    assert (resumed / "ticket" / "redraws.npz").read_bytes() == (reference / "ticket" / "redraws.npz").read_bytes()


@pytest.mark.parametrize("key,value", [("structured", True), ("regenerate_frozen", True)])
def test_settings_it_cannot_replay_are_refused(key, value):
    with pytest.raises(ConfigError, match=f"method=iterand re-draws .*{key}={value}"):
        validate_config(_config(**{key: value}))


@pytest.mark.slow
def test_a_changed_or_missing_redraws_file_is_refused(reference, tmp_path):
    ticket = tmp_path / "ticket"
    shutil.copytree(reference / "ticket", ticket)
    with np.load(ticket / "redraws.npz") as f:
        arrays = {k: f[k] for k in f.files}
    name = next(k for k, g in arrays.items() if g.any())
    arrays[name] = np.zeros_like(arrays[name])  # as if the kept weights had never been re-drawn
    np.savez_compressed(ticket / "redraws.npz", **arrays)
    with pytest.raises(TicketError, match="redraws.npz is not the one saved"):
        load_ticket(str(ticket))
    (ticket / "redraws.npz").unlink()
    with pytest.raises(TicketError, match="redraws.npz is missing"):
        load_ticket(str(ticket))


@pytest.mark.slow  # the default run through run.py: minutes on 2 cores
def test_run_py_iterand_ticket_is_accepted_by_the_verifier(tmp_path):
    summary = run_default_cli(tmp_path, "--config.method=iterand", "--config.sparsity=0.8")
    assert summary["sparsity"] >= 0.79 and summary["test_accuracy"] >= 0.9, summary
    generations = np.load(tmp_path / "ticket" / "redraws.npz")
    assert any(generations[k].any() for k in generations.files)  # some kept weight is a re-drawn one
    verified = verify_on_digits_test_split(tmp_path / "ticket")
    assert verified["accuracy"] == pytest.approx(summary["test_accuracy"])
    assert verified["sparsity"] == pytest.approx(summary["sparsity"])
