"""Memory options of the harness: bfloat16 frozen weights, frozen weights regenerated in the step.

Neither option may change what is computed beyond the documented rounding: regeneration gives the
stored path's ticket bit for bit, and a bfloat16 ticket reloads the bf16-rounded weights it was
trained on.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from slt_jax import load_ticket, masking
from slt_jax.frozen import frozen_storage, init_variables, round_frozen
from slt_jax.models import create_model
from slt_jax.run_config import ConfigError
from slt_jax.ticket import ZOO_INIT_KWARGS
from slt_jax.train import Run, train_and_evaluate

# Regeneration is compared on bfloat16, where it must reproduce the rounding too; its float32
# weights are checked bit for bit below without a full run.
OPTIONS = [("float32", False), ("bfloat16", False), ("bfloat16", True)]


def _config(base, frozen_dtype="float32", regenerate=False, **overrides):
    c = base.copy_and_resolve_references()
    c.num_steps, c.log_every, c.eval_every = 20, 10, 20
    c.frozen_dtype, c.regenerate_frozen = frozen_dtype, regenerate
    for k, v in overrides.items():
        setattr(c, k, v)
    return c


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One short run per (frozen_dtype, regenerate_frozen): (summary, ticket directory)."""
    base = default.get_config()  # tiny_config's settings; that fixture is per test, these runs per module
    base.num_epochs, base.batch_size, base.checkpoint_every, base.num_devices = 0, 64, 0, 1
    base.progress, base.plots = False, False
    out = {}
    for dtype, regen in OPTIONS:
        workdir = str(tmp_path_factory.mktemp(f"{dtype}-{regen}"))
        out[dtype, regen] = (train_and_evaluate(_config(base, dtype, regen), workdir), f"{workdir}/ticket")
    return out


def _zoo_params(spec, input_shape, seed):
    """A zoo model's weights from the seed, as runs and tickets draw them."""
    return init_variables(create_model(spec), input_shape, seed, ZOO_INIT_KWARGS)["params"]


def _flat(tree):
    return {k: np.asarray(v) for k, v in masking.named_leaves(tree).items() if v is not None}


@pytest.mark.slow  # on the module's runs, one per storage option, like the two other tests of `runs`
def test_regenerated_frozen_gives_the_stored_paths_ticket(runs):
    (stored, stored_dir), (regen, regen_dir) = runs["bfloat16", False], runs["bfloat16", True]
    a, b = (_flat(load_ticket(d).gate_masks) for d in (stored_dir, regen_dir))
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])
    for key in ("val_accuracy", "stochastic_val_accuracy", "sparsity"):
        assert stored[key] == regen[key], key


@pytest.mark.parametrize("weight_init", ["signed_kaiming", "kaiming_normal", "uniform"])
def test_weights_regenerated_in_jit_are_bit_identical(weight_init):
    spec = {"name": "digits_mlp", "num_classes": 10, "weight_init": weight_init, "init_scale": None,
            "use_bias": True, "width": 0.25}
    model, params = create_model(spec), _zoo_params(spec, (8, 8, 1), seed=3)
    for dtype in ("float32", "bfloat16"):
        rounded = round_frozen(params, dtype)  # what Run hands frozen_storage
        stored = frozen_storage(model, rounded, (8, 8, 1), 3, dtype, False, ZOO_INIT_KWARGS)
        regen = frozen_storage(model, rounded, (8, 8, 1), 3, dtype, True, ZOO_INIT_KWARGS)
        assert sum(np.size(leaf) for leaf in jax.tree.leaves(regen.stored)) <= 2  # only the seed's key, no weights
        a, b = _flat(jax.jit(stored.to_params)(stored.stored)), _flat(jax.jit(regen.to_params)(regen.stored))
        expected = _flat(rounded)
        assert a.keys() == b.keys() == expected.keys()
        for name in a:
            assert a[name].dtype == b[name].dtype == np.float32
            np.testing.assert_array_equal(a[name], b[name], err_msg=f"{dtype} {name}")
            np.testing.assert_array_equal(a[name], expected[name], err_msg=f"{dtype} {name}")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_frozen_weights_never_change(tiny_config, dtype):
    run = Run(_config(tiny_config, dtype), "")
    before = jax.tree.map(np.array, run.frozen)
    step = run.train_step()
    state = run.initial_state()
    x, y = run.dataset.train_batch(0, 0, run.config.batch_size)
    for _ in range(2):
        state, _ = step(state, run.frozen, jnp.asarray(x), jnp.asarray(y))
    after = jax.tree.map(np.array, run.frozen)
    assert jax.tree.structure(before) == jax.tree.structure(after)
    for b, a in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)
    assert int(state.step) == 2


def test_bfloat16_storage_halves_the_frozen_bytes(tiny_config):
    def nbytes(tree):
        return sum(leaf.nbytes for leaf in jax.tree.leaves(tree))

    f32, bf16 = Run(_config(tiny_config, "float32"), ""), Run(_config(tiny_config, "bfloat16"), "")
    assert all(leaf.dtype == jnp.bfloat16 for leaf in jax.tree.leaves(bf16.frozen))
    assert 2 * nbytes(bf16.frozen) == nbytes(f32.frozen)
    assert nbytes(Run(_config(tiny_config, "float32", True), "").frozen) < 64  # only the seed's key


@pytest.mark.slow
def test_bfloat16_ticket_loads_the_weights_it_was_trained_on(runs, tiny_config):
    _, ticket_dir = runs["bfloat16", False]
    ticket = load_ticket(ticket_dir)
    assert ticket.meta["frozen_dtype"] == "bfloat16"
    raw = _zoo_params(ticket.meta["model"], tuple(ticket.meta["input_shape"]), ticket.meta["seed"])
    expected = {k: np.asarray(v, jnp.bfloat16).astype(np.float32) for k, v in _flat(raw).items()}
    frozen, masked = _flat(ticket.frozen_params()), _flat(ticket.masked_params())
    assert any(not np.array_equal(expected[k], _flat(raw)[k]) for k in expected)  # the rounding is real
    for name, mask in _flat(ticket.gate_masks).items():
        np.testing.assert_array_equal(frozen[name], expected[name])
        np.testing.assert_array_equal(masked[name], np.where(mask, expected[name], 0.0))
    # The weights the run evaluated its ticket with are the ones the ticket reloads.
    run = Run(_config(tiny_config, "bfloat16"), "")
    for name, w in _flat(run.frozen_params(run.frozen)).items():
        np.testing.assert_array_equal(w, frozen[name])


@pytest.mark.slow
def test_float32_ticket_is_unrounded(runs):
    ticket = load_ticket(runs["float32", False][1])
    assert ticket.meta["frozen_dtype"] == "float32"
    raw = _zoo_params(ticket.meta["model"], tuple(ticket.meta["input_shape"]), ticket.meta["seed"])
    for name, w in _flat(raw).items():
        np.testing.assert_array_equal(_flat(ticket.frozen_params())[name], w)


def test_optimizer_state_scales_with_gates_not_weights(tiny_config):
    """Structured gates: a few hundred gates over ~85k weights; Adam keeps two moments per gate only."""
    run = Run(_config(tiny_config, structured=True), "")
    state = run.initial_state()
    gate_bytes = sum(g.nbytes for g in jax.tree.leaves(state.gates))
    opt_bytes = sum(leaf.nbytes for leaf in jax.tree.leaves(state.opt_state) if leaf.size > 1)
    weight_bytes = sum(w.nbytes for w in jax.tree.leaves(run.frozen))
    assert opt_bytes == 2 * gate_bytes
    assert opt_bytes < weight_bytes / 50


def test_unknown_frozen_dtype_is_refused(tiny_config):
    with pytest.raises(ConfigError, match=r"frozen_dtype='float16'; allowed: float32, bfloat16"):
        Run(_config(tiny_config, "float16"), "")

