"""In-memory image classification data: splits, preprocessing, deterministic batches.

Batches are a pure function of (seed, step): the step-th batch of epoch e = step // steps_per_epoch
comes from a permutation seeded by (seed, e). A resumed run therefore sees exactly the batches an
uninterrupted run sees; the data iterator's position is just the step.
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Iterator

import numpy as np


class DataError(ValueError):
    """Bad dataset content or spec; the message names the bad value and what is allowed."""


# Rows per chunk when converting or scanning images: about 4M values (16 MB of float32) at a time,
# so no whole-dataset float64 (or float32 temporary) copy is ever made.
CHUNK_VALUES = 1 << 22
FLOAT32_MAX = float(np.finfo(np.float32).max)


def _chunks(n: int, values_per_row: int):
    step = max(1, CHUNK_VALUES // max(1, values_per_row))
    for i in range(0, n, step):
        yield slice(i, min(n, i + step))


def available_memory() -> int:
    """Bytes of memory this process can still allocate: MemAvailable (or free pages), capped by the
    cgroup's limit where one is set (containers)."""
    avail = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    if avail is None:
        try:
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, AttributeError):
            return 1 << 62  # unknown: do not refuse
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),  # cgroup v2, v1
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            with open(limit_file) as f, open(usage_file) as g:
                limit, usage = f.read().strip(), g.read().strip()
            if limit != "max":
                avail = min(avail, int(limit) - int(usage))
        except (OSError, ValueError):
            pass
    return max(0, avail)


def gib(nbytes: float) -> str:
    """A byte count for messages: 256.0 MiB, 9.5 GiB, 512.0 TiB."""
    unit = next((u for u in ("TiB", "GiB") if nbytes >= 2 ** (10 * (" KMGT".index(u[0])))), "MiB")
    return f"{nbytes / 2 ** (10 * ' KMGT'.index(unit[0])):.1f} {unit}"


def preprocess(images: np.ndarray, spec: dict[str, Any]) -> np.ndarray:
    """Raw images (as the dataset stores them) to float32 NHWC model inputs.

    ``spec`` = {"scale": s, "mean": [per channel], "std": [per channel]}: x = (raw * s - mean) / std.
    A missing channel axis is added. Converted in chunks, in float32 throughout.
    """
    x = np.asarray(images)
    out = np.empty(x.shape + ((1,) if x.ndim == 3 else ()), np.float32)
    scale = np.float32(spec["scale"])
    mean, std = np.asarray(spec["mean"], np.float32), np.asarray(spec["std"], np.float32)
    with np.errstate(over="ignore", invalid="ignore"):  # an overflow is the caller's check (ArrayDataset)
        for rows in _chunks(len(x), math.prod(out.shape[1:])):
            chunk = out[rows]
            chunk[...] = x[rows].reshape(chunk.shape)
            chunk *= scale
            chunk -= mean
            chunk /= std
    return out


def _check_images(name: str, x: Any) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim not in (3, 4) or (x.ndim == 4 and x.shape[-1] not in (1, 3)):
        raise DataError(f"{name} has shape {x.shape}; allowed: (N, H, W) or (N, H, W, C) with C in {{1, 3}}")
    if x.shape[0] == 0:
        raise DataError(f"{name} is empty (shape {x.shape}); a dataset needs at least one example per split")
    if 0 in x.shape[1:3]:
        raise DataError(f"{name} has zero-size images (shape {x.shape}); allowed: images of at least 1x1 pixels")
    if not (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)):
        raise DataError(f"{name} has dtype {x.dtype}; allowed: uint8 or another integer type, or floats")
    if np.issubdtype(x.dtype, np.floating):
        bad, example = 0, None
        for rows in _chunks(len(x), math.prod(x.shape[1:])):
            chunk = x[rows]
            wrong = ~np.isfinite(chunk) | (np.abs(chunk) > FLOAT32_MAX)  # float32 makes these inf
            n = int(wrong.sum())
            if n and example is None:
                example = chunk[wrong].flat[0]
            bad += n
        if bad:
            raise DataError(f"{name} contains {bad} pixels that are NaN, infinite or beyond float32's range "
                            f"(e.g. {example!r}); allowed: finite values within +-{FLOAT32_MAX:.3g} (float32)")
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
        for rows in _chunks(len(self._train), math.prod(self._train.shape[1:])):
            if not np.isfinite(self._train[rows]).all():
                raise DataError(f"{self.name}: x_train overflows float32 once normalised (mean "
                                f"{self.preprocessing['mean']}, std {self.preprocessing['std']}); allowed: pixel "
                                "values whose normalised values fit in float32")

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
    """Preprocessing spec: scale raw values, then standardise each channel with train statistics.

    Computed in float64 chunk by chunk (two passes: mean, then squared deviations), never on a
    float64 copy of the whole training set."""
    x = np.asarray(x_train)
    axes = tuple(range(x.ndim - 1)) if x.ndim == 4 else None
    chunks = list(_chunks(len(x), math.prod(x.shape[1:])))
    if len(chunks) <= 1:  # small data: the one-shot computation
        xs = np.asarray(x, np.float64) * scale
        mean, std = np.atleast_1d(xs.mean(axis=axes)), np.atleast_1d(xs.std(axis=axes))
    else:
        count = x.size // (x.shape[-1] if axes else 1)
        total = sum(np.atleast_1d((np.asarray(x[r], np.float64) * scale).sum(axis=axes)) for r in chunks)
        mean = total / count
        sq = sum(np.atleast_1d(((np.asarray(x[r], np.float64) * scale - mean) ** 2).sum(axis=axes)) for r in chunks)
        std = np.sqrt(sq / count)
    return {"scale": float(scale), "mean": mean.tolist(), "std": np.maximum(std, 1e-6).tolist()}


def from_arrays(name: str, x_train, y_train, x_test=None, y_test=None, *, val_fraction: float,
                split_seed: int = 0, num_classes: int | None = None) -> ArrayDataset:
    """Validates raw arrays, carves a validation split from the training data, fixes preprocessing."""
    x_train = _check_images("x_train", x_train)
    y_train = _check_labels("y_train", y_train, len(x_train), num_classes)
    num_classes = num_classes or int(y_train.max()) + 1
    present = np.unique(y_train)
    if len(present) < 2:  # whatever num_classes says: a run on one class learns nothing
        raise DataError(f"y_train holds only class {int(present[0])} ({len(y_train)} labels); allowed: labels of at "
                        "least 2 different classes")
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
