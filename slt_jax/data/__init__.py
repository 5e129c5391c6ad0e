"""One entry point from the ``dataset`` string to a dataset object.

The rule: a dataset this project uses by name is given by its name alone (``digits``,
``synthetic``, ``mnist``, ``fashion_mnist``, ``cifar10``, ``imagenet2012``); local arrays are
``npz:PATH``; any other tensorflow-datasets dataset is ``tfds:NAME`` (``tfds:`` before one of the
names above is refused, naming the bare name, so each dataset has one spelling).

* ``digits``: scikit-learn's bundled 8x8 digits (embedded; no network). A fixed stratified 20%
  test split is held out, then the validation split is carved from the rest.
* ``synthetic``: random images of ``config.synthetic_shape`` with random labels (smoke runs and
  benchmarks; accuracy is chance by construction).
* ``npz:PATH``: arrays ``x_train``, ``y_train``, optional ``x_test``, ``y_test``; uint8 images or floats.
* ``mnist``, ``fashion_mnist``, ``cifar10``, ``imagenet2012`` (``TFDS_NAMES``): tensorflow-datasets
  datasets, prepared once by TFDS on a machine with network and read from their array_record
  files (``slt_jax.data.tfds_source``). Unprepared (or offline), a run fails in seconds with one
  line giving the exact ``tfds build`` command, or the ``npz:`` arrays to pass instead.
* ``tfds:NAME``: any other prepared TFDS image-classification dataset (NAME, NAME/CONFIG or
  NAME:VERSION, as ``tfds.builder`` takes it), read the same way.
"""
from __future__ import annotations

import math
import os
import zipfile
from typing import Any

import numpy as np

from slt_jax.data.arrays import ArrayDataset, DataError, available_memory, from_arrays, gib, preprocess, split_off

TFDS_NAMES = ("mnist", "fashion_mnist", "cifar10", "imagenet2012")
DATASET_KINDS = ("digits", "synthetic", *TFDS_NAMES, "npz:PATH", "tfds:NAME")


def dataset_problem(spec: Any) -> str | None:
    """None if ``spec`` follows the module's rule, else what is allowed instead (for a one-line error)."""
    if spec in ("digits", "synthetic", *TFDS_NAMES) or (isinstance(spec, str) and spec.startswith("npz:")):
        return None
    if isinstance(spec, str) and spec.startswith("tfds:") and spec[5:]:
        name = spec[5:]
        if name in TFDS_NAMES:
            return f"{name} (a dataset with a name of its own is given by that name alone)"
        return None
    return ", ".join(DATASET_KINDS)


def _digits(config) -> ArrayDataset:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = d.images.astype(np.uint8)  # 8x8 images with values 0..16, as scikit-learn stores them
    x_tr, y_tr, x_te, y_te = split_off(x, d.target, 0.2, seed=0)
    return from_arrays("digits", x_tr, y_tr, x_te, y_te, val_fraction=config.val_fraction, split_seed=config.split_seed)


def _synthetic(config) -> ArrayDataset:
    from slt_jax.run_config import ConfigError  # not at the top: run_config imports this package

    shape = tuple(config.synthetic_shape)
    n, k = config.synthetic_size, config.num_classes
    if k > n:
        raise ConfigError(f"num_classes={k} with synthetic_size={n}: every class needs an example; allowed: "
                          f"num_classes <= synthetic_size")
    need = n * math.prod(shape) * 5  # uint8 images plus their float32 model inputs
    if need > available_memory():
        raise ConfigError(f"synthetic_size={n} of synthetic_shape={shape} needs {gib(need)} of memory but "
                          f"{gib(available_memory())} is available; allowed: a smaller synthetic_size or synthetic_shape")
    rng = np.random.default_rng(config.split_seed)
    x = rng.integers(0, 256, (n, *shape), dtype=np.uint8)
    y = rng.integers(0, k, n)
    y[:k] = np.arange(k)  # every class present
    return from_arrays("synthetic", x, y, val_fraction=config.val_fraction, split_seed=config.split_seed,
                       num_classes=k)


NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")


def _npy_header(z: zipfile.ZipFile, member: str) -> tuple[tuple[int, ...], np.dtype]:
    """(shape, dtype) from the .npy header of a member of an npz, without reading its data."""
    with z.open(member) as f:
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read(f)
    return shape, dtype


def _npz_arrays(path: str) -> dict[str, np.ndarray]:
    """The arrays of NPZ_KEYS in an npz; shapes and dtypes are read from the .npy headers first, so
    pickled objects and data that cannot fit in memory are refused before anything is allocated."""
    if not os.path.isfile(path):
        raise DataError(f"npz file {path!r} does not exist; give --config.dataset=npz:PATH with an existing .npz file")
    unreadable = f"{path!r} is not a readable .npz file ({{}}); save it with numpy.savez"
    try:
        with zipfile.ZipFile(path) as z:
            members = {m[:-4] if m.endswith(".npy") else m: m for m in z.namelist()}
            headers = {k: _npy_header(z, members[k]) for k in NPZ_KEYS if k in members}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError) as e:
        raise DataError(unreadable.format(type(e).__name__)) from None
    missing = [k for k in ("x_train", "y_train") if k not in headers]
    if missing:
        raise DataError(f"{path!r} lacks array(s) {', '.join(missing)}; it has {sorted(members)}; required: x_train, y_train")
    for key, (shape, dtype) in headers.items():
        if dtype.hasobject:
            raise DataError(f"{path!r}: {key} holds Python objects (dtype {dtype}); pickled objects are not loaded; "
                            "allowed: plain numeric arrays, e.g. numpy.savez(path, x_train=np.stack(images), ...)")
    stored = sum(math.prod(shape) * dtype.itemsize for shape, dtype in headers.values())
    shape, dtype = headers["x_train"]
    need = stored + 4 * math.prod(shape)  # the arrays as stored, plus x_train as float32 model inputs
    available = available_memory()
    if need > available:
        raise DataError(f"{path!r}: x_train of shape {shape} ({dtype}) needs {gib(need)} in memory ({gib(stored)} as "
                        f"stored, {gib(4 * math.prod(shape))} as float32 inputs) but {gib(available)} is available; "
                        "allowed: a dataset that fits in memory, or a TFDS dataset (mnist, ..., tfds:NAME), which "
                        "reads from disk")
    try:
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in headers}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
        raise DataError(unreadable.format(type(e).__name__)) from None


def _npz(path: str, config) -> ArrayDataset:
    arrays = _npz_arrays(path)
    return from_arrays(f"npz:{path}", arrays["x_train"], arrays["y_train"], arrays.get("x_test"), arrays.get("y_test"),
                       val_fraction=config.val_fraction, split_seed=config.split_seed,
                       num_classes=config.get("num_classes") or None)


def load_dataset(config) -> Any:
    """The dataset named by ``config.dataset`` (see the module docstring)."""
    spec = config.dataset
    problem = dataset_problem(spec)
    if problem:
        raise DataError(f"dataset={spec!r}; allowed: {problem}")
    if spec == "digits":
        return _digits(config)
    if spec == "synthetic":
        return _synthetic(config)
    if spec.startswith("npz:"):
        return _npz(spec[4:], config)
    from slt_jax.data.tfds_source import load_tfds

    return load_tfds(spec, config)


def training_arrays(spec: str, tfds_data_dir: str = "") -> tuple[np.ndarray, np.ndarray]:
    """The whole training set of ``npz:PATH`` or a TFDS dataset as raw arrays (images as stored, labels),
    before any validation split: to derive a transformed copy of a dataset (e.g. shifted MNIST)."""
    if spec.startswith("npz:"):
        arrays = _npz_arrays(spec[4:])
        return arrays["x_train"], arrays["y_train"]
    if dataset_problem(spec) or spec in ("digits", "synthetic"):
        raise DataError(f"dataset {spec!r} has no training arrays to read; allowed: npz:PATH, "
                        f"{', '.join(TFDS_NAMES)}, tfds:NAME")
    from slt_jax.data.tfds_source import read_split

    return read_split(spec, "train", tfds_data_dir)


__all__ = ["ArrayDataset", "DataError", "TFDS_NAMES", "dataset_problem", "load_dataset", "preprocess",
           "training_arrays"]
