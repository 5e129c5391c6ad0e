"""One entry point from the ``dataset`` string to a dataset object.

* ``digits``: scikit-learn's bundled 8x8 digits (embedded; no network). A fixed stratified 20%
  test split is held out, then the validation split is carved from the rest.
* ``synthetic``: random images of ``config.synthetic_shape`` with random labels (smoke runs and
  benchmarks; accuracy is chance by construction).
* ``npz:PATH``: arrays ``x_train``, ``y_train``, optional ``x_test``, ``y_test``; uint8 images or floats.
* ``tfds:NAME``: a prepared tensorflow-datasets dataset (see ``slt_jax.data.tfds_source``).
"""
from __future__ import annotations

import math
import os
import zipfile
from typing import Any

import numpy as np

from slt_jax.data.arrays import ArrayDataset, DataError, available_memory, from_arrays, gib, preprocess, split_off

DATASET_KINDS = ("digits", "synthetic", "npz:PATH", "tfds:NAME")


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
                        "allowed: a dataset that fits in memory, or tfds:NAME, which reads from disk")
    try:
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in headers}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
        raise DataError(unreadable.format(type(e).__name__)) from None


def _npz(path: str, config) -> ArrayDataset:
    if not os.path.isfile(path):
        raise DataError(f"npz file {path!r} does not exist; give --config.dataset=npz:PATH with an existing .npz file")
    arrays = _npz_arrays(path)
    return from_arrays(f"npz:{path}", arrays["x_train"], arrays["y_train"], arrays.get("x_test"), arrays.get("y_test"),
                       val_fraction=config.val_fraction, split_seed=config.split_seed,
                       num_classes=config.get("num_classes") or None)


def load_dataset(config) -> Any:
    """The dataset named by ``config.dataset`` (see the module docstring)."""
    spec = config.dataset
    if spec == "digits":
        return _digits(config)
    if spec == "synthetic":
        return _synthetic(config)
    if isinstance(spec, str) and spec.startswith("npz:"):
        return _npz(spec[4:], config)
    if isinstance(spec, str) and spec.startswith("tfds:"):
        from slt_jax.data.tfds_source import load_tfds

        return load_tfds(spec[5:], config)
    raise DataError(f"unknown dataset {spec!r}; allowed: {', '.join(DATASET_KINDS)}")


__all__ = ["ArrayDataset", "DataError", "load_dataset", "preprocess"]
