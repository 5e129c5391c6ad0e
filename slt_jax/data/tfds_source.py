"""The tensorflow-datasets datasets (``mnist``, ``cifar10``, ... and ``tfds:NAME``; see ``slt_jax.data``):
prepared image datasets, read without TensorFlow.

Preparing is TFDS's job, done once on a machine with network (``tfds build`` needs TensorFlow)::

    pip install tensorflow && tfds build mnist --data_dir=DIR --file_format=array_record

DIR defaults to $TFDS_DATA_DIR, else ~/tensorflow_datasets; a run reads ``config.tfds_data_dir``
(the same default). ``prepared_builder`` checks the local metadata before anything else, so an
unprepared dataset (or a machine without network) fails in seconds with that command in a one-line
error, where tfds's own download would retry for minutes.

Records come from ``tfds.data_source`` (array_record files, random access) through a grain
``MapDataset``; the dataset needs features ``image`` (uint8 HWC) and ``label`` (ClassLabel).

Splits. ``val`` is a seeded random ``config.val_fraction`` of TFDS ``train`` (seed
``config.split_seed``) and ``train`` the rest: tune on ``val`` only. ``test`` is TFDS ``test``, or
TFDS ``validation`` when there is no ``test`` (ImageNet: the 50,000 images papers report on).

Batches are a pure function of (seed, step), as for in-memory data, so the data position is just
the step and a resumed run sees exactly the batches of an uninterrupted one::

    stream  = range(num_train).shuffle(seed).repeat()   # epoch e: a permutation seeded by seed + e
                .map(read record).random_map(augment)   # augmentation rng seeded by (seed, position)
    batches = stream.batch(batch_size // P)[p::P]       # process p of P: its rows of every batch
    train_batch(seed, step) = batches[step]

The global batch does not depend on the number of processes. A grain iterator over
``batches[step:]`` reads ahead with threads; its state is the step it has reached, so a checkpoint
(which stores the step) holds the iterator state, and resuming rebuilds the iterator at that step.
Each process reads and augments only its own rows. ``train_batch`` returns the global batch as
``sharding.shard_batch`` expects it, with the rows other processes feed left zero (never read).

Augmentation (``config.augment``; ``auto`` picks by image size):

* ``cifar``: zero-pad 4 pixels, random 32x32 (native size) crop, horizontal flip;
* ``imagenet``: random-resized crop (area 8%-100%, aspect 3/4-4/3) to 224, horizontal flip;
  evaluation: resize the shorter side to 256, centre crop 224 (``resize_center_crop``);
* ``none``: images as stored (``auto`` picks it for single-channel images such as MNIST).

Normalisation: x = (uint8 / 255 - mean) / std per channel, with mean and std estimated on up to
1,024 training images (seeded) after the evaluation transform; the ``preprocessing`` dict that
tickets record holds exactly these. ``Ticket.predict`` applies only that dict, so for ImageNet it
expects images already resized and cropped to 224x224: pass them through ``resize_center_crop``.
"""
from __future__ import annotations

import logging
import math
import os
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from slt_jax.data.arrays import DataError, available_memory, gib, normalisation, preprocess

AUGMENTATIONS = ("auto", "cifar", "imagenet", "none")
IMAGENET_SIZE, IMAGENET_RESIZE = 224, 256
STATS_IMAGES = 1024
READ_THREADS = min(8, os.cpu_count() or 1)


def resize_center_crop(image: np.ndarray, size: int = IMAGENET_SIZE, resize: int = IMAGENET_RESIZE) -> np.ndarray:
    """ImageNet evaluation: resize so the shorter side is ``resize``, then crop the central size x size."""
    h, w = image.shape[:2]
    s = resize / min(h, w)
    image = _resize(image, max(size, round(h * s)), max(size, round(w * s)))
    top, left = (image.shape[0] - size) // 2, (image.shape[1] - size) // 2
    return image[top:top + size, left:left + size]


def random_resized_crop(image: np.ndarray, rng: np.random.Generator, size: int = IMAGENET_SIZE,
                        area: tuple[float, float] = (0.08, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> np.ndarray:
    """Inception-style crop (torchvision's RandomResizedCrop): a random box of the given relative
    area and aspect ratio (10 tries, else the central crop of the clamped ratio), resized to size x size."""
    h, w = image.shape[:2]
    for _ in range(10):
        target = h * w * rng.uniform(*area)
        aspect = np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1])))
        cw, ch = round(np.sqrt(target * aspect)), round(np.sqrt(target / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            top, left = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
            return _resize(image[top:top + ch, left:left + cw], size, size)
    aspect = np.clip(w / h, *ratio)
    cw, ch = (w, round(w / aspect)) if w / h < aspect else (round(h * aspect), h)
    cw, ch = min(cw, w), min(ch, h)
    top, left = (h - ch) // 2, (w - cw) // 2
    return _resize(image[top:top + ch, left:left + cw], size, size)


def _resize(image: np.ndarray, h: int, w: int) -> np.ndarray:
    from PIL import Image

    if image.shape[:2] == (h, w):
        return image
    squeeze = image.ndim == 3 and image.shape[-1] == 1
    out = np.asarray(Image.fromarray(image[..., 0] if squeeze else image).resize((w, h), Image.BILINEAR))
    return out[..., None] if squeeze else out


def _flip(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return image[:, ::-1] if rng.random() < 0.5 else image


def _pad_crop(image: np.ndarray, rng: np.random.Generator, pad: int = 4) -> np.ndarray:
    h, w = image.shape[:2]
    padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)))
    top, left = rng.integers(0, 2 * pad + 1, size=2)
    return padded[top:top + h, left:left + w]


TRAIN_TRANSFORMS: dict[str, Callable[[np.ndarray, np.random.Generator], np.ndarray]] = {
    "cifar": lambda image, rng: _flip(_pad_crop(image, rng), rng),
    "imagenet": lambda image, rng: _flip(random_resized_crop(image, rng), rng),
    "none": lambda image, rng: image,
}
EVAL_TRANSFORMS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "cifar": lambda image: image,
    "imagenet": resize_center_crop,
    "none": lambda image: image,
}


def _read_options(grain) -> Any:
    # Threads read (and decode, augment) whole batches ahead; a short buffer bounds host memory.
    return grain.ReadOptions(num_threads=READ_THREADS, prefetch_buffer_size=2 * READ_THREADS)


def _choose_augment(requested: str, image_shape: Sequence[int | None]) -> str:
    if requested not in AUGMENTATIONS:
        raise DataError(f"augment={requested!r}; allowed: {', '.join(AUGMENTATIONS)}")
    if requested != "auto":
        return requested
    h, w, c = image_shape
    if h is None or w is None or max(h, w) > 64:
        return "imagenet"
    return "cifar" if c == 3 else "none"


class TfdsDataset:
    """A TFDS image-classification dataset behind the harness's dataset interface (see
    ``slt_jax.data.arrays.ArrayDataset``): ``train_batch(seed, step, batch_size)``, ``eval_batches``."""

    def __init__(self, name: str, train_source: Sequence[dict[str, Any]], test_source: Sequence[dict[str, Any]] | None,
                 num_classes: int, augment: str, val_fraction: float, split_seed: int):
        self.name = name
        self.num_classes = num_classes
        self.augment = augment
        self._train_source, self._test_source = train_source, test_source
        if not 0.0 < val_fraction < 1.0:
            raise DataError(f"val_fraction={val_fraction}; allowed: strictly between 0 and 1")
        perm = np.random.default_rng(split_seed).permutation(len(train_source))
        n_val = round(val_fraction * len(perm))
        if not 0 < n_val < len(perm):
            raise DataError(f"a {val_fraction:.0%} validation split of {len(perm)} training examples leaves a split "
                            "empty; use more data or another val_fraction")
        self._val_ids, self._train_ids = np.sort(perm[:n_val]), np.sort(perm[n_val:])
        sample = self._train_ids[np.random.default_rng(split_seed).permutation(self.num_train)[:STATS_IMAGES]]
        images = np.stack([EVAL_TRANSFORMS[augment](train_source[int(i)]["image"]) for i in sample])
        self.preprocessing = normalisation(images, 1.0 / 255.0)
        self.input_shape = tuple(preprocess(images[:1], self.preprocessing).shape[1:])
        self._iterator: tuple[tuple[int, int, int], Iterator] | None = None  # ((seed, batch, next step), it)

    @property
    def num_train(self) -> int:
        return len(self._train_ids)

    def steps_per_epoch(self, batch_size: int) -> int:
        return max(1, self.num_train // batch_size)

    def has_split(self, split: str) -> bool:
        return split in ("train", "val") or (split == "test" and self._test_source is not None)

    def train_batches(self, seed: int, batch_size: int):
        """grain MapDataset whose element ``step`` is this process's rows of the step-th global batch."""
        import grain
        import jax

        procs = jax.process_count()
        if batch_size % procs:
            raise DataError(f"batch_size={batch_size} does not split over {procs} processes; allowed: a multiple of {procs}")
        source, ids, transform = self._train_source, self._train_ids, TRAIN_TRANSFORMS[self.augment]

        def read(position: int) -> dict[str, Any]:
            return source[int(ids[position])]

        def augment(record: dict[str, Any], rng: np.random.Generator) -> tuple[np.ndarray, np.int32]:
            return transform(record["image"], rng), np.int32(record["label"])

        stream = (grain.MapDataset.range(self.num_train).shuffle(seed=seed).repeat()
                  .map(read).random_map(augment, seed=seed))
        return stream.batch(batch_size // procs)[jax.process_index()::procs]

    def train_batch(self, seed: int, step: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        """The step-th global batch (float32 NHWC, int32), rows of other processes zero."""
        import grain

        from slt_jax.sharding import process_slice

        key = (seed, batch_size, step)
        if self._iterator is None or self._iterator[0] != key:
            batches = self.train_batches(seed, batch_size)[step:]
            self._iterator = (key, iter(batches.to_iter_dataset(_read_options(grain))))
        images, labels = next(self._iterator[1])
        self._iterator = ((seed, batch_size, step + 1), self._iterator[1])
        rows = process_slice(batch_size)
        x = np.zeros((batch_size, *self.input_shape), np.float32)
        y = np.zeros(batch_size, np.int32)
        x[rows], y[rows] = preprocess(images, self.preprocessing), labels
        return x, y

    def eval_batches(self, split: str, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Preprocessed (x, y) batches over a whole split (every process reads all of it)."""
        if split == "test":
            source, ids = self._test_source, np.arange(len(self._test_source))
        else:
            source, ids = self._train_source, {"train": self._train_ids, "val": self._val_ids}[split]
        import grain

        transform = EVAL_TRANSFORMS[self.augment]

        def read(position: int) -> tuple[np.ndarray, np.int32]:
            record = source[int(ids[position])]
            return transform(record["image"]), np.int32(record["label"])

        batches = grain.MapDataset.range(len(ids)).map(read).batch(batch_size)
        for images, labels in batches.to_iter_dataset(_read_options(grain)):
            yield preprocess(images, self.preprocessing), labels


def _prepare_hint(dataset: str, name: str, root: str, manual: bool) -> str:
    """One line: the exact command that prepares ``name`` where it was looked for, or the arrays to pass instead."""
    manual_step = (f"put the files `tfds.builder({name!r}).MANUAL_DOWNLOAD_INSTRUCTIONS` names in "
                   f"{root}/downloads/manual, then " if manual else "")
    return (f"dataset {dataset!r} is not prepared in {root}; prepare it once, on a machine with network: "
            f"{manual_step}`pip install tensorflow && tfds build {name} --data_dir={root} --file_format=array_record` "
            f"(built elsewhere: copy that directory here, or point --config.tfds_data_dir at it); or pass the arrays "
            f"instead: --config.dataset=npz:PATH holding x_train, y_train (optional x_test, y_test)")


def prepared_builder(dataset: str, data_dir: str = "") -> Any:
    """The TFDS builder of ``dataset`` (a name of ``TFDS_NAMES`` or ``tfds:NAME``), checked to be prepared as
    array_record files in ``data_dir`` ("": $TFDS_DATA_DIR, else ~/tensorflow_datasets).

    Fails in seconds with a one-line DataError when it is not: the check reads only local metadata, so
    nothing is downloaded (tfds's own download retries for minutes when offline)."""
    name = dataset.removeprefix("tfds:")
    try:
        import grain  # noqa: F401
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise DataError(f"dataset {dataset!r} is read with tensorflow-datasets, but {e.name} is not installed: "
                        f"pip install 'slt-jax[tfds]'; or pass the arrays instead: --config.dataset=npz:PATH holding "
                        "x_train, y_train (optional x_test, y_test)") from None
    try:
        builder = tfds.builder(name, data_dir=data_dir or None)
    except tfds.core.registered.DatasetNotFoundError:
        raise DataError(f"unknown tfds dataset {name!r}; allowed: a name from `tfds.list_builders()`, "
                        "optionally NAME/CONFIG or NAME:VERSION") from None
    absl_log = logging.getLogger("absl")
    level = absl_log.level
    absl_log.setLevel(logging.ERROR)  # is_prepared warns of the folder it found empty: noise beside the one line below
    try:
        prepared = builder.is_prepared()
    finally:
        absl_log.setLevel(level)
    if not prepared:
        raise DataError(_prepare_hint(dataset, name, str(builder.data_dir_root),
                                      bool(getattr(builder, "MANUAL_DOWNLOAD_INSTRUCTIONS", None))))
    if builder.info.file_format != tfds.core.FileFormat.ARRAY_RECORD:
        raise DataError(f"tfds dataset {name!r} in {builder.data_dir} is stored as {builder.info.file_format.value}; "
                        f"reading without TensorFlow needs array_record: rebuild it with "
                        f"`tfds build {name} --data_dir={builder.data_dir_root} --file_format=array_record`")
    features = builder.info.features
    if "image" not in features or "label" not in features or not hasattr(features["label"], "num_classes"):
        raise DataError(f"tfds dataset {name!r} has features {sorted(features)}; allowed: image classification "
                        "datasets with an 'image' and a ClassLabel 'label'")
    return builder


def load_tfds(dataset: str, config: Any) -> TfdsDataset:
    """The prepared TFDS dataset ``dataset`` (a name of ``TFDS_NAMES`` or ``tfds:NAME``); fails in seconds,
    before any download, if it is not there."""
    builder = prepared_builder(dataset, config.get("tfds_data_dir", ""))
    splits, features = builder.info.splits, builder.info.features
    test_split = next((s for s in ("test", "validation") if s in splits), None)
    augment = _choose_augment(config.get("augment", "auto"), features["image"].shape)
    return TfdsDataset(
        dataset, builder.as_data_source("train"),
        builder.as_data_source(test_split) if test_split else None,
        num_classes=features["label"].num_classes, augment=augment,
        val_fraction=config.val_fraction, split_seed=config.split_seed)


def read_split(dataset: str, split: str = "train", data_dir: str = "") -> tuple[np.ndarray, np.ndarray]:
    """A whole split of a prepared TFDS dataset as in-memory arrays (images as stored, int32 labels), for
    datasets of fixed-size images that fit in memory (e.g. to derive a transformed copy of MNIST)."""
    builder = prepared_builder(dataset, data_dir)
    image = builder.info.features["image"]
    shape, dtype = image.shape, np.dtype(image.np_dtype)
    if None in shape:
        raise DataError(f"dataset {dataset!r} has images of varying size {shape}; read_split needs fixed-size images")
    n = builder.info.splits[split].num_examples
    need = n * math.prod(shape) * dtype.itemsize
    if need > available_memory():
        raise DataError(f"the {split} split of {dataset!r} needs {gib(need)} in memory but {gib(available_memory())} "
                        "is available; allowed: a dataset that fits in memory")
    source = builder.as_data_source(split)
    images, labels = np.empty((n, *shape), dtype), np.empty(n, np.int32)
    for i in range(n):
        record = source[i]
        images[i], labels[i] = record["image"], record["label"]
    return images, labels
