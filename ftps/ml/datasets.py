"""Data at hand (DESIGN.md §6) and the records file format.

Images are float32 ``[N, C, H, W]`` in [0, 1]; labels int64 ``[N]``. Records travel between
services as ``.npz`` files with exactly two arrays, ``x`` and ``y``, read with
``allow_pickle=False``.
"""

from __future__ import annotations

import gzip
import io
import os
import struct
import zipfile
from functools import lru_cache
from pathlib import Path
from typing import BinaryIO

import numpy as np

from ftps.ml.strategy import RecordsError

__all__ = [
    "DATASETS",
    "FASHION_MNIST_DIR",
    "demo_split_indices",
    "demo_splits",
    "load_digits",
    "load_fashion_mnist",
    "load_records",
    "save_records",
    "validate_records",
]

FASHION_MNIST_DIR = Path(
    os.environ.get("FTPS_FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist")
)
_FMNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
DATASETS = ("fashion-mnist", "digits")

# IDX element type codes (http://yann.lecun.com/exdb/mnist/ file format).
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file")
    ndim = data[3]
    dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    arr = np.frombuffer(data, dtype=dtype, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(dims)):
        raise ValueError(f"{path}: header says {dims}, found {arr.size} elements")
    return arr.reshape(dims)


@lru_cache(maxsize=2)
def _fashion_mnist_raw(split: str) -> tuple[np.ndarray, np.ndarray]:
    images_name, labels_name = _FMNIST_FILES[split]
    images_path, labels_path = FASHION_MNIST_DIR / images_name, FASHION_MNIST_DIR / labels_name
    for p in (images_path, labels_path):
        if not p.is_file():
            raise FileNotFoundError(
                f"Fashion-MNIST file {p} not found: install the Debian package "
                "dataset-fashion-mnist (apt-get install dataset-fashion-mnist) or set "
                "FTPS_FASHION_MNIST_DIR to a directory holding the gzip IDX files"
            )
    images = _read_idx(images_path)
    labels = _read_idx(labels_path)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(f"unexpected Fashion-MNIST shapes {images.shape}, {labels.shape}")
    images.flags.writeable = False
    labels.flags.writeable = False
    return images, labels


def load_fashion_mnist(split: str) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST ``split`` ("train": 60000 images, "test": 10000)
    -> (x float32 [N, 1, 28, 28] in [0, 1], y int64 [N])."""
    if split not in _FMNIST_FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    images, labels = _fashion_mnist_raw(split)
    # reshape, not [:, None]: the latter leaves a zero stride on the channel axis.
    x = (images.astype(np.float32) / np.float32(255.0)).reshape(-1, 1, *images.shape[1:])
    return x, labels.astype(np.int64)


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled digits -> (x float32 [1797,1,8,8] in [0,1], y int64 [1797])."""
    from sklearn.datasets import load_digits as _sk_load_digits

    bunch = _sk_load_digits()
    x = (bunch.images.astype(np.float32) / np.float32(16.0)).reshape(-1, 1, 8, 8)
    return x, bunch.target.astype(np.int64)


def demo_split_indices(dataset: str, *, seed: int = 0) -> dict[str, tuple[str, np.ndarray]]:
    """Where each role's records come from: role -> (source split, row indices into it).

    fashion-mnist: 20000 / 10000 rows of a seeded permutation of the 60000 training images for
    "pretrain" / "builder", and the 10000 test images for "contributors".
    digits (one source, "all"): 600 / 500 / 697 rows of a seeded permutation of the 1797.
    """
    rng = np.random.default_rng(seed)
    if dataset == "fashion-mnist":
        perm = rng.permutation(60000)
        return {
            "pretrain": ("train", perm[:20000]),
            "builder": ("train", perm[20000:30000]),
            "contributors": ("test", np.arange(10000)),
        }
    if dataset == "digits":
        perm = rng.permutation(1797)
        return {
            "pretrain": ("all", perm[:600]),
            "builder": ("all", perm[600:1100]),
            "contributors": ("all", perm[1100:]),
        }
    raise ValueError(f"unknown dataset {dataset!r}; known: {list(DATASETS)}")


def demo_splits(dataset: str, *, seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Disjoint splits of a demo dataset for the three roles -> role -> (x, y).

    - ``pretrain``: the builder's own data, used to train the base model M0;
    - ``builder``: the builder's training-distribution data uploaded to the service (shadow
      models of the preparation stage, records mixed into fine-tuning);
    - ``contributors``: the pool contributors submit records from.

    Sizes and sources: ``demo_split_indices``.
    """
    indices = demo_split_indices(dataset, seed=seed)
    if dataset == "fashion-mnist":
        sources = {"train": load_fashion_mnist("train"), "test": load_fashion_mnist("test")}
    else:
        sources = {"all": load_digits()}
    return {
        role: (sources[src][0][idx], sources[src][1][idx]) for role, (src, idx) in indices.items()
    }


def validate_records(x: np.ndarray, y: np.ndarray, *, what: str = "records") -> None:
    """Raise RecordsError (a ValueError) unless x is finite float32 [N, ...] and y int64 [N]."""
    if not isinstance(x, np.ndarray) or not isinstance(y, np.ndarray):
        raise RecordsError(f"{what}: x and y must be numpy arrays")
    if x.dtype != np.float32:
        raise RecordsError(f"{what}: x must be float32, got {x.dtype}")
    if x.ndim < 2:
        raise RecordsError(f"{what}: x must have shape [N, ...features], got {x.shape}")
    if y.dtype != np.int64:
        raise RecordsError(f"{what}: y must be int64, got {y.dtype}")
    if y.ndim != 1:
        raise RecordsError(f"{what}: y must be 1-D, got shape {y.shape}")
    if len(x) != len(y):
        raise RecordsError(f"{what}: x has {len(x)} records but y has {len(y)} labels")
    if not np.isfinite(x).all():
        raise RecordsError(f"{what}: x contains NaN or infinite values")
    if len(y) and y.min() < 0:
        raise RecordsError(f"{what}: labels must be >= 0, got {int(y.min())}")


def save_records(
    path_or_buffer: str | os.PathLike | BinaryIO, x: np.ndarray, y: np.ndarray
) -> None:
    """Write validated records as an npz with arrays ``x`` (float32) and ``y`` (int64)."""
    validate_records(x, y)
    np.savez(path_or_buffer, x=x, y=y)


def load_records(data: bytes) -> tuple[np.ndarray, np.ndarray]:
    """Parse npz bytes written by ``save_records`` -> (x, y); never unpickles.

    Raises RecordsError (a ValueError) on anything but exactly arrays x and y that pass
    ``validate_records``.
    """
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            names = sorted(npz.files)
            if names != ["x", "y"]:
                raise RecordsError(f"records npz must hold exactly arrays x and y, got {names}")
            x, y = npz["x"], npz["y"]
    except RecordsError:
        raise
    except (ValueError, OSError, zipfile.BadZipFile, EOFError, KeyError) as e:
        raise RecordsError(f"records are not a valid npz file: {e}") from e
    validate_records(x, y)
    return x, y
