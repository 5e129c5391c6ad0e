"""Bad input through the real CLI: one clear stderr line, a non-zero exit, nothing good overwritten.

Every case reruns ``run.py`` with one bad option against the workdir of a finished good run and
must fail before training. The cases run concurrently (each is one short subprocess).
"""
import concurrent.futures
import subprocess
import sys

import numpy as np
import pytest

from slt_jax.train import train_and_evaluate

from conftest import ROOT

EXIT_BAD_INPUT = 2
GOOD_FILES = ("config.json", "metrics.jsonl", "summary.json", "ticket/ticket.json", "ticket/mask.npz")


def _write_bad_npz_files(d) -> None:
    """Datasets that are each wrong in one way, as DIR/NAME.npz."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (40, 8, 8), dtype=np.uint8)
    y = np.arange(40) % 10
    files = {
        "no_keys": dict(images=x, labels=y),
        "flat_images": dict(x_train=x.reshape(40, 64), y_train=y),
        "five_channels": dict(x_train=np.zeros((40, 8, 8, 5), np.uint8), y_train=y),
        "label_too_big": dict(x_train=x, y_train=np.where(y == 3, 12, y)),
        "label_negative": dict(x_train=x, y_train=np.where(y == 3, -1, y)),
        "label_fraction": dict(x_train=x, y_train=y + 0.5),
        "label_count": dict(x_train=x, y_train=y[:30]),
        "nan_pixels": dict(x_train=np.where(x > 250, np.nan, x / 255.0), y_train=y),
        "empty": dict(x_train=np.zeros((0, 8, 8), np.uint8), y_train=np.zeros(0, np.int64)),
    }
    for name, arrays in files.items():
        np.savez(d / f"{name}.npz", **arrays)
    (d / "not_a_zip.npz").write_text("these are not arrays\n")
    (d / "a_file").write_text("not a directory")


# id -> (CLI arguments, strings the error line must contain); {d} is the directory of the bad files.
CASES = {
    "missing_npz": (["--config.dataset=npz:/nonexistent/data.npz"], ["/nonexistent/data.npz", "existing .npz"]),
    "not_a_zip": (["--config.dataset=npz:{d}/not_a_zip.npz"], ["not_a_zip.npz", "numpy.savez"]),
    "npz_lacks_keys": (["--config.dataset=npz:{d}/no_keys.npz"], ["x_train", "y_train", "images"]),
    "flat_images": (["--config.dataset=npz:{d}/flat_images.npz"], ["(40, 64)", "(N, H, W)"]),
    "five_channels": (["--config.dataset=npz:{d}/five_channels.npz"], ["(40, 8, 8, 5)", "C in {1, 3}"]),
    "label_out_of_range": (["--config.dataset=npz:{d}/label_too_big.npz"], ["label 12", "0 to 9"]),
    "label_negative": (["--config.dataset=npz:{d}/label_negative.npz"], ["label -1", "allowed"]),
    "label_not_integer": (["--config.dataset=npz:{d}/label_fraction.npz"], ["non-integer", "allowed"]),
    "label_count_mismatch": (["--config.dataset=npz:{d}/label_count.npz"], ["(30,)", "(40,)"]),
    "nan_pixels": (["--config.dataset=npz:{d}/nan_pixels.npz"], ["NaN", "finite"]),
    "empty_dataset": (["--config.dataset=npz:{d}/empty.npz"], ["empty", "(0, 8, 8)"]),
    "unknown_model": (["--config.model=resnet9000"], ["resnet9000", "allowed", "lenet300"]),
    "unknown_method": (["--config.method=magic"], ["magic", "allowed", "crbg", "edgepopup"]),
    "unknown_dataset": (["--config.dataset=imagenet22k"], ["imagenet22k", "allowed", "npz:PATH"]),
    "unknown_gate_family": (["--config.crbg.family=laplace"], ["laplace", "allowed", "gaussian"]),
    "sparsity_one": (["--config.sparsity=1.0"], ["sparsity=1.0", "allowed: a number in [0.0, 1.0)"]),
    "sparsity_negative": (["--config.sparsity=-0.2"], ["sparsity=-0.2", "allowed: a number in [0.0, 1.0)"]),
    "batch_size_zero": (["--config.batch_size=0"], ["batch_size=0", "allowed: an integer >= 1"]),
    "batch_size_too_big": (["--config.batch_size=4096"], ["batch_size=4096", "allowed: 1 to"]),
    "batch_size_not_divisible": (["--config.batch_size=63"], ["batch_size=63", "8 devices", "multiple of 8"]),
    "unwritable_workdir": (["--workdir", "{d}/a_file/run"], ["a_file/run", "not writable"]),
    "missing_config_file": (["--config", "{d}/nope.py"], ["nope.py", "No such file", "allowed"]),
    "unknown_config_key": (["--config.nope=1"], ["--config.nope", "allowed"]),
    "misspelt_config_key": (["--config.sparsty=0.5"], ["--config.sparsty", "sparsity"]),
    "config_value_type": (["--config.batch_size=many"], ["--config.batch_size=many", "int"]),
    "bad_lambda_mode": (["--config.crbg.lambda_mode=sometimes"], ["sometimes", "allowed", "dual"]),
    "bad_edgepopup_scope": (["--config.method=edgepopup", "--config.edgepopup.scope=planet"],
                            ["planet", "allowed", "layer"]),
    "bad_weight_init": (["--config.weight_init=zeros"], ["zeros", "allowed", "signed_kaiming"]),
    "bad_lr_schedule": (["--config.lr_schedule=sawtooth"], ["sawtooth", "allowed", "constant"]),
    "gate_policy_matches_nothing": (["--config.gate_policy=^Conv_9/"], ["^Conv_9/", "matches no parameter"]),
    "structured_policy_not_a_regex": (["--config.structured=True", "--config.structured_policy=Dense_[0"],
                                      ["structured_policy='Dense_[0'", "regular expression", "allowed"]),
    "unknown_tfds": (["--config.dataset=tfds:surely_not_a_dataset"], ["surely_not_a_dataset", "allowed"]),
    "missing_frozen_from": (["--config.frozen_from=/nonexistent/weights.npz"],
                            ["frozen_from='/nonexistent/weights.npz'", "cannot be read", "allowed", ".npz"]),
    "unprepared_tfds": (["--config.dataset=tfds:mnist", "--config.tfds_data_dir={d}/no_tfds"],
                        ["'mnist' is not prepared", "tfds build mnist"]),
}


@pytest.fixture(scope="module")
def good_run(tmp_path_factory):
    """A finished run whose files must survive every failed rerun in the same workdir."""
    from configs import default

    c = default.get_config()
    c.num_epochs, c.num_steps, c.log_every, c.eval_every, c.checkpoint_every = 0, 20, 10, 20, 0
    c.progress = c.plots = False
    c.num_devices = 1
    workdir = tmp_path_factory.mktemp("good")
    train_and_evaluate(c, str(workdir))
    return workdir, {name: (workdir / name).read_bytes() for name in GOOD_FILES}


@pytest.fixture(scope="module")
def results(good_run, tmp_path_factory):
    """id -> (exit code, stderr) for every case, run 4 at a time."""
    workdir, _ = good_run
    d = tmp_path_factory.mktemp("bad")
    _write_bad_npz_files(d)

    def call(args):
        args = [a.format(d=d) for a in args]  # first: --config FILE must precede every --config.KEY
        if "--workdir" not in args:
            args += ["--workdir", str(workdir)]
        p = subprocess.run([sys.executable, "run.py", *args, "--config.progress=False"], cwd=ROOT,
                           capture_output=True, text=True, timeout=120)
        return p.returncode, p.stderr

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        futures = {name: pool.submit(call, args) for name, (args, _) in CASES.items()}
        return {name: f.result() for name, f in futures.items()}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_gives_one_clear_line(results, case):
    code, stderr = results[case]
    lines = stderr.strip().splitlines()
    assert code == EXIT_BAD_INPUT, stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    for text in CASES[case][1]:
        assert text in lines[0], f"{text!r} not in {lines[0]!r}"


def test_failed_reruns_leave_the_good_run_intact(results, good_run):
    workdir, before = good_run
    assert all(code != 0 for code, _ in results.values())
    for name, content in before.items():
        assert (workdir / name).read_bytes() == content, name
