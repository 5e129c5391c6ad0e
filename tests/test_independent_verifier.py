"""tests/independent_verifier.py: its numpy forward pass gives the zoo models' logits, it checks
biprop's binarised weights, it refuses what it cannot check and a ticket whose recorded counts
disagree with its mask, each in one line."""
import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from slt_jax import load_ticket, masking, save_ticket
from slt_jax.models import create_model
from slt_jax.ticket import ZOO_INIT_KWARGS

from independent_verifier import VerificationError, _forward, _preprocess, verify

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PREPROCESSING = {"scale": 1.0 / 16, "mean": [0.3], "std": [0.4]}


def _spec(name, **kw):
    return {"name": name, "num_classes": 10, "weight_init": "signed_kaiming", "init_scale": None,
            "use_bias": True, "width": 0.1, **kw}


def _ticket(tmp_path, spec, structured=False, shape=(8, 8, 1), **meta):
    model, zeros = create_model(spec), jnp.zeros((1, *shape))
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), zeros, **ZOO_INIT_KWARGS))["params"]
    rng = np.random.default_rng(0)
    masks = jax.tree.map(lambda s: rng.random(s.shape) < 0.6, masking.gate_shapes(params, structured=structured))
    path = str(tmp_path / "ticket")
    save_ticket(path, {"model": spec, "input_shape": list(shape), "seed": 3, "preprocessing": PREPROCESSING,
                       "structured": structured, **meta}, masks,
                method="biprop" if meta.get("weights") == "binarized" else "crbg")
    return path


def _images(n=64, shape=(8, 8)):
    return np.random.default_rng(1).integers(0, 17, (n, *shape)).astype(np.uint8)


@pytest.mark.parametrize("name,width,structured,shape", [
    ("digits_mlp", 0.1, False, (8, 8, 1)), ("lenet300", 0.1, True, (8, 8, 1)),
    ("conv2", 0.125, False, (9, 9, 1)),  # an odd size: the pool drops the last row and column
    pytest.param("conv4", 0.0625, True, (8, 8, 1), marks=pytest.mark.slow)])  # two pooling stages: slow to compile
def test_the_numpy_forward_pass_gives_the_models_logits(name, width, structured, shape, tmp_path):
    spec = _spec(name, width=width)
    path = _ticket(tmp_path, spec, structured, shape)
    ticket = load_ticket(path)
    x = _preprocess(_images(shape=shape[:2]), PREPROCESSING)
    weights = {k: np.asarray(v, np.float64) for k, v in masking.named_leaves(ticket.masked_params()).items()}
    ours = _forward(name, weights, x)
    theirs = jax.jit(lambda p, x: create_model(spec).apply({"params": p}, x, train=False))(ticket.masked_params(), x)
    np.testing.assert_allclose(ours, np.asarray(theirs), rtol=1e-4, atol=1e-4)
    report = verify(path, _images(shape=shape[:2]), np.zeros(64, int))
    assert report["accuracy"] == np.mean(np.argmax(ours, -1) == 0)
    assert report["gated_weights"] == ticket.meta["size"]["gated_weights"]
    assert report["sparsity"] == pytest.approx(ticket.meta["metrics"]["sparsity"], abs=1e-12)


def test_a_biprop_ticket_is_checked_against_the_seeds_signs(tmp_path):
    path = _ticket(tmp_path, _spec("digits_mlp"), weights="binarized")
    frozen = masking.named_leaves(load_ticket(path).frozen_params())
    assert np.unique(np.abs(frozen["Dense_0/kernel"])).size == 1  # really binarised
    report = verify(path, _images(), np.zeros(64, int))
    assert report["gated_weights"] == load_ticket(path).meta["size"]["gated_weights"]


class UserNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(10)(x.reshape((x.shape[0], -1)))


def test_a_model_it_cannot_run_is_refused_in_one_line(tmp_path):
    path = _ticket(tmp_path, _spec("resnet18", width=0.0625, use_bias=False))
    with pytest.raises(VerificationError, match=r"^model 'resnet18' is not supported by this verifier; supported: "
                                                r"digits_mlp, lenet300, conv2"):
        verify(path, _images(), np.zeros(64, int))
    params = jax.eval_shape(lambda: UserNet().init(jax.random.key(0), jnp.zeros((1, 8, 8, 1))))["params"]
    save_ticket(str(tmp_path / "user"), {"seed": 0, "input_shape": [8, 8, 1]},
                jax.tree.map(lambda s: np.ones(s.shape, bool), masking.gate_shapes(params)), method="crbg")
    with pytest.raises(ValueError, match=r"outside the zoo"):  # load_ticket needs the module: said by the library
        verify(str(tmp_path / "user"), _images(), np.zeros(64, int))


def test_recorded_counts_that_disagree_with_the_mask_fail_on_the_command_line(tmp_path):
    """A format-1 ticket (no mask_integrity for load_ticket to check) whose recorded sparsity is not
    its mask's: only the verifier's own count catches it. (tests/test_ticket.py runs the command line
    on a good ticket.)"""
    path = _ticket(tmp_path, _spec("digits_mlp"))
    assert verify(path, _images(), np.zeros(64, int))["gated_weights"] == 64 * 25 + 25 * 25 + 25 * 10
    data = str(tmp_path / "data.npz")
    np.savez(data, x_val=_images(), y_val=np.zeros(64, int))
    command = [sys.executable, os.path.join(ROOT, "tests", "independent_verifier.py"), path, data, "--x", "x_val",
               "--y", "y_val"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}

    with open(os.path.join(path, "ticket.json")) as f:
        meta = json.load(f)
    meta["format_version"] = 1
    meta.pop("mask_integrity")
    meta["metrics"]["sparsity"] += 0.01
    with open(os.path.join(path, "ticket.json"), "w") as f:
        json.dump(meta, f)
    bad = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 1 and bad.stdout == ""
    assert bad.stderr.strip().splitlines() == [bad.stderr.strip()]  # one line
    assert bad.stderr.startswith("VerificationError: the mask's sparsity") and "the mask is damaged" in bad.stderr
