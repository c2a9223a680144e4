"""bench/finetune.py's data path measures every builder-data format on real images and reads back
what it wrote (its timings are the README's, not asserted here: they belong to the bench)."""

from __future__ import annotations

import numpy as np
import pytest

from bench import finetune
from ftps.records import beton

pytestmark = pytest.mark.skipif(beton.available() is not None,
                                reason=f"the data path compares npz with FFCV: {beton.available()}")


def test_data_path_measures_every_format_and_reads_back_the_records():
    logged = []
    rows = finetune.measure_data_path([64], logged.append, rounds=1, warm=1)

    assert [r["format"] for r in rows] == list(finetune.DATA_FORMATS)
    for r in rows:
        assert r["records"] == 64 and r["bytes"] > 0 and r["records_ok"], r
        assert r["cold_read_s"] > 0 and r["warm_read_s"] > 0 and r["peak_rss_mb"] > 0, r
    exact = {r["format"]: r for r in rows if r["format"] != "ffcv jpeg"}
    assert all(r["mean_abs_error"] == 0 and r["max_abs_error"] == 0 for r in exact.values())
    jpeg = rows[-1]
    # Quality 90 on 8-bit pixels: lossy, but by a few grey levels on average.
    assert 0 < jpeg["mean_abs_error"] < 0.02 and jpeg["max_abs_error"] < 0.5
    assert len(logged) == 3  # one line per format and round

    verdict = finetune.data_path_verdict(rows)
    assert len(verdict) == 1 and verdict[0].startswith("64 records:")
    for what in ("smallest on disk", "fastest write", "fastest first read", "fastest later read",
                 "ffcv jpeg mean abs pixel error"):
        assert what in verdict[0]


def test_builder_images_are_cifar_shaped_fashion_mnist():
    images = np.random.default_rng(0).random((5, 1, 28, 28), dtype=np.float32)
    labels = np.arange(5)
    x, y = finetune.builder_images(3, (images, labels))

    assert x.shape == (3, 3, 32, 32) and x.dtype == np.float32 and y.tolist() == [0, 1, 2]
    np.testing.assert_array_equal(x[:, 1, 2:30, 2:30], images[:3, 0])
    np.testing.assert_array_equal(x[:, 0], x[:, 2])
    assert not x[:, :, :2].any() and not x[:, :, :, 30:].any()
    with pytest.raises(ValueError):
        finetune.builder_images(6, (images, labels))
