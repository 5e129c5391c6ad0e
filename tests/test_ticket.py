"""Tickets: the saved format round-trips, the mask contract holds, predict() reproduces the harness's
accuracy, the independent verifier agrees, and loading needs no training stack."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import default
from slt_jax import load_ticket, masking, save_ticket
from slt_jax.data import load_dataset
from slt_jax.ticket import init_variables
from slt_jax.train import train_and_evaluate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VERIFY_TICKET = os.path.join(ROOT, "..", "shared", "tools", "verify_ticket.py")
SPEC = {"name": "digits_mlp", "num_classes": 10, "weight_init": "signed_kaiming", "init_scale": None,
        "use_bias": True, "width": 0.1}
PREPROCESSING = {"scale": 1.0 / 16, "mean": [0.3], "std": [0.4]}


def _meta(structured):
    return {"model": SPEC, "input_shape": [8, 8, 1], "seed": 3, "preprocessing": PREPROCESSING,
            "gate_policy": masking.DEFAULT_POLICY, "structured": structured}


def _random_masks(structured, seed=0):
    params = init_variables(SPEC, (8, 8, 1), 3)["params"]
    rng = np.random.default_rng(seed)
    return {n: rng.random(s) < 0.4 for n, s in masking.gate_shapes(params, structured=structured).items()}


@pytest.mark.parametrize("structured", [False, True])
def test_save_load_round_trip(structured, tmp_path):
    masks = _random_masks(structured)
    assert any(m.size % 8 for m in masks.values())  # bit packing must not pad the shapes
    path = str(tmp_path / "ticket")
    save_ticket(path, _meta(structured), _random_masks(structured, seed=1))
    save_ticket(path, _meta(structured), masks)  # overwrites the first
    ticket = load_ticket(path)
    assert ticket.meta["format_version"] == 1 and ticket.meta.items() >= _meta(structured).items()
    assert ticket.gate_masks.keys() == masks.keys()
    for name, m in masks.items():
        assert ticket.gate_masks[name].dtype == bool and ticket.gate_masks[name].shape == m.shape
        np.testing.assert_array_equal(ticket.gate_masks[name], m)
    assert sorted(os.listdir(tmp_path)) == ["ticket"]  # no temporary or old directory left behind


@pytest.mark.parametrize("structured", [False, True])
def test_mask_contract_and_masked_params(structured, tmp_path):
    save_ticket(str(tmp_path / "t"), _meta(structured), _random_masks(structured))
    ticket = load_ticket(str(tmp_path / "t"))
    frozen = ticket.frozen_params()
    fresh = init_variables(SPEC, (8, 8, 1), 3)["params"]
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
def trained(tmp_path_factory):
    """A short CRBG run on digits (tiny_config from conftest.py, shorter) and its validation split."""
    c = default.get_config()
    c.update(num_epochs=0, num_steps=20, batch_size=64, log_every=10, eval_every=20, checkpoint_every=0,
             num_devices=1, progress=False, plots=False)
    workdir = tmp_path_factory.mktemp("run")
    summary = train_and_evaluate(c, str(workdir))
    return summary, str(workdir / "ticket"), load_dataset(c)


def test_predict_on_raw_images_reproduces_the_harness_accuracy(trained):
    summary, path, dataset = trained
    ticket = load_ticket(path)
    assert dataset.x_val.dtype == np.uint8  # raw, as the dataset stores them
    assert np.mean(ticket.predict(dataset.x_val) == dataset.y_val) == summary["val_accuracy"]
    assert np.mean(ticket.predict(dataset.x_test) == dataset.y_test) == summary["test_accuracy"]
    assert ticket.meta["metrics"]["sparsity"] == summary["sparsity"]


@pytest.mark.skipif(not os.path.exists(VERIFY_TICKET), reason="the shared verifier is not on this machine")
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


def test_a_ticket_loads_and_predicts_without_the_training_stack(trained):
    _, path, dataset = trained
    code = (
        "import sys, json, numpy as np, slt_jax\n"
        f"t = slt_jax.load_ticket({path!r})\n"
        f"pred = t.predict(np.load(sys.argv[1]))\n"
        f"print(json.dumps({{'loaded': sorted(m for m in {TRAINING_STACK!r} if m in sys.modules),"
        " 'pred': pred.tolist()}))\n"
    )
    images = os.path.join(os.path.dirname(path), "val_images.npy")
    np.save(images, dataset.x_val[:50])
    out = subprocess.run([sys.executable, "-c", code, images], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["loaded"] == []
    np.testing.assert_array_equal(result["pred"], load_ticket(path).predict(dataset.x_val[:50]))
