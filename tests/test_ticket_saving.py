"""Saving a ticket from one's own loop (issue 22): nothing of a user's is replaced or deleted, the
method that made the mask is recorded (biprop's binarised weights, IteRand's re-draws), and a mask
or gates holding NaN are refused; a --workdir that is not a run's is refused before anything is written."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import default
from slt_jax import frozen as frozen_lib
from slt_jax import load_ticket, masking, save_ticket
from slt_jax.methods import Biprop, IteRand
from slt_jax.models import create_model
from slt_jax.run_config import ConfigError
from slt_jax.ticket import ZOO_INIT_KWARGS
from slt_jax.train import train_and_evaluate

from conftest import ROOT

SPEC = {"name": "digits_mlp", "num_classes": 10, "weight_init": "signed_kaiming", "init_scale": None,
        "use_bias": True, "width": 0.1}
META = {"model": SPEC, "input_shape": [8, 8, 1], "seed": 3}


def _params():
    return frozen_lib.init_variables(create_model(SPEC), (8, 8, 1), 3, ZOO_INIT_KWARGS)["params"]


def _masks(seed=0):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: rng.random(s.shape) < 0.4, masking.gate_shapes(_params()))


def _tree(root) -> dict[str, bytes]:
    """Every file under ``root`` and its bytes, to show nothing was changed."""
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            out[os.path.relpath(p, root)] = open(p, "rb").read()
    return out


def _one_line(err) -> str:
    message = str(err.value)
    assert "\n" not in message and message
    return message


# 1. The destination: a user's directory or file is never replaced.

def test_a_users_directory_is_refused_and_kept(tmp_path):
    path = tmp_path / "results"
    (path / "sub").mkdir(parents=True)
    (path / "notes.md").write_text("my notes")
    (path / "sub" / "data.csv").write_text("1,2")
    before = _tree(tmp_path)
    with pytest.raises(ValueError) as err:
        save_ticket(str(path), META, _masks(), method="crbg")
    assert str(path) in _one_line(err) and "not a ticket" in str(err.value)
    assert _tree(tmp_path) == before and sorted(os.listdir(tmp_path)) == ["results"]


def test_a_plain_file_is_refused_and_kept(tmp_path):
    path = tmp_path / "ticket"
    path.write_text("a file of mine")
    with pytest.raises(ValueError) as err:
        save_ticket(str(path), META, _masks(), method="crbg")
    assert str(path) in _one_line(err) and "file" in str(err.value)
    assert path.read_text() == "a file of mine" and sorted(os.listdir(tmp_path)) == ["ticket"]


def test_a_symlink_is_refused_and_its_target_kept(tmp_path):
    save_ticket(str(tmp_path / "real"), META, _masks(), method="crbg")
    os.symlink(tmp_path / "real", tmp_path / "link")
    before = _tree(tmp_path / "real")
    with pytest.raises(ValueError, match="symbolic link"):
        save_ticket(str(tmp_path / "link"), META, _masks(1), method="crbg")
    assert _tree(tmp_path / "real") == before and os.path.islink(tmp_path / "link")


def test_a_users_directory_at_the_old_name_is_kept(tmp_path):
    path = str(tmp_path / "ticket")
    save_ticket(path, META, _masks(), method="crbg")
    os.makedirs(path + ".old")
    (tmp_path / "ticket.old" / "mine.txt").write_text("keep")
    with pytest.raises(ValueError) as err:
        save_ticket(path, META, _masks(1), method="crbg")
    assert f"{path}.old" in _one_line(err)
    assert (tmp_path / "ticket.old" / "mine.txt").read_text() == "keep"


def test_an_empty_directory_or_a_ticket_is_replaced(tmp_path):
    path = tmp_path / "ticket"
    path.mkdir()
    save_ticket(str(path), META, _masks(), method="crbg")
    save_ticket(str(path), META, _masks(1), method="crbg")  # the same run saving again
    got = masking.named_leaves(load_ticket(str(path)).gate_masks)
    for name, m in masking.named_leaves(_masks(1)).items():
        np.testing.assert_array_equal(got[name], m)
    assert sorted(os.listdir(tmp_path)) == ["ticket"]


# 2. The method: recorded, so that the ticket computes with the weights the loop computed with.

def test_save_needs_the_method(tmp_path):
    with pytest.raises(ValueError) as err:
        save_ticket(str(tmp_path / "t"), META, _masks())
    assert "method" in _one_line(err) and "biprop" in str(err.value)
    assert not os.path.exists(tmp_path / "t")


@pytest.mark.parametrize("method", [Biprop(num_steps=10, sparsity=0.5), "biprop"])
def test_a_biprop_ticket_from_ones_own_loop_computes_with_binarised_weights(method, tmp_path):
    masks = _masks()
    save_ticket(str(tmp_path / "t"), META, masks, method=method)
    ticket = load_ticket(str(tmp_path / "t"))
    assert ticket.meta["method"] == "biprop" and ticket.meta["weights"] == "binarized"
    expected = Biprop(num_steps=10, sparsity=0.5).masked_params(_params(), masks)
    jax.tree.map(np.testing.assert_array_equal, ticket.masked_params(), jax.device_get(expected))


def test_a_method_the_meta_contradicts_is_refused(tmp_path):
    with pytest.raises(ValueError) as err:
        save_ticket(str(tmp_path / "t"), {**META, "method": "crbg"}, _masks(), method="biprop")
    assert "crbg" in _one_line(err) and "biprop" in str(err.value)
    with pytest.raises(ValueError, match="weights"):
        save_ticket(str(tmp_path / "t"), {**META, "weights": None}, _masks(), method="biprop")
    with pytest.raises(ValueError, match="'sgd'"):
        save_ticket(str(tmp_path / "t"), META, _masks(), method="sgd")
    assert not os.path.exists(tmp_path / "t")


def test_the_method_may_come_in_the_meta(tmp_path):
    save_ticket(str(tmp_path / "t"), {**META, "method": "biprop"}, _masks())
    assert load_ticket(str(tmp_path / "t")).meta["weights"] == "binarized"


def test_an_iterand_ticket_needs_its_generations(tmp_path):
    masks = _masks()
    method = IteRand(num_steps=10, sparsity=0.5, redraw_every=2)
    with pytest.raises(ValueError) as err:
        save_ticket(str(tmp_path / "t"), META, masks, method=method)
    assert "generation" in _one_line(err)
    generation = jax.tree.map(lambda m: np.where(m, 1, 0), masks)
    save_ticket(str(tmp_path / "t"), META, masks, method=method, generation=generation)
    ticket = load_ticket(str(tmp_path / "t"))
    assert ticket.meta["method"] == "iterand" and os.path.exists(tmp_path / "t" / "redraws.npz")
    redrawn = frozen_lib.init_variables(create_model(SPEC), (8, 8, 1), 3, ZOO_INIT_KWARGS, generation=1)["params"]
    got = ticket.frozen_params()["Dense_0"]["kernel"]
    keep = masks["Dense_0"]["kernel"]
    np.testing.assert_array_equal(got[keep], np.asarray(redrawn["Dense_0"]["kernel"])[keep])


# 3. NaN: a mask that is not binary, or gates that are not finite, are refused.

@pytest.mark.parametrize("bad, words", [(np.nan, "NaN"), (np.inf, "inf"), (0.5, "0 and 1")])
def test_a_mask_that_is_not_binary_is_refused(bad, words, tmp_path):
    masks = jax.tree.map(lambda m: m.astype(np.float32), _masks())
    masks["Dense_1"]["kernel"][2, 3] = bad
    with pytest.raises(ValueError) as err:
        save_ticket(str(tmp_path / "t"), META, masks, method="crbg")
    assert "Dense_1/kernel" in _one_line(err) and words in str(err.value)
    assert not os.path.exists(tmp_path / "t")


def test_nan_gates_are_refused(tmp_path):
    import slt_jax

    method = slt_jax.CRBG(num_steps=10, sparsity=0.5)
    rng = np.random.default_rng(0)
    gates = jax.tree.map(lambda s: rng.normal(size=s.shape).astype(np.float32), masking.gate_shapes(_params()))
    gates["Dense_0"]["kernel"][0, 0] = np.nan
    masks = jax.device_get(method.binary_masks(gates))  # the NaN gate is pruned, silently
    with pytest.raises(ValueError) as err:
        save_ticket(str(tmp_path / "t"), META, masks, method=method, gates=gates)
    assert "Dense_0/kernel" in _one_line(err) and "NaN" in str(err.value)
    gates["Dense_0"]["kernel"][0, 0] = 1.0
    save_ticket(str(tmp_path / "t"), META, jax.device_get(method.binary_masks(gates)), method=method, gates=gates)


# 4. --workdir: an existing folder that is not a run's is refused, nothing in it touched.

def _tiny_config():
    c = default.get_config()
    c.update(num_epochs=0, num_steps=4, batch_size=64, log_every=2, eval_every=4, checkpoint_every=0,
             num_devices=1, progress=False, plots=False)
    return c


@pytest.mark.parametrize("files", [
    {"notes.md": "mine"},
    # the folder: a config.json and summary.json of one's own, a ticket/ folder of notes
    {"config.json": '{"lr": 0.1}', "summary.json": '{"acc": 0.9}', "ticket/notes.md": "mine"},
    {"config.json": "not json"},
])
def test_a_folder_that_is_not_a_workdir_is_refused(files, tmp_path):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    before = _tree(tmp_path)
    with pytest.raises(ConfigError) as err:
        train_and_evaluate(_tiny_config(), str(tmp_path))
    assert str(tmp_path) in _one_line(err) and "not an slt-jax workdir" in str(err.value)
    assert _tree(tmp_path) == before and sorted(os.listdir(tmp_path)) == sorted({n.split("/")[0] for n in files})


def test_a_finished_workdir_whose_ticket_folder_holds_a_users_file_is_refused(tmp_path):
    train_and_evaluate(_tiny_config(), str(tmp_path))
    (tmp_path / "ticket" / "notes.md").write_text("mine")
    before = _tree(tmp_path)
    with pytest.raises(ConfigError, match="ticket"):
        train_and_evaluate(_tiny_config(), str(tmp_path))
    assert _tree(tmp_path) == before
    os.remove(tmp_path / "ticket" / "notes.md")
    train_and_evaluate(_tiny_config(), str(tmp_path))  # a run's own workdir: rerun as before


def test_run_py_refuses_a_users_folder_with_one_line_and_exit_2(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"mine": True}))
    p = subprocess.run([sys.executable, "run.py", "--config.num_steps=2", "--config.progress=False",
                        "--workdir", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2, p.stderr[-2000:]
    lines = p.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and "not an slt-jax workdir" in lines[-1] and "Traceback" not in p.stderr
    assert os.listdir(tmp_path) == ["config.json"]
    assert json.loads((tmp_path / "config.json").read_text()) == {"mine": True}
