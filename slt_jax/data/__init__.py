"""One entry point from the ``dataset`` string to a dataset object.

* ``digits``: scikit-learn's bundled 8x8 digits (embedded; no network). A fixed stratified 20%
  test split is held out, then the validation split is carved from the rest.
* ``synthetic``: random images of ``config.synthetic_shape`` with random labels (smoke runs and
  benchmarks; accuracy is chance by construction).
* ``npz:PATH``: arrays ``x_train``, ``y_train``, optional ``x_test``, ``y_test``; uint8 images or floats.
* ``tfds:NAME``: a prepared tensorflow-datasets dataset (see ``slt_jax.data.tfds_source``).
"""
from __future__ import annotations

import os
import zipfile
from typing import Any

import numpy as np

from slt_jax.data.arrays import ArrayDataset, DataError, from_arrays, preprocess, split_off

DATASET_KINDS = ("digits", "synthetic", "npz:PATH", "tfds:NAME")


def _digits(config) -> ArrayDataset:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = d.images.astype(np.uint8)  # 8x8 images with values 0..16, as scikit-learn stores them
    x_tr, y_tr, x_te, y_te = split_off(x, d.target, 0.2, seed=0)
    return from_arrays("digits", x_tr, y_tr, x_te, y_te, val_fraction=config.val_fraction, split_seed=config.split_seed)


def _synthetic(config) -> ArrayDataset:
    rng = np.random.default_rng(config.split_seed)
    shape = tuple(config.synthetic_shape)
    n = config.synthetic_size
    x = rng.integers(0, 256, (n, *shape), dtype=np.uint8)
    y = rng.integers(0, config.num_classes, n)
    y[: config.num_classes] = np.arange(config.num_classes)  # every class present
    return from_arrays("synthetic", x, y, val_fraction=config.val_fraction, split_seed=config.split_seed,
                       num_classes=config.num_classes)


def _npz(path: str, config) -> ArrayDataset:
    if not os.path.isfile(path):
        raise DataError(f"npz file {path!r} does not exist; give --config.dataset=npz:PATH with an existing .npz file")
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
        raise DataError(f"{path!r} is not a readable .npz file ({type(e).__name__}); save it with numpy.savez") from None
    missing = [k for k in ("x_train", "y_train") if k not in arrays]
    if missing:
        raise DataError(f"{path!r} lacks array(s) {', '.join(missing)}; it has {sorted(arrays)}; required: x_train, y_train")
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
