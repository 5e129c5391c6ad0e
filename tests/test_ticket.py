"""Tickets: the saved format round-trips, the mask contract holds, predict() reproduces the harness's
accuracy, the independent verifier agrees, and loading needs no training stack."""
import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import slt_jax
from configs import default
from slt_jax import frozen as frozen_lib
from slt_jax import load_ticket, masking, save_ticket
from slt_jax.data import load_dataset
from slt_jax.models import create_model
from slt_jax.run_config import model_spec
from slt_jax.ticket import FORMAT_VERSION, ZOO_INIT_KWARGS
from slt_jax.train import train_and_evaluate

from conftest import short_digits_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VERIFY_TICKET = os.path.join(ROOT, "tests", "independent_verifier.py")
SPEC = {"name": "digits_mlp", "num_classes": 10, "weight_init": "signed_kaiming", "init_scale": None,
        "use_bias": True, "width": 0.1}
PREPROCESSING = {"scale": 1.0 / 16, "mean": [0.3], "std": [0.4]}


def _meta(structured):
    return {"model": SPEC, "input_shape": [8, 8, 1], "seed": 3, "preprocessing": PREPROCESSING,
            "gate_policy": masking.DEFAULT_POLICY, "structured": structured, "method": "crbg"}


def _zoo_params(spec, input_shape, seed):
    return frozen_lib.init_variables(create_model(spec), input_shape, seed, ZOO_INIT_KWARGS)["params"]


def _random_masks(structured, seed=0, params=None):
    """Random binary gates, shaped like the params (None where a leaf is not gated)."""
    params = _zoo_params(SPEC, (8, 8, 1), 3) if params is None else params
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: rng.random(s.shape) < 0.4, masking.gate_shapes(params, structured=structured))


@pytest.mark.parametrize("structured", [False, True])
def test_save_load_round_trip(structured, tmp_path):
    masks = _random_masks(structured)
    assert any(m.size % 8 for m in jax.tree.leaves(masks))  # bit packing must not pad the shapes
    path = str(tmp_path / "ticket")
    save_ticket(path, _meta(structured), _random_masks(structured, seed=1))
    save_ticket(path, _meta(structured), masks)  # overwrites the first
    ticket = load_ticket(path)
    assert ticket.meta["format_version"] == FORMAT_VERSION and ticket.meta.items() >= _meta(structured).items()
    is_none = lambda x: x is None  # noqa: E731
    assert jax.tree.structure(ticket.gate_masks, is_leaf=is_none) == jax.tree.structure(masks, is_leaf=is_none)
    loaded, masks = masking.named_leaves(ticket.gate_masks), masking.named_leaves(masks)
    assert loaded.keys() == masks.keys()
    for name, m in masks.items():
        assert loaded[name].dtype == bool and loaded[name].shape == m.shape
        np.testing.assert_array_equal(loaded[name], m)
    assert sorted(os.listdir(tmp_path)) == ["ticket"]  # no temporary or old directory left behind


@pytest.mark.parametrize("structured", [False, True])
def test_mask_contract_and_masked_params(structured, tmp_path):
    save_ticket(str(tmp_path / "t"), _meta(structured), _random_masks(structured))
    ticket = load_ticket(str(tmp_path / "t"))
    frozen = ticket.frozen_params()
    fresh = _zoo_params(SPEC, (8, 8, 1), 3)
    jax.tree.map(np.testing.assert_array_equal, frozen, fresh)

    is_none = lambda x: x is None
    assert jax.tree.structure(ticket.mask, is_leaf=is_none) == jax.tree.structure(frozen)
    masks, frozen_flat = masking.named_leaves(ticket.mask), masking.named_leaves(frozen)
    masked = masking.named_leaves(ticket.masked_params())
    gated = {n for n, m in masks.items() if m is not None}
    # Unstructured: kernels only; structured: a unit's bias shares its kernel column's gate.
    assert gated == {n for n in frozen_flat if n.endswith("kernel") or (structured and n.endswith("bias"))}
    for name, w in frozen_flat.items():
        w = np.asarray(w)
        if name in gated:
            m = np.broadcast_to(masks[name], w.shape)
            assert masks[name].dtype == bool
            expected = np.where(m, w, np.float32(0))
        else:
            expected = w
        np.testing.assert_array_equal(np.asarray(masked[name]).view(np.uint32), expected.view(np.uint32))


@pytest.fixture(scope="module")
def trained(short_run):
    """The shared short CRBG run on digits (conftest.py's short_run) and its validation split."""
    return short_run.summary, str(short_run.workdir / "ticket"), load_dataset(short_digits_config())


def test_predict_on_raw_images_reproduces_the_harness_accuracy(trained):
    summary, path, dataset = trained
    ticket = load_ticket(path)
    assert dataset.x_val.dtype == np.uint8  # raw, as the dataset stores them
    assert np.mean(ticket.predict(dataset.x_val) == dataset.y_val) == summary["val_accuracy"]
    assert np.mean(ticket.predict(dataset.x_test) == dataset.y_test) == summary["test_accuracy"]
    assert ticket.meta["metrics"]["sparsity"] == summary["sparsity"]


def test_independent_verifier_agrees_with_the_summary(trained, tmp_path):
    summary, path, dataset = trained
    data = str(tmp_path / "val.npz")
    np.savez(data, x_val=dataset.x_val, y_val=dataset.y_val)
    # A script's own folder leads sys.path; PYTHONPATH points its `import slt_jax` at this checkout.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, VERIFY_TICKET, path, data, "--x", "x_val", "--y", "y_val"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["accuracy"] == summary["val_accuracy"]
    assert report["sparsity"] == pytest.approx(summary["sparsity"], abs=1e-12)
    assert report["gated_weights"] == summary["gated_weights"]


TRAINING_STACK = ("orbax", "orbax.checkpoint", "tqdm", "slt_jax.train", "slt_jax.checkpoint", "tensorflow", "sklearn")


def test_a_ticket_loads_and_predicts_without_the_training_stack(trained, tmp_path):
    _, path, dataset = trained
    code = (
        "import sys, json, numpy as np, slt_jax\n"
        f"t = slt_jax.load_ticket({path!r})\n"
        f"pred = t.predict(np.load(sys.argv[1]))\n"
        f"print(json.dumps({{'loaded': sorted(m for m in {TRAINING_STACK!r} if m in sys.modules),"
        " 'pred': pred.tolist()}))\n"
    )
    images = str(tmp_path / "val_images.npy")
    np.save(images, dataset.x_val[:50])
    out = subprocess.run([sys.executable, "-c", code, images], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["loaded"] == []
    np.testing.assert_array_equal(result["pred"], load_ticket(path).predict(dataset.x_val[:50]))


class UserNet(nn.Module):
    """A user's own Linen module, outside the zoo, with (non-zero) biases and no ``train`` argument."""

    @nn.compact
    def __call__(self, x):
        x = x.reshape((x.shape[0], -1))
        x = nn.relu(nn.Dense(24, bias_init=nn.initializers.normal(0.5))(x))
        return nn.Dense(10, bias_init=nn.initializers.normal(0.5))(x)


@pytest.mark.parametrize("structured", [False, True])
def test_ticket_of_a_users_own_module(structured, tmp_path):
    module, seed, shape = UserNet(), 7, (8, 8, 1)
    zeros = jnp.zeros((1, *shape), jnp.float32)
    expected = jax.device_get(module.init(slt_jax.weights_key(seed), zeros)["params"])
    masks = _random_masks(structured, params=expected)
    path = str(tmp_path / "ticket")
    save_ticket(path, {"seed": seed, "input_shape": list(shape), "structured": structured}, masks, method="crbg")

    with pytest.raises(ValueError, match=r"outside the zoo.*load_ticket\(path, model=module\)"):
        load_ticket(path)

    ticket = load_ticket(path, model=module)
    frozen = ticket.frozen_params()
    assert jax.tree.structure(frozen) == jax.tree.structure(expected)
    for name, w in masking.named_leaves(expected).items():
        got = np.asarray(masking.named_leaves(frozen)[name])
        np.testing.assert_array_equal(got.view(np.uint32), np.asarray(w).view(np.uint32), err_msg=name)
    assert np.any(np.asarray(expected["Dense_0"]["bias"]) != 0)  # the biases are real weights here

    # mask: params-shaped bool, None where not gated; a structured unit's bias closes with its kernel.
    mask, gates = ticket.mask, masking.named_leaves(masks)
    assert mask["Dense_0"]["kernel"].dtype == bool
    for layer in ("Dense_0", "Dense_1"):
        np.testing.assert_array_equal(mask[layer]["kernel"], gates[f"{layer}/kernel"])
        if structured:
            np.testing.assert_array_equal(mask[layer]["bias"], gates[f"{layer}/kernel"].reshape(-1))
        else:
            assert mask[layer]["bias"] is None

    masked = ticket.masked_params()
    for layer in ("Dense_0", "Dense_1"):
        for leaf in ("kernel", "bias"):
            w = np.asarray(expected[layer][leaf])
            m = mask[layer][leaf]
            want = w if m is None else np.where(np.broadcast_to(m, w.shape), w, np.float32(0))
            np.testing.assert_array_equal(np.asarray(masked[layer][leaf]).view(np.uint32), want.view(np.uint32))

    # predict: no preprocessing recorded, so the images go in as they are.
    images = np.random.default_rng(0).normal(size=(32, *shape)).astype(np.float32)
    logits = module.apply({"params": masked}, images)
    np.testing.assert_array_equal(ticket.predict(images), np.argmax(logits, -1))


def test_frozen_from_a_params_file(tmp_path):
    """A run started from a params file: the ticket is on the file's weights and refuses other ones."""
    c = default.get_config()
    c.update(num_epochs=0, num_steps=10, batch_size=64, log_every=10, eval_every=10, checkpoint_every=0,
             num_devices=1, progress=False, plots=False)
    seed_weights = _zoo_params(model_spec(c, 10), (8, 8, 1), c.seed)
    weights = jax.tree.map(lambda w: np.asarray(w) * np.float32(1.5), seed_weights)
    params_file = str(tmp_path / "weights.npz")
    sha256 = frozen_lib.save_params_file(params_file, weights)
    c.frozen_from = params_file
    workdir = tmp_path / "run"
    summary = train_and_evaluate(c, str(workdir))

    ticket = load_ticket(str(workdir / "ticket"))
    assert ticket.meta["frozen_from"] == {"path": os.path.abspath(params_file), "sha256": sha256}
    frozen = masking.named_leaves(ticket.frozen_params())
    assert frozen.keys() == masking.named_leaves(weights).keys()
    for name, w in masking.named_leaves(weights).items():
        np.testing.assert_array_equal(np.asarray(frozen[name]).view(np.uint32), w.view(np.uint32), err_msg=name)
        assert not np.array_equal(frozen[name], np.asarray(masking.named_leaves(seed_weights)[name]))
    dataset = load_dataset(c)
    assert np.mean(ticket.predict(dataset.x_val) == dataset.y_val) == summary["val_accuracy"]

    # Moved: the ticket finds the file where it is told to, and still checks its content.
    moved = str(tmp_path / "moved.npz")
    os.replace(params_file, moved)
    with pytest.raises(frozen_lib.FrozenWeightsError, match="cannot be read"):
        load_ticket(str(workdir / "ticket")).frozen_params()
    jax.tree.map(np.testing.assert_array_equal,
                 load_ticket(str(workdir / "ticket"), frozen_from=moved).frozen_params(), ticket.frozen_params())

    # Other weights under the recorded name: refused, in one line naming the file.
    frozen_lib.save_params_file(params_file, jax.tree.map(lambda w: w * np.float32(2), weights))
    with pytest.raises(frozen_lib.FrozenWeightsError) as err:
        load_ticket(str(workdir / "ticket")).frozen_params()
    message = str(err.value)
    assert "\n" not in message and os.path.abspath(params_file) in message and "other weights" in message
