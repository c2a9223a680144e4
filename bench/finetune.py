"""Fine-tuning speed: seconds per model and per record, engine x strategy, side by side (issue 4).

On the demo task (Fashion-MNIST, the demo's base model, m contributor records, the production
masks and seeds of a round)::

    python -m bench.finetune            # m=500, n=16 and n=64: ~5 min on 2 CPU cores
    python -m bench.finetune --quick    # m=500, n=8, fewer configurations: ~1 min

Every configuration fine-tunes the same models (same masks and seeds) in jobs of
``--models-per-job`` models, and the jobs of all configurations are interleaved (job 1 of each,
then job 2 of each, ...) so that a machine shared with other work slows every configuration
alike: compare the ratios, not the absolute seconds. Per configuration it prints seconds per
model (the job's wall time, base model and trunk features included, over its models), seconds
per record (``n * s_model / m``: what scoring one record of the batch costs), both as CPU-seconds
of the process (robust to other load) and wall seconds, the speed-up over the baseline
(``fmnist_cnn`` on the sequential engine) in CPU time, and the attack signal the models carry:
batch AUC of online-per-record LiRA (``ftps.privacy.scoring.score``) and the share of the
baseline's signal kept, ``(AUC - 0.5) / (AUC_baseline - 0.5)``.

``--sandbox`` adds the cost of the sandbox: a round of 32 models in 4 jobs, one fresh child per
job vs one warm child per task. ``--data-path`` adds builder data's formats: npz (today's) vs FFCV
``.beton`` raw and JPEG (``ftps.records.beton``; FFCV only where it is importable), on 5,000 and
50,000 CIFAR-shaped images (``--quick``: 5,000): file bytes, write seconds, read seconds in a fresh
process and later reads, peak RSS of the reader, JPEG's pixel error, and which format wins where::

    python -m bench.finetune --data-path --no-speed    # ~11 min on 2 CPU cores

Results go to ``--out`` (default ``bench/out/finetune/``): ``speed.csv`` (and ``sandbox.csv``,
``data_path.csv``) and ``results.md`` (the printed tables).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
STRATEGIES = ROOT / "clients" / "strategies"
DEFAULT_OUT = ROOT / "bench" / "out" / "finetune"
BASELINE = "fmnist_cnn/sequential"


@dataclass
class Config:
    """One row of the table: a strategy (source) on an engine."""

    label: str
    strategy: str
    source: str
    engine: str  # what is asked of finetune_and_score: auto, sequential, stacked
    plain: bool = False  # the engine before this issue: no fused optimizer, no channels-last
    seconds: dict[int, float] = field(default_factory=dict)  # n -> wall seconds, all jobs
    cpu: dict[int, float] = field(default_factory=dict)  # n -> CPU seconds of this process
    phi: dict[int, np.ndarray] = field(default_factory=dict)
    ran: str = ""


def configs(quick: bool) -> list[Config]:
    full = (STRATEGIES / "fmnist_cnn.py").read_text()
    last = (STRATEGIES / "fmnist_cnn_lastblock.py").read_text()
    recomputed = last.replace('"cache_features": True', '"cache_features": False')
    assert recomputed != last
    rows = [
        Config(BASELINE, "fmnist_cnn", full, "sequential"),
        Config("fmnist_cnn/stacked", "fmnist_cnn", full, "stacked"),
        Config("fmnist_cnn_lastblock/cached", "fmnist_cnn_lastblock", last, "sequential"),
        Config("fmnist_cnn_lastblock/cached-stacked", "fmnist_cnn_lastblock", last, "stacked"),
    ]
    if not quick:
        rows[1:1] = [Config("fmnist_cnn/sequential-plain", "fmnist_cnn", full, "sequential",
                            plain=True)]
        rows.append(Config("fmnist_cnn_lastblock/sequential-uncached", "fmnist_cnn_lastblock",
                           recomputed, "sequential"))
    return rows


@contextlib.contextmanager
def plain_engine() -> Iterator[None]:
    """The sequential engine as it was before issue 4: unfused optimizers, default memory format."""
    from ftps.ml import engines, training

    make, prefer = training.make_optimizer, engines.prefer_channels_last

    def unfused(params, recipe):
        opt = {"adam": "Adam", "adamw": "AdamW", "sgd": "SGD"}[recipe.optimizer]
        kw = {"lr": recipe.lr, "weight_decay": recipe.weight_decay}
        if opt == "SGD":
            kw["momentum"] = recipe.momentum
        return getattr(__import__("torch").optim, opt)(params, **kw)

    training.make_optimizer = unfused
    engines.prefer_channels_last = lambda model, x: False
    try:
        yield
    finally:
        training.make_optimizer, engines.prefer_channels_last = make, prefer


@dataclass
class Task:
    x: np.ndarray
    y: np.ndarray
    weights: bytes


def load_task(records: int, seed: int) -> Task:
    """The demo's task: its base model (pretrained once, cached by ``stack.demo``) and
    ``records`` records from the contributors' split, picked as the demo picks them."""
    from rich.progress import Progress

    from ftps.ml.datasets import demo_splits
    from stack.demo import base_model

    splits = demo_splits("fashion-mnist", seed=seed)
    cx, cy = splits["contributors"]
    pick = np.random.default_rng(seed + 1).choice(len(cx), size=records, replace=False)
    weights, _ = base_model("fashion-mnist", (STRATEGIES / "fmnist_cnn.py").read_text(),
                            *splits["pretrain"], seed=seed, progress=Progress(disable=True))
    return Task(cx[pick], cy[pick], weights)


def round_models(n: int, m: int, seed: int) -> tuple[np.ndarray, list[int]]:
    """The masks and seeds a round of n models on m records gets from the scorer."""
    from ftps.privacy.masks import derive_seed, make_masks, model_seeds

    s = derive_seed(seed, "bench-round")
    return make_masks(n, m, seed=s), model_seeds(s, n)


def measure_speed(task: Task, rows: list[Config], sizes: list[int], per_job: int, seed: int,
                  device: str, log) -> None:
    from ftps.ml.engine import finetune_and_score

    m = len(task.x)
    # One untimed model per configuration first: one-time costs of the process (torch imports
    # torch._dynamo at the first optimizer step, ~1.3 s; oneDNN builds its kernels) are paid once
    # per sandbox child, not per job, so they belong to no configuration.
    masks, seeds = round_models(min(sizes), m, seed)
    for row in rows:
        with plain_engine() if row.plain else contextlib.nullcontext():
            finetune_and_score(strategy_source=row.source, base_weights=task.weights,
                               train_x=task.x, train_y=task.y, eval_x=task.x, eval_y=task.y,
                               models=[(0, seeds[0], masks[0])], device=device, engine=row.engine)
    for n in sizes:
        masks, seeds = round_models(n, m, seed)
        for row in rows:
            row.seconds[n] = row.cpu[n] = 0.0
            row.phi[n] = np.empty((n, m))
        for start in range(0, n, per_job):
            specs = [(i, seeds[i], masks[i]) for i in range(start, min(n, start + per_job))]
            for row in rows:
                with plain_engine() if row.plain else contextlib.nullcontext():
                    t, c = time.perf_counter(), time.process_time()
                    result = finetune_and_score(
                        strategy_source=row.source, base_weights=task.weights, train_x=task.x,
                        train_y=task.y, eval_x=task.x, eval_y=task.y, models=specs,
                        device=device, engine=row.engine)
                    row.seconds[n] += time.perf_counter() - t
                    row.cpu[n] += time.process_time() - c
                row.phi[n][start : start + len(specs)] = result.phi
                row.ran = result.engine + (" (plain)" if row.plain else "")
            log(f"  n={n}: models {start + len(specs)}/{n} done on every configuration")


def speed_table(rows: list[Config], sizes: list[int], m: int, seed: int) -> list[dict]:
    from ftps.privacy.scoring import score

    out = []
    for n in sizes:
        masks, _ = round_models(n, m, seed)
        base = next(r for r in rows if r.label == BASELINE)
        aucs = {r.label: score(r.phi[n], masks, method="online-per-record").batch.auc
                for r in rows}
        for r in rows:
            out.append({
                "n": n, "m": m, "config": r.label, "engine": r.ran,
                "s_per_model": r.seconds[n] / n, "s_per_record": r.seconds[n] / m,
                "cpu_s_per_model": r.cpu[n] / n, "cpu_s_per_record": r.cpu[n] / m,
                "speedup": base.cpu[n] / r.cpu[n],
                "wall_speedup": base.seconds[n] / r.seconds[n],
                "auc": aucs[r.label],
                "signal_kept": (aucs[r.label] - 0.5) / (aucs[BASELINE] - 0.5),
            })
    return out


# --------------------------------------------------------------------------- sandbox start-up


def _cpu_with_children() -> float:
    import resource

    own, children = (resource.getrusage(w) for w in (resource.RUSAGE_SELF,
                                                     resource.RUSAGE_CHILDREN))
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def measure_sandbox(task: Task, models: int, jobs: int, seed: int, log) -> list[dict]:
    """A round of ``models`` models in ``jobs`` jobs through the sandbox, three ways: a fresh
    child per job (``run_sandboxed``, as before), a warm child that the round's first job starts
    (``SandboxPool``), and a warm child taken from the worker's spare, started while the worker
    was idle. Wall time of the round, and CPU time of this process and every child (reaped
    children only, so each way runs on its own; the spare's start-up is counted, off the round's
    wall time)."""
    from ftps.ml.jobs import FinetuneJob
    from ftps.records.npz import Records
    from services.finetune_worker.sandbox import SandboxPool, run_sandboxed

    source = (STRATEGIES / "fmnist_cnn.py").read_text()
    m = len(task.x)
    masks, seeds = round_models(models, m, seed)
    per_job = -(-models // jobs)
    specs = [[(i, seeds[i], masks[i]) for i in range(a, min(models, a + per_job))]
             for a in range(0, models, per_job)]
    train = Records.of(task.x, task.y)
    jobs_ = [FinetuneJob(strategy_source=source, base_weights=task.weights, train_records=train, models=tuple(s))
             for s in specs]
    limits = dict(timeout_s=600, memory_mb=8192)
    out, phis = [], []

    def record(way: str, wall: float, cpu: float) -> None:
        out.append({"way": way, "seconds": wall, "cpu_seconds": cpu})
        log(f"  {way}: {wall:.1f} s wall, {cpu:.1f} CPU-s")

    c, t = _cpu_with_children(), time.perf_counter()
    phis.append([run_sandboxed(job, **limits).phi for job in jobs_])
    record("fresh child per job (before)", time.perf_counter() - t, _cpu_with_children() - c)

    c = _cpu_with_children()
    with contextlib.closing(SandboxPool(**limits)) as pool:
        t = time.perf_counter()
        phis.append([pool.run(job, task_key="bench").phi for job in jobs_])
        wall = time.perf_counter() - t
    record("warm child per task, started by the round's first job", wall,
           _cpu_with_children() - c)

    c = _cpu_with_children()
    with contextlib.closing(SandboxPool(spare=True, **limits)) as pool:
        pool.prestart()  # as the worker does when it starts: imports torch while idle
        pool.spare = False  # no refill: that is for the next task
        pool.wait_spare(timeout=120)
        t = time.perf_counter()
        phis.append([pool.run(job, task_key="bench").phi for job in jobs_])
        wall = time.perf_counter() - t
    record("warm child per task, the worker's idle spare", wall, _cpu_with_children() - c)

    for other in phis[1:]:
        for a, b in zip(phis[0], other, strict=True):
            np.testing.assert_array_equal(a, b)  # warm or fresh: the same phi
    for row in out:
        row.update(models=models, jobs=len(specs), m=m, s_per_model=row["seconds"] / models,
                   saved_vs_fresh_s=out[0]["seconds"] - row["seconds"],
                   cpu_saved_vs_fresh_s=out[0]["cpu_seconds"] - row["cpu_seconds"])
    return out


# --------------------------------------------------------------------------- data path


DATA_FORMATS = ("npz", "ffcv raw", "ffcv jpeg")
JPEG_QUALITY = 90
_SUFFIX = {"npz": "npz", "ffcv raw": "raw.beton", "ffcv jpeg": "jpeg.beton"}


def builder_images(n: int, source: tuple[np.ndarray, np.ndarray] | None = None
                   ) -> tuple[np.ndarray, np.ndarray]:
    """``n`` CIFAR-shaped records of real images -> (x float32 [n, 3, 32, 32] in [0, 1], y int64
    [n]): Fashion-MNIST's training images (or ``source``'s, [N, 1, 28, 28]) padded with zeros to
    32 x 32 and repeated to 3 channels."""
    from ftps.ml.datasets import cifar_shaped, load_fashion_mnist

    x, y = source if source is not None else load_fashion_mnist("train")
    if not 0 < n <= len(x):
        raise ValueError(f"{n} records asked of {len(x)} images")
    return cifar_shaped(x[:n]), np.array(y[:n], dtype=np.int64)


def _touch(nbytes: int) -> float:
    """Seconds to fill ``nbytes`` of fresh memory, freed at once. Done before each timed step:
    on a VM, pages the guest has not used lately can cost seconds (600 MB took 6.5 s here, and
    0.3 s a minute later), which would time the host, not the format."""
    t = time.perf_counter()
    np.ones(nbytes // 8 + 1)
    return time.perf_counter() - t


def _flush(path: Path) -> None:
    """Write ``path``'s dirty pages out now: their writeback would otherwise slow the next reads
    (a blob is read long after it was stored)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_records(fmt: str, path: Path, x: np.ndarray, y: np.ndarray) -> None:
    from ftps.common import archives
    from ftps.records import beton

    if fmt == "npz":
        path.write_bytes(archives.records_to_npz(x, y))
        return
    # FFCV's writer draws progress bars that would bury the bench's log.
    with open(os.devnull, "w") as quiet, contextlib.redirect_stderr(quiet):
        beton.write(path, x, y, jpeg_quality=JPEG_QUALITY if fmt == "ffcv jpeg" else None)


def _read_child(fmt: str, path: str, originals: str, warm: str) -> None:
    """One fresh reading process of :func:`measure_data_path`. Like a sandbox child: torch already
    imported and the blob's bytes in memory (the worker's cache and the scorer's store hand over
    bytes). Decodes them once cold, then ``warm`` times, and prints one JSON line: seconds, peak
    RSS, and how the decoded records compare with the originals saved in ``originals``."""
    import json

    import torch  # noqa: F401 - a sandbox child has it before its first job reads records

    from ftps.common import archives
    from ftps.records import beton

    def decode(blob: bytes) -> tuple[np.ndarray, np.ndarray]:
        if fmt == "npz":
            arrays = archives.npz_arrays(blob, what="builder_data")
            return arrays["x"], arrays["y"]
        return beton.read(blob)

    def peak_mb() -> float:
        # VmHWM, not getrusage's ru_maxrss: Linux carries the forking parent's peak over into
        # the child's ru_maxrss, which hid this process's own.
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    data = Path(path).read_bytes()
    ref = np.load(Path(originals) / "x.npy", mmap_mode="r")
    # A read holds its batches and their concatenation, and FFCV maps a temporary copy of the file.
    touch_s = _touch(3 * ref.nbytes)
    with contextlib.suppress(OSError):  # "5": the peak RSS starts again from the current RSS
        Path("/proc/self/clear_refs").write_text("5")
    before = peak_mb()
    t = time.perf_counter()
    if fmt != "npz":
        import ffcv.loader  # noqa: F401 - beton.read imports it at the first read: part of its cost
    import_s = time.perf_counter() - t
    x, y = decode(data)
    cold_s = time.perf_counter() - t
    warm_s = []
    for _ in range(int(warm)):
        del x, y  # two copies at once would inflate the peak RSS
        t = time.perf_counter()
        x, y = decode(data)
        warm_s.append(time.perf_counter() - t)
    peak = peak_mb()
    del data
    # In chunks: a float64 difference of 50,000 images would double the process's memory.
    err_sum, err_max = 0.0, 0.0
    for a in range(0, len(ref), 4096):
        err = np.abs(x[a:a + 4096].astype(np.float64) - ref[a:a + 4096])
        err_sum, err_max = err_sum + float(err.sum()), max(err_max, float(err.max(initial=0.0)))
    print(json.dumps({
        "import_s": import_s, "cold_read_s": cold_s, "warm_read_s": warm_s,
        "peak_rss_mb": peak, "read_rss_mb": peak - before, "touch_s": touch_s,
        "shape_ok": x.shape == ref.shape and x.dtype == np.float32,
        "labels_equal": bool(np.array_equal(y, np.load(Path(originals) / "y.npy"))),
        "mean_abs_error": err_sum / max(ref.size, 1), "max_abs_error": err_max}))


def _read_fresh(fmt: str, path: Path, originals: Path, warm: int) -> dict:
    import json
    import subprocess

    code = "import sys; from bench.finetune import _read_child; _read_child(*sys.argv[1:])"
    res = subprocess.run([sys.executable, "-c", code, fmt, str(path), str(originals), str(warm)],
                         cwd=ROOT, capture_output=True, text=True, timeout=1800,
                         check=False)
    if res.returncode:
        raise RuntimeError(f"reading {fmt} records in a fresh process failed "
                           f"(exit {res.returncode}):\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def measure_data_path(sizes: list[int], log, *, rounds: int = 3, warm: int = 3,
                      source: tuple[np.ndarray, np.ndarray] | None = None) -> list[dict]:
    """Builder data as npz (what it is today: ``archives.records_to_npz``, read by
    ``archives.npz_arrays`` as the scorer reads it; the worker's ``Records.load`` adds the
    record checks, the same for any format) vs FFCV ``.beton`` through ``ftps.records.beton``, raw
    (NDArrayField float32) and JPEG (quality :data:`JPEG_QUALITY`, lossy), on ``sizes`` records
    of :func:`builder_images`.

    Per size and format, ``rounds`` times with the formats interleaved (machine noise hits all
    alike): write the file, then read it to float32 arrays in a fresh process (:func:`_read_child`;
    FFCV's first read there imports ffcv and compiles its pipeline with numba), then ``warm``
    more reads in that process. One row per size and format: file bytes, medians of write, cold
    and warm read seconds, peak RSS of the reading process, and the decoded records' error
    against the originals (0 for the lossless formats). Fresh memory is touched before each
    timed step (:func:`_touch`). Without ffcv only npz is measured.
    """
    from statistics import median

    from ftps.ml.datasets import load_fashion_mnist
    from ftps.records import beton

    why = beton.available()
    formats = DATA_FORMATS if why is None else DATA_FORMATS[:1]
    if why is not None:
        log(f"  FFCV skipped: {why}")
    source = source if source is not None else load_fashion_mnist("train")
    out = []
    with tempfile.TemporaryDirectory(prefix="ftps-bench-data-") as tmp:
        tmp = Path(tmp)
        # Untimed: the writing process's one-time costs (importing ffcv, its writer's pool) are
        # paid once by a builder converting a data set, whatever its size.
        x, y = builder_images(8, source)
        for fmt in formats:
            _write_records(fmt, tmp / f"warmup.{_SUFFIX[fmt]}", x, y)
        for n in sizes:
            x, y = builder_images(n, source)
            np.save(tmp / "x.npy", x)
            np.save(tmp / "y.npy", y)
            _flush(tmp / "x.npy")
            runs: dict[str, list[tuple[float, int, dict]]] = {fmt: [] for fmt in formats}
            for r in range(rounds):
                for fmt in formats:
                    path = tmp / f"records.{_SUFFIX[fmt]}"
                    _touch(3 * x.nbytes)  # the encoded copies and the file's page cache
                    t = time.perf_counter()
                    _write_records(fmt, path, x, y)
                    write_s = time.perf_counter() - t
                    _flush(path)
                    child = _read_fresh(fmt, path, tmp, warm)
                    runs[fmt].append((write_s, path.stat().st_size, child))
                    path.unlink()
                    log(f"  {n} records, round {r + 1}/{rounds}, {fmt}: "
                        f"{runs[fmt][-1][1] / 1e6:.1f} MB, write {write_s:.2f} s, cold read "
                        f"{child['cold_read_s']:.2f} s, warm read "
                        f"{median(child['warm_read_s'] or [float('nan')]):.3f} s")
            del x, y  # one size's records in memory at a time
            for fmt in formats:
                children = [c for _, _, c in runs[fmt]]
                warms = [s for c in children for s in c["warm_read_s"]]
                out.append({
                    "records": n, "format": fmt, "bytes": runs[fmt][0][1],
                    "write_s": median(w for w, _, _ in runs[fmt]),
                    "cold_read_s": median(c["cold_read_s"] for c in children),
                    "import_s": median(c["import_s"] for c in children),
                    "warm_read_s": median(warms) if warms else float("nan"),
                    "peak_rss_mb": max(c["peak_rss_mb"] for c in children),
                    "read_rss_mb": median(c["read_rss_mb"] for c in children),
                    "touch_s": median(c["touch_s"] for c in children),
                    "records_ok": all(c["shape_ok"] and c["labels_equal"] for c in children),
                    "mean_abs_error": max(c["mean_abs_error"] for c in children),
                    "max_abs_error": max(c["max_abs_error"] for c in children),
                    "rounds": rounds,
                })
    return out


_MEASURES = (("bytes", "smallest on disk", lambda v: f"{v / 1e6:.1f} MB"),
             ("write_s", "fastest write", lambda v: f"{v:.2f} s"),
             ("cold_read_s", "fastest first read in a fresh process", lambda v: f"{v:.2f} s"),
             ("warm_read_s", "fastest later read", lambda v: f"{v:.3f} s"))


def data_path_verdict(rows: list[dict]) -> list[str]:
    """Which format wins each measure at each size, from the rows of :func:`measure_data_path`:
    one line per size, the winner first, the others with how many times the winner's value."""
    lines = []
    for n in sorted({r["records"] for r in rows}):
        at = [r for r in rows if r["records"] == n]
        parts = []
        for key, what, show in _MEASURES:
            ranked = sorted(at, key=lambda r: r[key])
            best = ranked[0]
            others = ", ".join(f"{r['format']} {show(r[key])} ({r[key] / best[key]:.1f}x)"
                               for r in ranked[1:])
            parts.append(f"{what}: {best['format']} {show(best[key])}"
                         + (f" vs {others}" if others else ""))
        lossy = [f"{r['format']} mean abs pixel error {r['mean_abs_error']:.4f} (max "
                 f"{r['max_abs_error']:.3f})" for r in at if r["mean_abs_error"] > 0]
        lines.append(f"{n:,} records: " + "; ".join(parts + lossy) + ".")
    return lines


# --------------------------------------------------------------------------- output


def _machine() -> str:
    from bench import cpu_name

    cpu = cpu_name()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{cpu}, {len(os.sched_getaffinity(0))} CPUs available, load average "
            f"{load:.1f} at the end")


def _md(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _write_csv(path: Path, rows: list[dict]) -> None:
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.finetune", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="n=8 only and the four main configurations (~1 min)")
    p.add_argument("--records", "-m", type=int, default=500,
                   help="records in the batch (default 500)")
    p.add_argument("--sizes", default=None,
                   help="n values, comma-separated (default 16,64; --quick 8)")
    p.add_argument("--models-per-job", type=int, default=8,
                   help="models per job, as the scorer sends them (default 8, the demo's)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: what the worker uses, $FTPS_TORCH_THREADS or the "
                        "CPUs available)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--sandbox", action="store_true",
                   help="also time a round of 32 models in 4 jobs through the sandbox, fresh vs "
                        "warm children")
    p.add_argument("--data-path", action="store_true",
                   help="also measure builder data as npz vs FFCV .beton (raw and JPEG): bytes, "
                        "write, fresh-process and later reads, on 5,000 and 50,000 CIFAR-shaped "
                        "images (--quick: 5,000)")
    p.add_argument("--no-speed", action="store_true",
                   help="skip the engine x strategy table (with --sandbox / --data-path)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT,
                   help=f"output directory (default {DEFAULT_OUT.relative_to(ROOT)})")
    args = p.parse_args(argv)
    text = args.sizes or ("8" if args.quick else "16,64")
    try:
        args.sizes = sorted({int(t) for t in text.split(",") if t.strip()})
    except ValueError:
        p.error(f"--sizes: expected comma-separated integers, got {text!r}")
    if any(n < 4 or n % 2 for n in args.sizes):
        p.error("--sizes must be even and >= 4")
    if args.records < 4:
        p.error("--records must be >= 4")
    if args.threads is not None:
        if args.threads < 1:
            p.error("--threads must be >= 1")
        os.environ["FTPS_TORCH_THREADS"] = str(args.threads)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from ftps.ml.engine import configure_threads

    threads = configure_threads()

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    log(f"demo task: fashion-mnist, m={args.records} records; torch threads {threads}")
    # The data path measures builder data of its own: no base model to pretrain for it alone.
    task = load_task(args.records, args.seed) if not args.no_speed or args.sandbox else None
    command = "python -m bench.finetune " + " ".join(sys.argv[1:] if argv is None else argv)
    sections = [
        f"# bench.finetune\n\n`{command}`\n\n"
        f"Fashion-MNIST demo task, m={args.records} records, {args.models_per_job} models per "
        f"job, device {args.device}, torch {torch.__version__}, {threads} torch thread(s).\n"
        f"Machine: {_machine()}; {time.strftime('%Y-%m-%d')}.",
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.no_speed:
        rows = configs(args.quick)
        log(f"{len(rows)} configurations x n={args.sizes}, {args.models_per_job} models per job")
        measure_speed(task, rows, args.sizes, args.models_per_job, args.seed, args.device, log)
        speed = speed_table(rows, args.sizes, args.records, args.seed)
        sections.append(
            "## Seconds per model and per record\n\n"
            "CPU: CPU-seconds of the fine-tuning process (what the work costs; barely moved by "
            "other load on the machine); wall: elapsed seconds. Speed-up: the baseline's CPU "
            "time over this one's (wall-time ratio in brackets).\n\n"
            + _md(["n", "strategy/engine", "ran as", "CPU s/model", "wall s/model",
                   "CPU s/record", "speed-up", "AUC", "signal kept"],
                  [[r["n"], r["config"], r["engine"], f"{r['cpu_s_per_model']:.3f}",
                    f"{r['s_per_model']:.3f}", f"{r['cpu_s_per_record']:.4f}",
                    f"{r['speedup']:.1f}x ({r['wall_speedup']:.1f}x)", f"{r['auc']:.3f}",
                    f"{100 * r['signal_kept']:.0f}%"] for r in speed]))
        _write_csv(args.out / "speed.csv", speed)

    if args.sandbox:
        log("sandbox: a round of 32 models in 4 jobs")
        sandbox = measure_sandbox(task, 32, 4, args.seed, log)
        _write_csv(args.out / "sandbox.csv", sandbox)
        sections.append(
            f"## Sandbox: a round of 32 models in 4 jobs (fmnist_cnn, m={args.records})\n\n"
            + _md(["how", "round wall s", "wall s/model", "CPU s (worker + children)",
                   "CPU saved vs fresh"],
                  [[r["way"], f"{r['seconds']:.1f}", f"{r['s_per_model']:.3f}",
                    f"{r['cpu_seconds']:.1f}", f"{r['cpu_saved_vs_fresh_s']:.1f} s"]
                   for r in sandbox]))
    if args.data_path:
        sizes = [5000] if args.quick else [5000, 50000]
        log(f"data path: builder data as npz vs FFCV .beton, {sizes} records")
        data = measure_data_path(sizes, log)
        _write_csv(args.out / "data_path.csv", data)
        sections.append(
            "## Data path: builder data as npz vs FFCV .beton\n\n"
            "Fashion-MNIST training images padded to 3 x 32 x 32 (CIFAR-shaped), float32. Write: "
            "the file from arrays. Read: the file's bytes to float32 arrays, as the scorer and "
            "worker get them; first read in a fresh process with torch imported (for FFCV: "
            "importing ffcv, in brackets, and numba compiling its loader), then later reads in "
            "that process. Medians of "
            f"{data[0]['rounds']} rounds, formats interleaved, fresh memory touched before "
            "each (a VM's first touch of it cost seconds). Peak RSS of the reading process "
            f"(its growth during the reads in brackets). JPEG quality {JPEG_QUALITY} is lossy: "
            "mean (max) absolute pixel error on [0, 1].\n\n"
            + _md(["records", "format", "MB", "write s", "first read s (import ffcv)",
                   "later read s", "peak RSS MB (reads)", "pixel error"],
                  [[f"{r['records']:,}", r["format"], f"{r['bytes'] / 1e6:.1f}",
                    f"{r['write_s']:.2f}", f"{r['cold_read_s']:.2f} ({r['import_s']:.2f})",
                    f"{r['warm_read_s']:.3f}",
                    f"{r['peak_rss_mb']:.0f} ({r['read_rss_mb']:.0f})",
                    f"{r['mean_abs_error']:.4f} ({r['max_abs_error']:.3f})"
                    if r["mean_abs_error"] else ("0 (exact)" if r["records_ok"] else "WRONG")]
                   for r in data])
            + "\n\nWhere each wins:\n\n" + "\n".join(f"- {line}"
                                                   for line in data_path_verdict(data)))
    sections.append(f"Total {time.perf_counter() - t0:.0f} s.")
    text = "\n\n".join(sections) + "\n"
    (args.out / "results.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
