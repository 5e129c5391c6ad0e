"""TFDS datasets through grain: ``dataset=mnist`` by name, the real loop on mock CIFAR-10, batch purity,
augmentations, and an unprepared dataset failing in seconds with one line.

The mock: ``tfds.testing.mock_data`` serves random records; the dataset's metadata (splits, file
format) is written by ``_prepared_metadata`` so that the loader's preparedness check sees a
prepared array_record dataset, as it would after ``tfds build``.
"""
import importlib
import os
import socket
import time

import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets", reason="the tfds extra is not installed")

from slt_jax import cli, load_ticket  # noqa: E402
from slt_jax.data import DataError, load_dataset, training_arrays  # noqa: E402
from slt_jax.data.tfds_source import (TfdsDataset, random_resized_crop, resize_center_crop,  # noqa: E402
                                      TRAIN_TRANSFORMS)
from slt_jax.train import train_and_evaluate  # noqa: E402

NUM_EXAMPLES = 96


def _prepared_metadata(data_dir, name="cifar10", splits=("train", "test")):
    builder = tfds.builder(name, data_dir=str(data_dir), file_format="array_record")
    infos = [tfds.core.SplitInfo(name=s, shard_lengths=[NUM_EXAMPLES], num_bytes=0,
                                 filename_template=tfds.core.naming.ShardedFileTemplate(
                                     data_dir=builder.data_path, dataset_name=name, split=s,
                                     filetype_suffix="array_record"))
             for s in splits]
    builder.info.set_splits(tfds.core.SplitDict(infos))
    os.makedirs(builder.data_path, exist_ok=True)
    builder.info.write_to_directory(builder.data_path)


def _mock(data_dir, name):
    _prepared_metadata(data_dir, name)
    return tfds.testing.mock_data(num_examples=NUM_EXAMPLES, policy=tfds.testing.MockPolicy.USE_FILES,
                                  data_dir=str(data_dir))


@pytest.fixture
def mock_cifar(tmp_path):
    with _mock(tmp_path / "tfds", "cifar10"):
        yield str(tmp_path / "tfds")


@pytest.fixture
def mock_mnist(tmp_path):
    with _mock(tmp_path / "tfds", "mnist"):
        yield str(tmp_path / "tfds")


def test_mnist_config_runs_on_the_dataset_by_name(mock_mnist, tmp_path):
    c = importlib.import_module("configs.mnist_lenet300_crbg").get_config()
    assert c.dataset == "mnist"  # the config's own default: no path a clone lacks
    c.tfds_data_dir, c.num_steps, c.batch_size, c.eval_batch_size = mock_mnist, 2, 8, 32
    c.log_every, c.eval_every, c.checkpoint_every, c.num_devices, c.progress, c.plots = 1, 2, 0, 1, False, False
    data = load_dataset(c)
    assert (data.name, data.input_shape, data.num_classes, data.augment) == ("mnist", (28, 28, 1), 10, "none")
    summary = train_and_evaluate(c, str(tmp_path / "run"))
    assert summary["dataset"] == "mnist" and summary["num_steps"] == 2 and 0.0 <= summary["test_accuracy"] <= 1.0
    assert load_ticket(str(tmp_path / "run" / "ticket")).meta["input_shape"] == [28, 28, 1]


def test_training_arrays_read_the_whole_train_split(mock_mnist):
    x, y = training_arrays("mnist", mock_mnist)
    assert x.shape == (NUM_EXAMPLES, 28, 28, 1) and x.dtype == np.uint8 and y.shape == (NUM_EXAMPLES,)
    assert x.std() > 0 and set(np.unique(y)) <= set(range(10))


def _tfds_config(c, data_dir):
    c.dataset = "cifar10"
    c.tfds_data_dir = data_dir
    c.batch_size = 8
    c.eval_batch_size = 32
    return c


@pytest.mark.slow  # a Conv2 trained on CIFAR-shaped images through the tfds pipeline
def test_real_loop_on_mock_cifar_writes_a_ticket(mock_cifar, tiny_config, tmp_path):
    c = _tfds_config(tiny_config, mock_cifar)
    c.model, c.width = "conv2", 0.125
    c.num_steps, c.log_every, c.eval_every = 4, 2, 4
    summary = train_and_evaluate(c, str(tmp_path / "run"))
    assert summary["num_steps"] == 4 and 0.0 <= summary["test_accuracy"] <= 1.0
    ticket = load_ticket(str(tmp_path / "run" / "ticket"))
    assert ticket.meta["input_shape"] == [32, 32, 3] and len(ticket.meta["preprocessing"]["mean"]) == 3


def test_batches_are_a_pure_function_of_seed_and_step(mock_cifar, tiny_config):
    c = _tfds_config(tiny_config, mock_cifar)
    first, second = load_dataset(c), load_dataset(c)
    assert first.augment == "cifar" and first.input_shape == (32, 32, 3)
    sequential = [first.train_batch(0, step, 8) for step in range(6)]  # one read-ahead iterator
    x5, y5 = second.train_batch(0, 5, 8)  # random access, a fresh pipeline: what a resumed run does
    np.testing.assert_array_equal(x5, sequential[5][0])
    np.testing.assert_array_equal(y5, sequential[5][1])
    x2, _ = second.train_batch(0, 2, 8)  # going back rebuilds the iterator at that step
    np.testing.assert_array_equal(x2, sequential[2][0])
    assert not np.array_equal(second.train_batch(1, 5, 8)[0], x5)  # another seed, other batches
    assert sequential[0][0].dtype == np.float32 and sequential[0][1].dtype == np.int32


def test_validation_is_carved_from_train_and_epochs_reshuffle(mock_cifar, tiny_config):
    c = _tfds_config(tiny_config, mock_cifar)
    c.val_fraction = 0.25
    data = load_dataset(c)
    val = np.concatenate([y for _, y in data.eval_batches("val", 10)])
    test = np.concatenate([y for _, y in data.eval_batches("test", 10)])
    assert len(val) == NUM_EXAMPLES // 4 and data.num_train == NUM_EXAMPLES - len(val) and len(test) == NUM_EXAMPLES
    assert data.has_split("test") and not data.has_split("extra")
    spe = data.steps_per_epoch(8)
    epoch0 = np.concatenate([data.train_batch(0, s, 8)[1] for s in range(spe)])
    epoch1 = np.concatenate([data.train_batch(0, s, 8)[1] for s in range(spe, 2 * spe)])
    # every training example once per epoch, in a new order
    assert np.array_equal(np.sort(epoch0), np.sort(epoch1)) and not np.array_equal(epoch0, epoch1)


@pytest.mark.parametrize("name", ["mnist", "cifar10"])
def test_unprepared_dataset_fails_fast_with_how_to_prepare(name, tiny_config, tmp_path, capsys, monkeypatch):
    """An empty TFDS data dir: one line with the exact command (or the arrays to pass), in seconds, and no
    connection attempted (tfds's download retries for minutes offline)."""
    connections = []

    def no_network(sock, address):
        connections.append(address)
        raise OSError("no network in this test")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    c = tiny_config
    empty = tmp_path / "empty"
    empty.mkdir()
    c.dataset, c.tfds_data_dir = name, str(empty)
    start = time.monotonic()
    with pytest.raises(DataError) as e:
        load_dataset(c)
    assert time.monotonic() - start < 20 and connections == []
    message = str(e.value)
    assert "\n" not in message and f"dataset '{name}' is not prepared in {empty}" in message
    for hint in (f"`pip install tensorflow && tfds build {name} --data_dir={empty} --file_format=array_record`",
                 "--config.tfds_data_dir", "--config.dataset=npz:PATH holding x_train, y_train"):
        assert hint in message
    assert cli.run(c, str(tmp_path / "run")) == cli.EXIT_BAD_INPUT
    assert capsys.readouterr().err.strip().splitlines() == [f"error: {message}"]
    assert os.listdir(empty) == []  # nothing downloaded or created


def test_manual_download_dataset_says_where_its_files_go(tiny_config, tmp_path):
    tiny_config.dataset, tiny_config.tfds_data_dir = "imagenet2012", str(tmp_path)
    with pytest.raises(DataError, match=f"names in {tmp_path}/downloads/manual, then `pip install tensorflow"):
        load_dataset(tiny_config)


def test_each_dataset_has_one_spelling(tiny_config):
    tiny_config.dataset = "tfds:mnist"
    with pytest.raises(DataError, match="dataset='tfds:mnist'; allowed: mnist "):
        load_dataset(tiny_config)


def test_unknown_dataset_name_is_a_data_error(tiny_config):
    tiny_config.dataset = "tfds:no_such_dataset_anywhere"
    with pytest.raises(DataError, match="unknown tfds dataset 'no_such_dataset_anywhere'"):
        load_dataset(tiny_config)


def test_imagenet_pipeline_on_variable_sized_images():
    rng = np.random.default_rng(0)
    records = [{"image": rng.integers(0, 256, (int(rng.integers(60, 120)), int(rng.integers(60, 120)), 3), np.uint8),
                "label": i % 4} for i in range(24)]
    data = TfdsDataset("list", records, records[:8], num_classes=4, augment="imagenet", val_fraction=0.25, split_seed=0)
    assert data.input_shape == (224, 224, 3)
    x, y = data.train_batch(0, 0, 4)
    assert x.shape == (4, 224, 224, 3) and set(y) <= set(range(4))
    x_test, _ = next(data.eval_batches("test", 8))
    assert x_test.shape == (8, 224, 224, 3)


def test_eval_resize_center_crop_keeps_the_centre():
    image = np.zeros((300, 400, 3), np.uint8)
    image[100:200, 150:250] = 255  # a bright centre square
    out = resize_center_crop(image, size=224, resize=256)
    assert out.shape == (224, 224, 3)
    assert out[112, 112].min() == 255 and out[0, 0].max() == 0


def test_random_resized_crop_and_cifar_crop_are_seeded():
    image = np.random.default_rng(0).integers(0, 256, (50, 70, 3), np.uint8)
    crops = [random_resized_crop(image, np.random.default_rng(s), size=32) for s in (1, 1, 2)]
    assert crops[0].shape == (32, 32, 3)
    np.testing.assert_array_equal(crops[0], crops[1])
    assert not np.array_equal(crops[0], crops[2])
    small = np.random.default_rng(1).integers(1, 256, (32, 32, 3), np.uint8)
    shifted = [TRAIN_TRANSFORMS["cifar"](small, np.random.default_rng(s)) for s in range(8)]
    assert all(s.shape == (32, 32, 3) for s in shifted)
    # no source pixel is 0, so zeros are padding: whole rows / columns, at most 4 of each (shift <= 4)
    for s in shifted:
        zero = (s == 0).all(axis=-1)
        rows, cols = zero.all(axis=1), zero.all(axis=0)
        assert rows.sum() <= 4 and cols.sum() <= 4
        np.testing.assert_array_equal(zero, rows[:, None] | cols[None, :])
    assert any((s == 0).any() for s in shifted)


def test_crbg_study_derives_shifted_mnist_from_the_dataset_it_is_given(mock_mnist, tmp_path, monkeypatch):
    from benchmarks import crbg_study

    monkeypatch.setenv("TFDS_DATA_DIR", mock_mnist)  # where the study's runs and its derivation read TFDS
    x, y = training_arrays("mnist")
    config = crbg_study.cell_config("crbg", "lenet300", "mnist_shifted", 0.9, 0, 1, "mnist", str(tmp_path))
    path = tmp_path / "data" / "mnist" / "mnist_shifted.npz"
    assert config.dataset == f"npz:{path}"
    with np.load(path) as f:
        shifted, labels = f["x_train"], f["y_train"]
    np.testing.assert_array_equal(labels, y)
    np.testing.assert_array_equal(shifted, crbg_study.shifted(x[..., 0]))
    assert not np.array_equal(shifted, x[..., 0])
    assert crbg_study.cell_config("crbg", "lenet300", "mnist", 0.9, 0, 1, "mnist", str(tmp_path)).dataset == "mnist"
