"""A ticket is the same network everywhere: its weights' fingerprint and the settings that shaped them.

A ticket and a checkpoint record a digest of the frozen weights and the jax settings they were
drawn under (x64, threefry partitionable, jax version, frozen dtype, params file). A ticket loads
bit-exact in a process with other settings, or is refused in one line naming the likely cause; a
finished or killed run resumed on other weights (another flag, a replaced params file) or with a
changed method default is refused, and its ticket is left as it was.
"""
import hashlib
import json
import os
import shutil
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest

import slt_jax
from configs import default
from slt_jax import frozen as frozen_lib
from slt_jax import masking
from slt_jax.checkpoint import CheckpointMismatch
from slt_jax.data import load_dataset
from slt_jax.ticket import TicketError
from slt_jax.train import train_and_evaluate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VERIFY_TICKET = os.path.join(ROOT, "tests", "independent_verifier.py")  # the repository's own checker
# The run every test here shares: the default CRBG digits run, shortened (run.py's flags and the
# in-process config say the same, so a rerun through run.py resumes it).
STEPS = 60
FLAGS = ["--config.num_epochs=0", f"--config.num_steps={STEPS}", "--config.progress=False", "--config.plots=False",
         "--config.num_devices=1", "--config.checkpoint_every=0"]


def _config(**overrides):
    c = default.get_config()
    c.update({"num_epochs": 0, "num_steps": STEPS, "progress": False, "plots": False, "num_devices": 1,
              "checkpoint_every": 0, **overrides})
    return c


def _env(**flags):
    # As a user runs it: one CPU device, the project importable, the flag set before jax is imported.
    return {**os.environ, "XLA_FLAGS": "", "PYTHONPATH": ROOT, **flags}


def _files(directory) -> dict[str, str]:
    """Every file under ``directory`` (relative path -> sha256 of its bytes)."""
    out = {}
    for parent, _, names in os.walk(directory):
        for name in names:
            path = os.path.join(parent, name)
            out[os.path.relpath(path, directory)] = hashlib.sha256(open(path, "rb").read()).hexdigest()
    return out


@pytest.fixture(scope="session")
def digits_run(tmp_path_factory):
    """A finished run (its final checkpoint kept) and the validation split it measured, as an npz."""
    workdir = tmp_path_factory.mktemp("fingerprint") / "run"
    summary = train_and_evaluate(_config(), str(workdir))
    data = load_dataset(_config())
    np.savez(workdir.parent / "val.npz", x_val=data.x_val, y_val=data.y_val)
    assert summary["val_accuracy"] > 0.4  # far above the ~0.1 of a ticket on other weights
    return workdir, summary, str(workdir.parent / "val.npz")


PREDICT = """
import json, sys
import numpy as np
import jax, slt_jax
ticket = slt_jax.load_ticket(sys.argv[1])
data = np.load(sys.argv[2])
print(json.dumps({"x64": bool(jax.config.jax_enable_x64), "partitionable": bool(jax.config.jax_threefry_partitionable),
                  "val_accuracy": float(np.mean(ticket.predict(data["x_val"]) == data["y_val"]))}))
"""


@pytest.mark.slow  # run.py or python processes of their own
@pytest.mark.parametrize("flag", ["JAX_ENABLE_X64=1", "JAX_THREEFRY_PARTITIONABLE=0"])
def test_a_ticket_predicts_the_same_under_another_jax_flag(digits_run, flag):
    workdir, summary, val = digits_run
    name, value = flag.split("=")
    p = subprocess.run([sys.executable, "-c", PREDICT, str(workdir / "ticket"), val], cwd=ROOT,
                       env=_env(**{name: value}), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    result = json.loads(p.stdout.strip().splitlines()[-1])
    assert (result["x64"], result["partitionable"]) == ((True, True) if "X64" in name else (False, False))
    assert result["val_accuracy"] == summary["val_accuracy"]


@pytest.mark.slow  # run.py or python processes of their own
def test_the_verifier_under_x64_measures_the_recorded_accuracy(digits_run):
    workdir, summary, val = digits_run
    p = subprocess.run([sys.executable, VERIFY_TICKET, str(workdir / "ticket"), val, "--x", "x_val", "--y", "y_val"],
                       cwd=ROOT, env=_env(JAX_ENABLE_X64="1"), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert json.loads(p.stdout.strip().splitlines()[-1])["accuracy"] == summary["val_accuracy"]


def test_a_ticket_records_the_fingerprint_of_its_weights(digits_run):
    workdir, _, _ = digits_run
    meta = json.load(open(workdir / "ticket" / "ticket.json"))
    record = meta["weights_fingerprint"]
    assert record["settings"] == {"jax": jax.__version__, "jax_enable_x64": False, "jax_threefry_partitionable": True,
                                  "frozen_dtype": "float32", "frozen_from_sha256": None}
    ticket = slt_jax.load_ticket(str(workdir / "ticket"))
    kept = masking.named_leaves(masking.apply_masks(ticket.frozen_params(), ticket.gate_masks))
    assert sorted(record["leaves"]) == sorted(kept) == ["Dense_0/kernel", "Dense_1/kernel", "Dense_2/kernel"]
    for name, w in kept.items():  # each leaf: sha256 of its dtype, shape and bytes, pruned weights as 0
        w = np.asarray(w)
        assert record["leaves"][name] == hashlib.sha256(f"{w.dtype.str}{list(w.shape)}".encode()
                                                        + w.tobytes()).hexdigest()


@pytest.mark.slow  # run.py or python processes of their own
def test_a_ticket_trained_under_x64_loads_without_it(tmp_path):
    p = subprocess.run([sys.executable, "run.py", *FLAGS, "--config.num_steps=30", "--workdir", str(tmp_path)],
                       cwd=ROOT, env=_env(JAX_ENABLE_X64="1"), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    summary = json.loads(p.stdout.strip().splitlines()[-1])
    ticket = slt_jax.load_ticket(str(tmp_path / "ticket"))  # this process: x64 off
    assert ticket.meta["weights_fingerprint"]["settings"]["jax_enable_x64"] is True
    data = load_dataset(_config())
    assert np.mean(ticket.predict(data.x_val) == data.y_val) == summary["val_accuracy"]


@pytest.mark.slow  # run.py or python processes of their own
@pytest.mark.parametrize("flag", ["JAX_ENABLE_X64=1", "JAX_THREEFRY_PARTITIONABLE=0"])
def test_rerunning_a_finished_run_under_another_flag_keeps_its_ticket(digits_run, flag):
    workdir, _, _ = digits_run
    before = _files(workdir)
    name, value = flag.split("=")
    p = subprocess.run([sys.executable, "run.py", *FLAGS, "--workdir", str(workdir)], cwd=ROOT,
                       env=_env(**{name: value}), capture_output=True, text=True, timeout=600)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2, p.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: ") and name.lower() in lines[0], lines
    assert _files(workdir) == before  # nothing rewritten: not the ticket, not config.json


@pytest.fixture(scope="session")
def frozen_from_run(tmp_path_factory):
    """A finished run on a params file (the seed's weights scaled), and that file."""
    directory = tmp_path_factory.mktemp("frozen_from")
    spec = {"name": "digits_mlp", "num_classes": 10, "weight_init": "signed_kaiming", "init_scale": None,
            "use_bias": False, "width": 1.0}
    weights = frozen_lib.init_variables(slt_jax.create_model(spec), (8, 8, 1), 5, {"train": False})["params"]
    params_file = str(directory / "weights.npz")
    frozen_lib.save_params_file(params_file, weights)
    train_and_evaluate(_config(frozen_from=params_file, num_steps=20), str(directory / "run"))
    return directory / "run", params_file, weights


@pytest.mark.slow  # run.py or python processes of their own
def test_a_replaced_params_file_is_a_refused_rerun(frozen_from_run, tmp_path):
    workdir, params_file, weights = frozen_from_run
    before = _files(workdir)
    original = open(params_file, "rb").read()
    try:
        frozen_lib.save_params_file(params_file, jax.tree.map(lambda w: -np.asarray(w), weights))  # same name, shapes
        p = subprocess.run([sys.executable, "run.py", *FLAGS, "--config.num_steps=20",
                            f"--config.frozen_from={params_file}", "--workdir", str(workdir)], cwd=ROOT, env=_env(),
                           capture_output=True, text=True, timeout=600)
        lines = p.stderr.strip().splitlines()
        assert p.returncode == 2, p.stderr[-3000:]
        assert len(lines) == 1 and "frozen_from" in lines[0] and params_file in lines[0], lines
        assert _files(workdir) == before
        # The same in process, as a resume after kill -9 meets it: the checkpoint is refused.
        with pytest.raises(CheckpointMismatch, match="frozen_from"):
            train_and_evaluate(_config(frozen_from=params_file, num_steps=20), str(workdir))
        assert _files(workdir) == before
    finally:
        open(params_file, "wb").write(original)


CHANGED_DEFAULT = """
import dataclasses, sys
from absl import logging
from slt_jax import cli
from slt_jax.methods import METHODS, CRBG

@dataclasses.dataclass(frozen=True)
class NewDefault(CRBG):  # the code changed between the run and its resumption: another default learning rate
    learning_rate: float = 0.02

METHODS["crbg"] = NewDefault
from configs import default
c = default.get_config()
c.update(num_epochs=0, num_steps=int(sys.argv[2]), progress=False, plots=False, num_devices=1, checkpoint_every=0)
logging.set_verbosity(logging.ERROR)  # as run.py: orbax's routine events stay quiet
sys.exit(cli.run(c, sys.argv[1]))
"""


@pytest.mark.slow  # run.py or python processes of their own
def test_a_changed_method_default_is_a_refused_resume(digits_run):
    workdir, _, _ = digits_run
    assert json.load(open(workdir / "config.json"))["learning_rate"] == 0.05  # resolved, not null
    assert json.load(open(workdir / "config.json"))["lr_schedule"] == "constant"
    before = _files(workdir)
    p = subprocess.run([sys.executable, "-c", CHANGED_DEFAULT, str(workdir), str(STEPS)], cwd=ROOT, env=_env(),
                       capture_output=True, text=True, timeout=600)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2, p.stderr[-3000:]
    assert len(lines) == 1 and "learning_rate" in lines[0] and "0.05" in lines[0] and "0.02" in lines[0], lines
    assert _files(workdir) == before


class MLP(nn.Module):
    act: str = "relu"
    kernel: str = "lecun"

    @nn.compact
    def __call__(self, x):
        kinit = nn.initializers.lecun_normal() if self.kernel == "lecun" else nn.initializers.normal(0.1)
        act = nn.relu if self.act == "relu" else nn.tanh
        return nn.Dense(10, kernel_init=kinit)(act(nn.Dense(32, kernel_init=kinit)(x)))


def _own_loop_masks(params):
    rng = np.random.default_rng(0)
    return jax.tree.map(lambda s: rng.random(s.shape) < 0.5, slt_jax.gate_shapes(params))


def test_a_ticket_saved_with_the_wrong_seed_is_refused_at_load(tmp_path):
    params = slt_jax.init_variables(MLP(), (64,), seed=1)["params"]  # drawn from seed 1...
    masks = _own_loop_masks(params)
    path = str(tmp_path / "t")
    slt_jax.save_ticket(path, {"seed": 0, "input_shape": [64]}, masks, frozen=params, method="crbg")  # ...recorded as seed 0
    with pytest.raises(TicketError) as err:
        slt_jax.load_ticket(path, model=MLP())
    message = str(err.value)
    assert "\n" not in message and "seed 0" in message, message
    # With the module at hand, the save itself refuses.
    with pytest.raises(ValueError, match="seed 0") as err:
        slt_jax.save_ticket(str(tmp_path / "u"), {"seed": 0, "input_shape": [64]}, masks, frozen=params, model=MLP(),
                            method="crbg")
    assert "\n" not in str(err.value) and not os.path.exists(tmp_path / "u")


def test_a_ticket_loads_only_with_a_module_that_draws_its_weights(tmp_path):
    params = slt_jax.init_variables(MLP(), (64,), seed=0)["params"]
    masks = _own_loop_masks(params)
    path = str(tmp_path / "t")
    slt_jax.save_ticket(path, {"seed": 0, "input_shape": [64]}, masks, frozen=params, method="crbg")
    x = np.random.default_rng(1).normal(size=(16, 64)).astype(np.float32)
    # Another activation draws the same weights: the ticket is those weights, and loads.
    tanh = slt_jax.load_ticket(path, model=MLP(act="tanh"))
    np.testing.assert_array_equal(tanh.predict(x), np.argmax(MLP(act="tanh").apply(
        {"params": slt_jax.apply_masks(params, masks)}, x), -1))
    # Another init draws other weights from the same seed: refused in one line.
    with pytest.raises(TicketError) as err:
        slt_jax.load_ticket(path, model=MLP(kernel="normal"))
    assert "\n" not in str(err.value) and "model" in str(err.value)


def test_without_frozen_the_ticket_fingerprints_the_seeds_weights(tmp_path):
    params = slt_jax.init_variables(MLP(), (64,), seed=0)["params"]
    masks = _own_loop_masks(params)
    path = str(tmp_path / "t")
    with pytest.warns(UserWarning, match="frozen="):  # an old call: it works, and says what it cannot check
        slt_jax.save_ticket(path, {"seed": 0, "input_shape": [64]}, masks, model=MLP(), method="crbg")
    assert slt_jax.load_ticket(path, model=MLP()).meta["weights_fingerprint"]["leaves"]
    with pytest.raises(TicketError):
        slt_jax.load_ticket(path, model=MLP(kernel="normal"))


def _edited_ticket(digits_run, tmp_path, edit):
    workdir, _, _ = digits_run
    path = tmp_path / "ticket"
    shutil.copytree(workdir / "ticket", path)
    meta = json.load(open(path / "ticket.json"))
    edit(meta)
    json.dump(meta, open(path / "ticket.json", "w"))
    return str(path)


def test_other_weights_under_another_jax_version_name_the_jax_version(digits_run, tmp_path):
    def edit(meta):
        meta["weights_fingerprint"]["settings"]["jax"] = "0.4.1"
        meta["weights_fingerprint"]["leaves"]["Dense_1/kernel"] = "0" * 64

    with pytest.raises(TicketError) as err:
        slt_jax.load_ticket(_edited_ticket(digits_run, tmp_path, edit))
    message = str(err.value)
    assert "\n" not in message and "jax 0.4.1" in message and jax.__version__ in message and "Dense_1/kernel" in message


def test_other_weights_under_the_same_settings_name_seed_and_model(digits_run, tmp_path):
    path = _edited_ticket(digits_run, tmp_path, lambda m: m["weights_fingerprint"]["leaves"].update(
        {"Dense_0/kernel": "0" * 64}))
    with pytest.raises(TicketError) as err:
        slt_jax.load_ticket(path)
    message = str(err.value)
    assert "\n" not in message and "seed" in message and "model" in message and "Dense_0/kernel" in message


def test_a_ticket_without_a_fingerprint_still_loads(digits_run, tmp_path):
    def edit(meta):  # as slt_jax wrote tickets before format 3
        meta["format_version"] = 2
        del meta["weights_fingerprint"]

    workdir, summary, val = digits_run
    ticket = slt_jax.load_ticket(_edited_ticket(digits_run, tmp_path, edit))
    data = np.load(val)
    assert np.mean(ticket.predict(data["x_val"]) == data["y_val"]) == summary["val_accuracy"]


def test_a_jax_without_the_flags_context_managers_still_draws_under_the_recorded_flags(monkeypatch):
    from slt_jax.weights_fingerprint import drawn_under

    monkeypatch.delattr(jax, "enable_x64")  # as in a jax that has only jax.config.update for it
    with drawn_under({"jax_enable_x64": True}):
        assert jax.numpy.zeros(()).dtype == np.float64
    assert jax.numpy.zeros(()).dtype == np.float32 and not jax.config.jax_enable_x64
