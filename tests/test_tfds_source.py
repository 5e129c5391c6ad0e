"""``tfds:NAME`` through grain: the real loop on mock CIFAR-10, batch purity, augmentations, fail-fast.

The mock: ``tfds.testing.mock_data`` serves random records; the dataset's metadata (splits, file
format) is written by ``_prepared_metadata`` so that the loader's preparedness check sees a
prepared array_record dataset, as it would after ``tfds build``.
"""
import os

import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets", reason="the tfds extra is not installed")

from slt_jax import cli, load_ticket  # noqa: E402
from slt_jax.data import DataError, load_dataset  # noqa: E402
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


@pytest.fixture
def mock_cifar(tmp_path):
    data_dir = tmp_path / "tfds"
    _prepared_metadata(data_dir)
    with tfds.testing.mock_data(num_examples=NUM_EXAMPLES, policy=tfds.testing.MockPolicy.USE_FILES,
                                data_dir=str(data_dir)):
        yield str(data_dir)


def _tfds_config(c, data_dir):
    c.dataset = "tfds:cifar10"
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


def test_unprepared_dataset_fails_fast_with_how_to_prepare(tiny_config, tmp_path, capsys):
    c = tiny_config
    c.dataset, c.tfds_data_dir = "tfds:cifar10", str(tmp_path / "empty")
    with pytest.raises(DataError) as e:
        load_dataset(c)
    message = str(e.value)
    assert "\n" not in message and "not prepared" in message
    for hint in ("tfds build cifar10", "TFDS_DATA_DIR", "--config.dataset=tfds:cifar10"):
        assert hint in message
    assert cli.run(c, str(tmp_path / "run")) == cli.EXIT_BAD_INPUT
    assert capsys.readouterr().err.strip().splitlines() == [f"error: {message}"]


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
