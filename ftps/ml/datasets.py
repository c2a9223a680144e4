"""Data at hand (DESIGN.md §6): the demo data sets and their split between the roles.

Images are float32 ``[N, C, H, W]`` in [0, 1]; labels int64 ``[N]``. Tabular data (breast-cancer)
comes as raw rows float64 ``[N, F]`` with its schema (``ftps.records.tabular``); ``demo_splits``
gives its encoded rows, the model inputs. The records file format and checks live in
``ftps.records``.
"""

from __future__ import annotations

import gzip
import os
import pickle
import struct
from dataclasses import replace
from functools import lru_cache
from pathlib import Path

import numpy as np

from ftps.records import RecordsError
from ftps.records.checks import validate
from ftps.records.tabular import Schema

__all__ = [
    "BREAST_CANCER_CLASSES",
    "BREAST_CANCER_FEATURES",
    "DATASETS",
    "FASHION_MNIST_DIR",
    "TABULAR_DATASETS",
    "cifar_shaped",
    "demo_split_indices",
    "load_cifar10",
    "demo_splits",
    "demo_tabular",
    "load_breast_cancer",
    "load_digits",
    "load_fashion_mnist",
]

FASHION_MNIST_DIR = Path(
    os.environ.get("FTPS_FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist")
)
_FMNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
DATASETS = ("fashion-mnist", "digits", "breast-cancer")
TABULAR_DATASETS = ("breast-cancer",)

# scikit-learn's names for the Wisconsin diagnostic data, fixed here so that a schema (and a
# contributor's CSV header) does not change with the installed scikit-learn; the loader checks them.
BREAST_CANCER_FEATURES = tuple(
    f"{name} {stat}" if stat == "error" else f"{stat} {name}"
    for stat in ("mean", "error", "worst")
    for name in ("radius", "texture", "perimeter", "area", "smoothness", "compactness", "concavity",
                 "concave points", "symmetry", "fractal dimension")
)
BREAST_CANCER_CLASSES = ("malignant", "benign")
BREAST_CANCER_LABEL = "diagnosis"
# An allowed value up to this many times the largest the builder has seen: the measurements are
# non-negative, and an order of magnitude above all of them is a unit error, not a patient.
_RANGE_FACTOR = 10.0

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


def load_breast_cancer() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled Wisconsin diagnostic breast cancer data -> (x float64 [569, 30], the
    measurements as recorded, columns ``BREAST_CANCER_FEATURES``; y int64 [569], 0 malignant,
    1 benign as ``BREAST_CANCER_CLASSES``)."""
    from sklearn.datasets import load_breast_cancer as _sk_load_breast_cancer

    bunch = _sk_load_breast_cancer()
    if tuple(str(n) for n in bunch.feature_names) != BREAST_CANCER_FEATURES or \
            tuple(str(n) for n in bunch.target_names) != BREAST_CANCER_CLASSES:
        raise ValueError("scikit-learn's breast cancer data has other columns or classes than "
                         "BREAST_CANCER_FEATURES / BREAST_CANCER_CLASSES")
    return bunch.data.astype(np.float64), bunch.target.astype(np.int64)


def cifar_shaped(x: np.ndarray) -> np.ndarray:
    """Grey images [N, 1, H, W] -> CIFAR-shaped records float32 [N, 3, 32, 32], for the paper's
    ResNet-18 setting where CIFAR-10 is not at hand: zero-padded when smaller than 32 by at most 8
    pixels (Fashion-MNIST's 28x28), else upscaled by an integer factor first (digits' 8x8), then
    repeated to three channels. Raises ValueError for other shapes."""
    if x.shape[1:] == (3, 32, 32):
        return np.ascontiguousarray(x, dtype=np.float32)
    n, c, h, w = x.shape
    if c != 1 or h != w or h > 32:
        raise ValueError(f"cannot make records of shape {x.shape[1:]} CIFAR-shaped")
    if 32 - h > 8:
        factor = 32 // h
        x = x.repeat(factor, axis=2).repeat(factor, axis=3)
        h = w = h * factor
    pad = 32 - h
    x = np.pad(x, ((0, 0), (0, 0), (pad // 2, pad - pad // 2), (pad // 2, pad - pad // 2)))
    return np.ascontiguousarray(np.repeat(x, 3, axis=1), dtype=np.float32)



_CIFAR_FILES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles CIFAR-10's python batches and nothing else: dicts, lists, bytes, numbers and
    numpy arrays; any other global (a class, ``os.system``) is refused before it is called."""

    def find_class(self, module: str, name: str):
        if name == "_reconstruct" and module in ("numpy.core.multiarray",
                                                  "numpy._core.multiarray"):
            core = getattr(np, "_core", None) or np.core
            return core.multiarray._reconstruct
        if module == "numpy" and name in ("ndarray", "dtype"):
            return getattr(np, name)
        if (module, name) == ("_codecs", "encode"):  # bytes in protocol-2 pickles from Python 3
            import codecs

            return codecs.encode
        raise RecordsError(f"CIFAR-10 batch refers to {module}.{name}; only numpy arrays are "
                           "allowed in it")


def load_cifar10(directory: str | os.PathLike, split: str) -> tuple[np.ndarray, np.ndarray]:
    """CIFAR-10 from the standard python layout (``cifar-10-batches-py/``: ``data_batch_1`` to
    ``_5``, ``test_batch``) -> (x float32 [N, 3, 32, 32] in [0, 1], y int64 [N]); "train" has
    50000 images, "test" 10000. The batches are pickles: read with an unpickler that builds numpy
    arrays and plain containers only (DESIGN.md §5). Raises RecordsError for anything else.
    """
    if split not in _CIFAR_FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    xs, ys = [], []
    for name in _CIFAR_FILES[split]:
        path = Path(directory) / name
        if not path.is_file():
            raise FileNotFoundError(f"CIFAR-10 batch {path} not found (python version of "
                                    "CIFAR-10: cifar-10-python.tar.gz, extracted)")
        try:
            with path.open("rb") as f:
                batch = _CifarUnpickler(f, encoding="bytes").load()
            data = np.asarray(batch[b"data"], dtype=np.uint8)
            labels = np.asarray(batch[b"labels"], dtype=np.int64)
        except RecordsError:
            raise
        except (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError) as e:
            raise RecordsError(f"{path} is not a CIFAR-10 batch: {e}") from e
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(labels) != len(data):
            raise RecordsError(f"{path}: expected data [N, 3072] and N labels, got "
                               f"{data.shape} and {labels.shape}")
        xs.append(data)
        ys.append(labels)
    x = (np.concatenate(xs).astype(np.float32) / np.float32(255.0)).reshape(-1, 3, 32, 32)
    y = np.concatenate(ys)
    validate(x, y, what=f"CIFAR-10 {split}")
    return x, y


# Data sets with one source ("all"): (records, where the builder's rows start, where the
# contributors' rows start) in a seeded permutation of them.
_ONE_SOURCE_SPLITS = {"digits": (1797, 600, 1100), "breast-cancer": (569, 150, 300)}


def demo_split_indices(dataset: str, *, seed: int = 0) -> dict[str, tuple[str, np.ndarray]]:
    """Where each role's records come from: role -> (source split, row indices into it).

    fashion-mnist: 20000 / 10000 rows of a seeded permutation of the 60000 training images for
    "pretrain" / "builder", and the 10000 test images for "contributors".
    digits (one source, "all"): 600 / 500 / 697 rows of a seeded permutation of the 1797.
    breast-cancer (one source, "all"): 150 / 150 / 269 rows of a seeded permutation of the 569.
    """
    rng = np.random.default_rng(seed)
    if dataset == "fashion-mnist":
        perm = rng.permutation(60000)
        return {
            "pretrain": ("train", perm[:20000]),
            "builder": ("train", perm[20000:30000]),
            "contributors": ("test", np.arange(10000)),
        }
    if dataset in _ONE_SOURCE_SPLITS:
        size, builder_from, contributors_from = _ONE_SOURCE_SPLITS[dataset]
        perm = rng.permutation(size)
        return {
            "pretrain": ("all", perm[:builder_from]),
            "builder": ("all", perm[builder_from:contributors_from]),
            "contributors": ("all", perm[contributors_from:]),
        }
    raise ValueError(f"unknown dataset {dataset!r}; known: {list(DATASETS)}")


def demo_splits(dataset: str, *, seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Disjoint splits of a demo dataset for the three roles -> role -> (x, y).

    - ``pretrain``: the builder's own data, used to train the base model M0;
    - ``builder``: the builder's training-distribution data uploaded to the service (shadow
      models of the preparation stage, records mixed into fine-tuning);
    - ``contributors``: the pool contributors submit records from.

    Sizes and sources: ``demo_split_indices``. A tabular dataset's splits are its encoded rows
    (float32 ``[N, width]``, the model inputs); ``demo_tabular`` gives the raw rows and the schema.
    """
    if dataset in TABULAR_DATASETS:
        schema, raw = demo_tabular(dataset, seed=seed)
        return {role: (schema.encode(x), y) for role, (x, y) in raw.items()}
    indices = demo_split_indices(dataset, seed=seed)
    if dataset == "fashion-mnist":
        sources = {"train": load_fashion_mnist("train"), "test": load_fashion_mnist("test")}
    else:
        sources = {"all": load_digits()}
    return {
        role: (sources[src][0][idx], sources[src][1][idx]) for role, (src, idx) in indices.items()
    }


def demo_tabular(dataset: str, *, seed: int = 0) -> tuple[Schema, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """A tabular demo dataset as its builder sees it -> (schema, role -> (raw rows float64 [N, F],
    y int64 [N])), the roles and sizes of ``demo_split_indices``.

    The schema is inferred from the builder's own rows (the pretrain and builder splits): each
    column's mean and standard deviation there, and an allowed range [0, 10 x its largest value
    there]. Contributors' rows are encoded with the builder's normalisation, as in a real task.
    """
    if dataset != "breast-cancer":
        raise ValueError(f"{dataset!r} is not a tabular dataset; known: {list(TABULAR_DATASETS)}")
    x, y = load_breast_cancer()
    raw = {role: (x[idx], y[idx]) for role, (_, idx) in demo_split_indices(dataset, seed=seed).items()}
    own = np.concatenate([raw["pretrain"][0], raw["builder"][0]])
    own_y = np.concatenate([raw["pretrain"][1], raw["builder"][1]])
    columns = {name: own[:, j] for j, name in enumerate(BREAST_CANCER_FEATURES)}
    columns[BREAST_CANCER_LABEL] = own_y
    schema = Schema.infer(columns, label_column=BREAST_CANCER_LABEL, class_names=BREAST_CANCER_CLASSES,
                          what=f"{dataset} builder data")
    features = tuple(replace(f, range=(0.0, _RANGE_FACTOR * float(own[:, j].max())))
                     for j, f in enumerate(schema.features))
    return replace(schema, features=features), raw
