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
job vs one warm child per task. ``--data-path`` adds the records' data path: the npz the worker
reads vs an FFCV ``.beton`` (only when ``ffcv`` is importable).

Results go to ``--out`` (default ``bench/out/finetune/``): ``speed.csv`` (and ``sandbox.csv``,
``data_path.csv``) and ``results.md`` (the printed tables).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
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


def measure_data_path(task: Task, sizes: list[int], log) -> list[dict]:
    """Records to tensors: the npz the worker gets (load + torch tensor) vs an FFCV .beton
    (written once per round, read by every job: one full pass through an ffcv Loader)."""
    import torch

    from ftps.ml.datasets import demo_splits
    from ftps.records.npz import load as load_records
    from ftps.records.npz import save as save_records

    x_all, y_all = demo_splits("fashion-mnist", seed=0)["contributors"]
    out = []
    for m in sizes:
        x, y = x_all[:m], y_all[:m]
        reps = 5
        t = time.perf_counter()
        for _ in range(reps):
            buf = io.BytesIO()
            save_records(buf, x, y)
            data = buf.getvalue()
        write_s = (time.perf_counter() - t) / reps
        t = time.perf_counter()
        for _ in range(reps):
            xr, yr = load_records(data)
            _ = torch.from_numpy(xr).clone(), torch.from_numpy(yr).clone()  # the copy is part of the read
        read_s = (time.perf_counter() - t) / reps
        out.append({"m": m, "path": "npz (default)", "write_s": write_s, "read_s": read_s,
                    "first_read_s": read_s, "bytes": len(data)})
        log(f"  m={m}: npz write {write_s * 1e3:.1f} ms, read {read_s * 1e3:.1f} ms")
        try:
            out.extend(_ffcv(x, y, log))
        except ImportError as e:
            log(f"  m={m}: ffcv not importable ({e}); skipped")
    return out


def _ffcv(x: np.ndarray, y: np.ndarray, log) -> list[dict]:
    import subprocess

    import ffcv  # noqa: F401 - ImportError means: skip

    out = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "records.beton"
        np.save(Path(tmp) / "x.npy", x)
        np.save(Path(tmp) / "y.npy", y)
        # Each in a fresh process, as the sandbox child would: numba compiles on first use.
        code = _FFCV_SCRIPT.format(tmp=tmp, path=path)
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             check=True)
        write_s, first_read_s, read_s = map(float, res.stdout.split())
        size = path.stat().st_size
    log(f"  m={len(x)}: ffcv write {write_s * 1e3:.1f} ms, first read in a fresh process "
        f"{first_read_s * 1e3:.1f} ms, later reads {read_s * 1e3:.1f} ms")
    out.append({"m": len(x), "path": "ffcv .beton", "write_s": write_s, "read_s": read_s,
                "first_read_s": first_read_s, "bytes": size})
    return out


_FFCV_SCRIPT = """
import time, numpy as np, torch
from ffcv.writer import DatasetWriter
from ffcv.fields import NDArrayField, IntField
from ffcv.fields.decoders import NDArrayDecoder, IntDecoder
from ffcv.loader import Loader, OrderOption
from ffcv.transforms import ToTensor
x = np.load("{tmp}/x.npy"); y = np.load("{tmp}/y.npy")
class DS:
    def __len__(self): return len(x)
    def __getitem__(self, i): return (x[i], int(y[i]))
t = time.perf_counter()
DatasetWriter("{path}", {{"x": NDArrayField(shape=x.shape[1:], dtype=np.dtype("float32")),
                         "y": IntField()}}, num_workers=1).from_indexed_dataset(DS())
write = time.perf_counter() - t
def read():
    loader = Loader("{path}", batch_size=len(x), num_workers=1, order=OrderOption.SEQUENTIAL,
                    pipelines={{"x": [NDArrayDecoder(), ToTensor()],
                               "y": [IntDecoder(), ToTensor()]}})
    xs, ys = zip(*[(a.clone(), b.clone()) for a, b in loader])
    return torch.cat(xs), torch.cat(ys)
t = time.perf_counter(); xt, yt = read(); first = time.perf_counter() - t
assert np.array_equal(xt.numpy(), x) and np.array_equal(yt.numpy().ravel(), y)
t = time.perf_counter()
for _ in range(5): read()
print(write, first, (time.perf_counter() - t) / 5)
"""


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
                   help="also time the records' data path, npz vs FFCV (m=500 and 5000)")
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
    task = load_task(args.records, args.seed)
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
        log("data path: npz vs ffcv")
        data = measure_data_path(task, [500, 5000], log)
        _write_csv(args.out / "data_path.csv", data)
        sections.append(
            "## Data path: records to tensors (write once per round, read once per job)\n\n"
            + _md(["m", "path", "write ms", "first read ms (fresh process)", "read ms", "bytes"],
                  [[r["m"], r["path"], f"{1e3 * r['write_s']:.1f}",
                    f"{1e3 * r['first_read_s']:.1f}", f"{1e3 * r['read_s']:.1f}", r["bytes"]]
                   for r in data]))
    sections.append(f"Total {time.perf_counter() - t0:.0f} s.")
    text = "\n\n".join(sections) + "\n"
    (args.out / "results.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
