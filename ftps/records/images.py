"""Records as a folder of images listed in a ``labels.csv`` (columns ``file,label`` and optionally
``record_id``), and records drawn as images.

Images are converted to grayscale (C=1) or RGB (C=3) and scaled to [0, 1]; their size must be the
task's (H, W). Errors are ``InvalidArgument`` naming the folder, the CSV line or the image.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from ftps.common.errors import InvalidArgument
from ftps.records.npz import Records


def _bad(msg: str) -> InvalidArgument:
    return InvalidArgument(msg, field="records")


def load_folder(folder: Path, shape: tuple[int, ...]) -> Records:
    """Images listed in ``folder/labels.csv`` (``file,label``[,``record_id``]) in CSV order, each
    converted to grayscale (C=1) or RGB (C=3) and scaled to [0, 1]; sizes must match (H, W)."""
    from PIL import Image, UnidentifiedImageError

    if len(shape) != 3 or shape[0] not in (1, 3):
        raise _bad(f"record shape {','.join(map(str, shape))}: a folder of images fills records of "
                         "shape C,H,W with C = 1 (grayscale) or 3 (RGB)")
    c, h, w = shape
    labels = folder / "labels.csv"
    try:
        text = labels.read_text(encoding="utf-8-sig")
    except FileNotFoundError as exc:
        raise _bad(f"{folder}: no labels.csv (a CSV with columns file,label)") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise _bad(f"cannot read {labels}: {exc}") from exc
    rows = csv.DictReader(text.splitlines())
    fields = [f.strip() for f in rows.fieldnames or []]
    if "file" not in fields or "label" not in fields:
        raise _bad(f"{labels}: needs a header with columns file,label; found {','.join(fields) or 'nothing'}")
    root = folder.resolve()
    xs, ys, ids = [], [], []
    for line, row in enumerate(rows, start=2):
        row = {(k or "").strip(): (v or "").strip() for k, v in row.items()}
        name, raw = row.get("file", ""), row.get("label", "")
        try:
            label = int(raw)
        except ValueError:
            label = -1
        if label < 0:
            raise _bad(f"{labels} line {line}: label {raw!r} is not a class index (an integer >= 0)")
        img_path = (folder / name).resolve()
        if not name or root not in img_path.parents:
            raise _bad(f"{labels} line {line}: file {name!r} is not a file inside {folder}")
        try:
            img = Image.open(img_path)
        except FileNotFoundError as exc:
            raise _bad(f"{labels} line {line}: {name} not found in {folder}") from exc
        except (UnidentifiedImageError, OSError) as exc:
            raise _bad(f"{img_path}: not an image Pillow can read") from exc
        with img:
            if img.size != (w, h):
                raise _bad(f"{img_path}: {img.size[0]}x{img.size[1]} pixels, the task's records are "
                                 f"{w}x{h} (shape {c},{h},{w}); resize the image first")
            xs.append(_image_array(img, c))
        ys.append(label)
        ids.append(row.get("record_id", ""))
    if not xs:
        raise _bad(f"{labels}: lists no images")
    record_ids = ids if all(ids) else None
    return Records(np.stack(xs), np.asarray(ys, dtype=np.int64), record_ids=record_ids, source=str(folder))


def _image_array(img, channels: int) -> np.ndarray:
    """A Pillow image -> float32 [C, H, W] in [0, 1]."""
    if img.mode.startswith("I;16"):  # 16-bit grayscale: keep the precision
        a = np.asarray(img, dtype=np.float32) / 65535.0
        a = np.repeat(a[None], channels, axis=0)
    elif channels == 1:
        a = np.asarray(img.convert("L"), dtype=np.float32)[None] / 255.0
    else:
        a = np.asarray(img.convert("RGB"), dtype=np.float32).transpose(2, 0, 1) / 255.0
    return np.ascontiguousarray(a, dtype=np.float32)


def save_folder(folder: Path, x: np.ndarray, y: np.ndarray, record_ids: list[str] | None = None) -> Path:
    """The inverse of :func:`load_folder` (8-bit PNGs): for exporting a batch to look at."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "labels.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file", "label"] + (["record_id"] if record_ids else []))
        for j, (rec, label) in enumerate(zip(x, y)):
            name = f"{j:05d}.png"
            Image.fromarray(to_uint8_image(rec)).save(folder / name)
            w.writerow([name, int(label)] + ([record_ids[j]] if record_ids else []))
    return folder


def to_uint8_image(rec: np.ndarray) -> np.ndarray:
    """One record [C, H, W] in [0, 1] -> uint8 [H, W] (C=1) or [H, W, 3] (C=3)."""
    a = np.clip(np.nan_to_num(np.asarray(rec, dtype=np.float64)), 0.0, 1.0)
    a = np.round(a * 255.0).astype(np.uint8)
    return a[0] if a.shape[0] == 1 else a.transpose(1, 2, 0)


def is_image_shape(shape: tuple[int, ...]) -> bool:
    return len(shape) == 3 and shape[0] in (1, 3)
