"""In-memory image classification data: splits, preprocessing, deterministic batches.

Batches are a pure function of (seed, step): the step-th batch of epoch e = step // steps_per_epoch
comes from a permutation seeded by (seed, e). A resumed run therefore sees exactly the batches an
uninterrupted run sees; the data iterator's position is just the step.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Iterator

import numpy as np


class DataError(ValueError):
    """Bad dataset content or spec; the message names the bad value and what is allowed."""


def preprocess(images: np.ndarray, spec: dict[str, Any]) -> np.ndarray:
    """Raw images (as the dataset stores them) to float32 NHWC model inputs.

    ``spec`` = {"scale": s, "mean": [per channel], "std": [per channel]}: x = (raw * s - mean) / std.
    A missing channel axis is added.
    """
    x = np.asarray(images, np.float32)
    if x.ndim == 3:
        x = x[..., None]
    return (x * np.float32(spec["scale"]) - np.asarray(spec["mean"], np.float32)) / np.asarray(spec["std"], np.float32)


def _check_images(name: str, x: Any) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim not in (3, 4) or (x.ndim == 4 and x.shape[-1] not in (1, 3)):
        raise DataError(f"{name} has shape {x.shape}; allowed: (N, H, W) or (N, H, W, C) with C in {{1, 3}}")
    if x.shape[0] == 0:
        raise DataError(f"{name} is empty (shape {x.shape}); a dataset needs at least one example per split")
    if not (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)):
        raise DataError(f"{name} has dtype {x.dtype}; allowed: uint8 or another integer type, or floats")
    if np.issubdtype(x.dtype, np.floating) and not np.isfinite(x).all():
        raise DataError(f"{name} contains {int((~np.isfinite(x)).sum())} NaN or infinite pixels; all must be finite")
    return x


def _check_labels(name: str, y: Any, n: int, num_classes: int | None) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim != 1 or y.shape[0] != n:
        raise DataError(f"{name} has shape {y.shape}; allowed: ({n},), one label per image")
    if not np.issubdtype(y.dtype, np.integer):
        if not (np.issubdtype(y.dtype, np.floating) and np.all(np.isfinite(y)) and np.all(y == np.round(y))):
            raise DataError(f"{name} has non-integer labels (dtype {y.dtype}); allowed: integer class ids")
    y = y.astype(np.int64)
    hi = num_classes if num_classes else None
    if y.min() < 0 or (hi is not None and y.max() >= hi):
        bad = int(y.min()) if y.min() < 0 else int(y.max())
        raise DataError(f"{name} holds label {bad}; allowed: 0 to {(hi or 0) - 1 if hi else 'any non-negative'}")
    return y.astype(np.int32)


@dataclasses.dataclass
class ArrayDataset:
    """Raw train / val / test arrays plus the preprocessing that turns them into model inputs."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    num_classes: int
    preprocessing: dict[str, Any]
    x_test: np.ndarray | None = None
    y_test: np.ndarray | None = None

    def __post_init__(self):
        self._train = preprocess(self.x_train, self.preprocessing)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self._train.shape[1:]

    @property
    def num_train(self) -> int:
        return len(self.y_train)

    def steps_per_epoch(self, batch_size: int) -> int:
        return max(1, self.num_train // batch_size)

    def batch_indices(self, seed: int, step: int, batch_size: int) -> np.ndarray:
        """Indices of the step-th global training batch (epoch-wise shuffle, remainder dropped)."""
        spe = self.steps_per_epoch(batch_size)
        epoch, i = divmod(step, spe)
        perm = np.random.default_rng([seed, epoch]).permutation(self.num_train)
        return perm[i * batch_size:(i + 1) * batch_size]

    def train_batch(self, seed: int, step: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        idx = self.batch_indices(seed, step, batch_size)
        return self._train[idx], self.y_train[idx]

    def has_split(self, split: str) -> bool:
        return split == "train" or getattr(self, f"y_{split}") is not None

    def eval_batches(self, split: str, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Preprocessed (x, y) batches over a whole split, the last one possibly smaller."""
        x, y = getattr(self, f"x_{split}"), getattr(self, f"y_{split}")
        for i in range(0, len(y), batch_size):
            yield preprocess(x[i:i + batch_size], self.preprocessing), y[i:i + batch_size]


def split_off(x: np.ndarray, y: np.ndarray, fraction: float, seed: int):
    """Stratified random split: (x_rest, y_rest, x_held, y_held) with ``fraction`` held out."""
    rng = np.random.default_rng(seed)
    held = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        held.extend(rng.permutation(idx)[: int(round(fraction * len(idx)))])
    mask = np.zeros(len(y), bool)
    mask[np.asarray(held, int)] = True
    if mask.all() or not mask.any():
        raise DataError(f"a {fraction:.0%} split of {len(y)} examples leaves a split empty; use more data or another fraction")
    return x[~mask], y[~mask], x[mask], y[mask]


def normalisation(x_train: np.ndarray, scale: float) -> dict[str, Any]:
    """Preprocessing spec: scale raw values, then standardise each channel with train statistics."""
    x = np.asarray(x_train, np.float64) * scale
    axes = tuple(range(x.ndim - 1)) if x.ndim == 4 else None
    mean = np.atleast_1d(x.mean(axis=axes))
    std = np.atleast_1d(x.std(axis=axes))
    return {"scale": float(scale), "mean": mean.tolist(), "std": np.maximum(std, 1e-6).tolist()}


def from_arrays(name: str, x_train, y_train, x_test=None, y_test=None, *, val_fraction: float,
                split_seed: int = 0, num_classes: int | None = None) -> ArrayDataset:
    """Validates raw arrays, carves a validation split from the training data, fixes preprocessing."""
    x_train = _check_images("x_train", x_train)
    y_train = _check_labels("y_train", y_train, len(x_train), num_classes)
    num_classes = num_classes or int(y_train.max()) + 1
    if num_classes < 2:
        raise DataError(f"y_train holds {num_classes} class; a classifier needs at least 2")
    if (x_test is None) != (y_test is None):
        raise DataError("x_test and y_test come together: give both or neither")
    if x_test is not None:
        x_test = _check_images("x_test", x_test)
        y_test = _check_labels("y_test", y_test, len(x_test), num_classes)
        if x_test.shape[1:] != x_train.shape[1:]:
            raise DataError(f"x_test images are {x_test.shape[1:]} but x_train images are {x_train.shape[1:]}; they must match")
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val_fraction={val_fraction}; allowed: strictly between 0 and 1")
    x_tr, y_tr, x_val, y_val = split_off(x_train, y_train, val_fraction, split_seed)
    scale = 1.0 / 255.0 if np.issubdtype(x_train.dtype, np.integer) else 1.0
    return ArrayDataset(name, x_tr, y_tr, x_val, y_val, num_classes, normalisation(x_tr, scale), x_test, y_test)
