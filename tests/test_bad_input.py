"""Bad input through the real CLI: one clear stderr line, a non-zero exit, nothing good overwritten.

Every case reruns ``run.py`` with one bad option against the workdir of a finished good run and
must fail before training. Each case is a process of its own, forked from one that has imported
run.py's dependencies (tests/forked_run_py.py). The tests at the end call the real loader
in-process for what a subprocess cannot show (memory, keys).
"""
import io
import json
import os
import shutil
import subprocess
import sys
import tracemalloc
import zipfile

import numpy as np
import pytest

from conftest import ROOT

EXIT_BAD_INPUT = 2
GOOD_FILES = ("config.json", "metrics.jsonl", "summary.json", "ticket/ticket.json", "ticket/mask.npz")


def _npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


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
        "zero_size_images": dict(x_train=np.zeros((40, 0, 8), np.uint8), y_train=y),
        "objects": dict(x_train=np.array([*x, None], dtype=object)[:40], y_train=y),  # savez pickles them
        "one_class": dict(x_train=x, y_train=np.zeros(40, np.int64)),
        "huge_pixels": dict(x_train=np.where(x > 128, 1e300, x / 255.0), y_train=y),  # inf in float32
        # good data (enough for a validation split), for cases about something else
        "ten_classes": dict(x_train=np.concatenate([x] * 5), y_train=np.concatenate([y] * 5)),
    }
    for name, arrays in files.items():
        np.savez(d / f"{name}.npz", **arrays)
    with zipfile.ZipFile(d / "absurd_header.npz", "w") as z:  # a .npy header claiming 512 TiB of uint8 pixels
        header = io.BytesIO()
        np.lib.format.write_array_header_1_0(header, {"descr": "|u1", "fortran_order": False,
                                                      "shape": (2**39, 32, 32)})
        z.writestr("x_train.npy", header.getvalue() + bytes(1024))
        z.writestr("y_train.npy", _npy_bytes(y))
    (d / "not_a_zip.npz").write_text("these are not arrays\n")
    (d / "a_file").write_text("not a directory")


def _write_bad_params_files(d) -> None:
    """frozen_from files for the default model, each wrong in one way, as DIR/weights_NAME.npz."""
    from configs import default
    from slt_jax.frozen import init_variables
    from slt_jax.masking import named_leaves
    from slt_jax.models import create_model
    from slt_jax.run_config import model_spec
    from slt_jax.ticket import ZOO_INIT_KWARGS

    model = create_model(model_spec(default.get_config(), 10))
    good = named_leaves(init_variables(model, (8, 8, 1), 0, ZOO_INIT_KWARGS)["params"])
    kernel = good["Dense_1/kernel"]
    files = {
        "nan": {**good, "Dense_1/kernel": np.where(kernel > 0, np.nan, kernel)},
        "extra_key": {**good, "Dense_7/kernel": kernel},
        "int_weights": {**good, "Dense_0/kernel": np.round(good["Dense_0/kernel"] * 10).astype(np.int64)},
    }
    for name, arrays in files.items():
        np.savez(d / f"weights_{name}.npz", **arrays)


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
    "bad_activation": (["--config.activation=prelu"], ["activation='prelu'", "allowed: relu, leaky_relu"]),
    "bad_lr_schedule": (["--config.lr_schedule=sawtooth"], ["sawtooth", "allowed", "constant"]),
    "gate_policy_matches_nothing": (["--config.gate_policy=^Conv_9/"], ["^Conv_9/", "matches no parameter"]),
    "structured_policy_not_a_regex": (["--config.structured=True", "--config.structured_policy=Dense_[0"],
                                      ["structured_policy='Dense_[0'", "regular expression", "allowed"]),
    "unknown_tfds": (["--config.dataset=tfds:surely_not_a_dataset"], ["surely_not_a_dataset", "allowed"]),
    "missing_frozen_from": (["--config.frozen_from=/nonexistent/weights.npz"],
                            ["frozen_from='/nonexistent/weights.npz'", "cannot be read", "allowed", ".npz"]),
    "unprepared_tfds": (["--config.dataset=mnist", "--config.tfds_data_dir={d}/no_tfds"],
                        ["'mnist' is not prepared", "tfds build mnist", "npz:PATH"]),
    "tfds_prefix_on_a_named_dataset": (["--config.dataset=tfds:mnist"], ["dataset='tfds:mnist'", "allowed: mnist"]),
    # Seeds: PRNGKey(2**40) used to alias PRNGKey(0); every accepted seed is its own Threefry key.
    "seed_negative": (["--config.seed=-1"], ["seed=-1", "allowed: an integer in [0, 4294967295]"]),
    "seed_2_32": (["--config.seed=4294967296"], ["seed=4294967296", "allowed: an integer in [0, 4294967295]"]),
    "seed_2_40": (["--config.seed=1099511627776"], ["seed=1099511627776", "allowed: an integer in [0, 4294967295]"]),
    "split_seed_negative": (["--config.split_seed=-1"], ["split_seed=-1", "allowed: an integer in [0, 4294967295]"]),
    "split_seed_2_32": (["--config.split_seed=4294967296"],
                        ["split_seed=4294967296", "allowed: an integer in [0, 4294967295]"]),
    "split_seed_2_40": (["--config.split_seed=1099511627776"],
                        ["split_seed=1099511627776", "allowed: an integer in [0, 4294967295]"]),
    # Bookkeeping values a finished workdir must not be rewritten with (config.json stays as it was).
    "log_every_zero": (["--config.log_every=0"], ["log_every=0", "allowed: an integer >= 1"]),
    "eval_every_zero": (["--config.eval_every=0"], ["eval_every=0", "allowed: an integer >= 1"]),
    "eval_batch_size_zero": (["--config.eval_batch_size=0"], ["eval_batch_size=0", "allowed: an integer >= 1"]),
    "ticket_coding_zip": (["--config.ticket_coding=zip"], ["ticket_coding='zip'", "allowed: packbits, golomb"]),
    "bn_recalibration_negative": (["--config.bn_recalibration_batches=-1"],
                                  ["bn_recalibration_batches=-1", "allowed: an integer >= 0"]),
    "iterand_redraw_every_zero": (["--config.iterand.redraw_every=0"],
                                  ["iterand: redraw_every=0", "allowed: an integer >= 1"]),
    # The model against the data's images, before any weight is drawn.
    "width_zero": (["--config.width=0"], ["width=0", "allowed: a number in (0.0, inf)"]),
    "width_leaves_no_units": (["--config.width=0.001"], ["width=0.001", "no units", "allowed"]),
    "width_splits_no_head": (["--config.model=swin_t", "--config.width=0.2"],
                             ["width=0.2 does not fit model swin_t", "not a multiple of its 3 heads", "allowed"]),
    "conv8_on_8x8_digits": (["--config.model=conv8"],
                            ["model conv8 needs larger inputs than 8x8x1", "allowed: images of 16x16 or larger"]),
    "synthetic_shape_zero": (["--config.dataset=synthetic", "--config.synthetic_shape=(0,0,1)"],
                             ["synthetic_shape=(0, 0, 1)", "allowed", "H, W >= 1"]),
    "num_classes_zero": (["--config.dataset=synthetic", "--config.num_classes=0"],
                         ["num_classes=0", "allowed: an integer >= 2"]),
    "more_classes_than_synthetic_examples": (["--config.dataset=synthetic", "--config.synthetic_size=5"],
                                             ["num_classes=10", "synthetic_size=5", "allowed"]),
    # Data that used to crash, mislead or pass silently.
    "zero_size_images": (["--config.dataset=npz:{d}/zero_size_images.npz"], ["(40, 0, 8)", "zero-size", "allowed"]),
    "pickled_objects": (["--config.dataset=npz:{d}/objects.npz"],
                        ["x_train", "pickled objects are not loaded", "plain numeric arrays"]),
    "one_class": (["--config.dataset=npz:{d}/one_class.npz"], ["only class 0", "at least 2"]),
    "pixels_beyond_float32": (["--config.dataset=npz:{d}/huge_pixels.npz"], ["x_train", "1e+300", "float32"]),
    # Params files (frozen_from): NaN used to train to exit 3 "lower learning_rate?"; an extra leaf was
    # dropped and int weights cast, without a word.
    "frozen_from_nan": (["--config.frozen_from={d}/weights_nan.npz"], ["'Dense_1/kernel'", "NaN", "allowed: finite"]),
    "frozen_from_extra_key": (["--config.frozen_from={d}/weights_extra_key.npz"],
                              ["'Dense_7/kernel'", "not a parameter", "allowed"]),
    "frozen_from_int_weights": (["--config.frozen_from={d}/weights_int_weights.npz"],
                                ["'Dense_0/kernel'", "int64", "allowed: float16, float32 or float64"]),
    # A head of 10**11 weights: refused from its traced shapes, where it used to stall for minutes.
    "num_classes_beyond_memory": (["--config.dataset=npz:{d}/ten_classes.npz", "--config.model=lenet300",
                                   "--config.num_classes=1000000001"],
                                  ["num_classes=1000000001", "100000049300 parameters", "is available", "allowed"]),
    "absurd_npy_header": (["--config.dataset=npz:{d}/absurd_header.npz"],
                          ["x_train", "(549755813888, 32, 32)", "is available", "fits in memory"]),
}


@pytest.fixture(scope="module")
def good_run(short_run, tmp_path_factory):
    """A finished run (a copy of the shared short_run) whose files must survive every failed rerun in
    the same workdir."""
    workdir = tmp_path_factory.mktemp("good") / "run"
    shutil.copytree(short_run.workdir, workdir)
    return workdir, {name: (workdir / name).read_bytes() for name in GOOD_FILES}


@pytest.fixture(scope="module")
def results(good_run, tmp_path_factory):
    """id -> (exit code, stderr) for every case: each a run.py process of its own, forked from one that
    imported run.py's dependencies once (tests/forked_run_py.py), so a case costs its own work only."""
    workdir, _ = good_run
    d = tmp_path_factory.mktemp("bad")
    _write_bad_npz_files(d)
    _write_bad_params_files(d)
    commands = []
    for args, _ in CASES.values():
        args = [a.format(d=d) for a in args]  # first: --config FILE must precede every --config.KEY
        if "--workdir" not in args:
            args += ["--workdir", str(workdir)]
        commands.append([*args, "--config.progress=False"])
    p = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "forked_run_py.py")], input=json.dumps(commands),
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return {name: tuple(result) for name, result in zip(CASES, json.loads(p.stdout))}


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


# In-process: what the CLI cannot show (memory use, keys) through the real loader.

def test_seeds_map_one_to_one_to_weights_keys():
    import jax

    from configs import default
    from slt_jax.frozen import weights_key
    from slt_jax.run_config import ConfigError, validate_config

    seeds = (0, 1, 2**31 - 1, 2**31, 2**31 + 1, 2**32 - 2, 2**32 - 1)
    c = default.get_config()
    for s in seeds:
        c.seed = c.split_seed = s
        validate_config(c)  # every seed in [0, 2**32 - 1] is accepted...
        assert jax.random.key_data(weights_key(s)).tolist() == [0, s]  # ...and is its own key, no overflow
        assert int(jax.random.key_data(jax.random.PRNGKey(s)).ravel()[-1]) == s
    for s in (-1, 2**32, 2**40):  # ...and nothing else (2**40 used to alias seed 0)
        c.seed = s
        with pytest.raises(ConfigError, match=f"seed={s}; allowed"):
            validate_config(c)


def test_npz_that_expands_beyond_memory_is_refused_before_loading(tmp_path, monkeypatch):
    """A savez_compressed file of zeros: 0.2 MB on disk, 200 MB of uint8 (1 GB with its float32
    copy); with 256 MiB available it is refused from the .npy header, nothing allocated."""
    import slt_jax.data as data
    from configs import default

    shape, rows = (200_000, 32, 32), 1 << 13
    path = tmp_path / "bomb.npz"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:  # np.savez_compressed, streamed
        with z.open("x_train.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False, "shape": shape})
            block = bytes(rows * 32 * 32)
            for _ in range(shape[0] // rows):
                f.write(block)
            f.write(bytes(shape[0] % rows * 32 * 32))
        z.writestr("y_train.npy", _npy_bytes(np.arange(shape[0]) % 10))
    assert path.stat().st_size < 2**20
    monkeypatch.setattr(data, "available_memory", lambda: 256 * 2**20)
    c = default.get_config()
    c.dataset = f"npz:{path}"
    tracemalloc.start()
    try:
        with pytest.raises(data.DataError) as e:
            data.load_dataset(c)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    message = str(e.value)
    assert "\n" not in message and "(200000, 32, 32)" in message and "256.0 MiB is available" in message, message
    assert peak < 8 * 2**20, peak


def test_preprocessing_never_makes_a_whole_float64_copy(monkeypatch):
    """Normalisation statistics and float32 inputs are computed chunk by chunk, with the same values."""
    from slt_jax.data import arrays

    x = np.random.default_rng(0).integers(0, 256, (1024, 32, 32, 3), dtype=np.uint8)  # 3 MB; float64: 25 MB
    reference = np.asarray(x, np.float64) / 255.0
    monkeypatch.setattr(arrays, "CHUNK_VALUES", 1 << 16, raising=False)
    tracemalloc.start()
    try:
        spec = arrays.normalisation(x, 1.0 / 255.0)
        out = arrays.preprocess(x, spec)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < out.nbytes + 4 * 2**20, peak  # the float32 result plus a few small chunks
    np.testing.assert_allclose(spec["mean"], reference.mean(axis=(0, 1, 2)), rtol=1e-12)
    np.testing.assert_allclose(spec["std"], reference.std(axis=(0, 1, 2)), rtol=1e-12)
    mean, std = np.float32(spec["mean"]), np.float32(spec["std"])
    np.testing.assert_array_equal(out, (x.astype(np.float32) * np.float32(spec["scale"]) - mean) / std)


def test_pixels_that_overflow_float32_once_normalised_are_refused():
    from slt_jax.data.arrays import DataError, from_arrays

    x = np.full((40, 4, 4), -3e38)  # each pixel fits float32, but x - mean does not
    x[:, 0, 0] = 3e38
    with pytest.raises(DataError, match="x_train overflows float32 once normalised"):
        from_arrays("t", x, np.arange(40) % 2, val_fraction=0.1)
