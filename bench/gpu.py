"""The paper's setting on one GPU: a scoring round of ResNet-18 fine-tunes, engine x precision.

The FT-PrivacyScore demo fine-tunes torchvision's ResNet-18 on CIFAR-10 records (6 s per
fine-tune of 100 records on a V100, 3 GPU-minutes per scored record). This bench runs the demo's
scoring round in that setting through this project's engine (``ftps.ml.engine``, what a GPU
worker runs): the shipped ``clients/strategies/cifar_resnet18.py`` (CIFAR stem, full fine-tuning,
its RECIPE: 10 epochs, batch 64, hflip + random crop, hflip test-time query), n = 64 models on
the production masks (each model on a random half of m = 500 records) from one base model, then
online LiRA on the phi they give. Each configuration -- the sequential and the stacked engine,
each in float32 and in bf16 autocast -- trains the same models (same masks, seeds, batches).

    python bench/gpu.py                    # full: n=64, m=500; about 2-4 min on an H100/H200
    python bench/gpu.py --tiny             # the same code on CPU, n=4, m=4, 1 epoch: < 1 min
    python bench/gpu.py --export-records .gpu/records.npz   # records for a machine without data

Needs only torch, torchvision, numpy, scipy and safetensors (and this repository): no gRPC stack,
no object store, no protobuf; Python 3.11+ and torch 2.4+.

Records, first found: ``--records-file NPZ`` (written by ``--export-records``), CIFAR-10's python
batches (``--cifar10 DIR``, $FTPS_CIFAR10_DIR, or a ``cifar-10-batches-py`` under ~/.cache/ftps,
/usr/share/datasets or ./data), Fashion-MNIST from Debian's dataset-fashion-mnist, scikit-learn's
digits. Grey images are made CIFAR-shaped: padded (or upscaled) to 32x32 and repeated to three
channels. The output says which were used. The base model is pretrained here on other records of
the same data (``PRETRAIN`` with ``--pretrain-epochs``), as a builder would.

Per configuration it prints and writes (``--out``, default bench/out/gpu/: ``results.csv``, and one
JSON line per run appended to ``results.jsonl``): seconds per model, models per second, seconds
per scored record (n x s_model / m, the paper's "GPU-minutes per record"), the round's wall time,
peak GPU memory, achieved TFLOP/s (the model's FLOPs counted with ``torch.utils.flop_counter`` on
one training step and one evaluation, times the samples the round trains and queries) and its
fraction of the device's dense bf16 peak (from the device name; None for a device not in the
table), the attack's batch AUC and TPR at 1% FPR, and the agreement with the first configuration
(sequential float32): Pearson of phi and of the per-record scores. "fp32" is what a worker runs
without bf16: cuDNN's default lets float32 convolutions use TF32 tensor cores on Ampere and later.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import resource
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # ``python bench/gpu.py`` puts bench/, not the root, on the path
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench import cpu_name  # noqa: E402

from ftps.ml.datasets import (  # noqa: E402
    FASHION_MNIST_DIR,
    cifar_shaped,
    load_cifar10,
    load_digits,
    load_fashion_mnist,
)
from ftps.ml.engine import finetune_and_score, load_weights, resolve_device  # noqa: E402
from ftps.ml.pretrain import accuracy, pretrain_base_model  # noqa: E402
from ftps.ml.strategy import load_strategy  # noqa: E402
from ftps.privacy.masks import make_masks, model_seeds  # noqa: E402
from ftps.privacy.scoring import score  # noqa: E402

STRATEGY = ROOT / "clients" / "strategies" / "cifar_resnet18.py"
DEFAULT_OUT = ROOT / "bench" / "out" / "gpu"
CONFIGS = (("sequential", "fp32"), ("stacked", "fp32"), ("sequential", "bf16"), ("stacked", "bf16"))

# Dense (no sparsity) peak TFLOP/s from the vendors' data sheets: bf16 tensor cores, and float32
# without tensor cores. First match of the device name wins, so "H100 PCIe" precedes "H100" (a
# GH200 matches "H200": the same Hopper numbers).
PEAKS = (
    ("H200", 989.4, 66.9),
    ("H100 PCIe", 756.0, 51.2),
    ("H100 NVL", 835.5, 60.0),
    ("H100", 989.4, 66.9),
    ("H800", 989.4, 66.9),
    ("A100", 312.0, 19.5),
    ("L40S", 362.1, 91.6),
    ("L40", 181.0, 90.5),
    ("L4", 121.0, 30.3),
    ("A10G", 70.0, 31.2),
    ("A10", 125.0, 31.2),
    ("RTX 4090", 165.2, 82.6),
    ("V100", 0.0, 15.7),  # no bf16 tensor cores
)

# The README's targets for the full run (issue 18).
TARGET_ROUND_S = 20.0
TARGET_PEAK_FRACTION = 0.30


@dataclass
class Settings:
    models: int
    records: int
    pretrain_records: int
    pretrain_epochs: int
    epochs: int | None  # None: the recipe's
    device: str
    budget_s: float
    tiny: bool


@dataclass
class Row:
    engine: str
    precision: str
    engine_ran: str = ""
    precision_ran: str = ""
    channels_last: bool = False
    round_s: float = 0.0
    train_s: float = 0.0
    phi_s: float = 0.0
    s_per_model: float = 0.0
    models_per_s: float = 0.0
    s_per_record: float = 0.0
    peak_mem_gib: float = 0.0
    tflops: float = 0.0
    train_tflops: float = 0.0
    peak_fraction_bf16: float | None = None
    auc: float = 0.0
    tpr_at_1pct_fpr: float = 0.0
    phi_pearson_vs_first: float | None = None
    score_pearson_vs_first: float | None = None
    max_abs_phi_diff_vs_first: float | None = None
    skipped: str = ""
    phi: np.ndarray | None = field(default=None, repr=False)
    scores: np.ndarray | None = field(default=None, repr=False)


# --------------------------------------------------------------------------- records


def _cifar_dirs(explicit: str | None) -> list[Path]:
    if explicit:
        return [Path(explicit)]
    found = [Path(os.environ["FTPS_CIFAR10_DIR"])] if os.environ.get("FTPS_CIFAR10_DIR") else []
    for base in (Path.home() / ".cache" / "ftps", Path("/usr/share/datasets"), ROOT / "data"):
        found += [base / "cifar-10-batches-py", base / "cifar10" / "cifar-10-batches-py"]
    return found


def load_records(records: str | None, cifar10: str | None) -> tuple[np.ndarray, np.ndarray, str]:
    """(x float32 [N, C, H, W] in [0, 1], y int64 [N], what they are); ``cifar_shaped`` makes
    the rows a run uses CIFAR-shaped (all 60,000 Fashion-MNIST images would take 0.7 GiB)."""
    if records:
        with np.load(records, allow_pickle=False) as f:
            x = f["x"].astype(np.float32) / np.float32(255.0)
            y = f["y"].astype(np.int64)
            what = str(f["source"]) if "source" in f else Path(records).name
        return x, y, f"{what} (from {records})"
    for d in _cifar_dirs(cifar10):
        if (d / "data_batch_1").is_file():
            x, y = load_cifar10(d, "train")
            return x, y, f"CIFAR-10 train ({d})"
    if cifar10:
        raise SystemExit(f"bench/gpu.py: no CIFAR-10 python batches in {cifar10}")
    if (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").is_file():
        x, y = load_fashion_mnist("train")
        return x, y, "Fashion-MNIST train, padded to 32x32, 3 channels (no CIFAR-10 here)"
    try:
        x, y = load_digits()
    except ImportError:
        raise SystemExit("bench/gpu.py: no records: no CIFAR-10, no Fashion-MNIST and no scikit-learn; "
                         "make some with --export-records on a machine that has them") from None
    return x, y, "scikit-learn digits, upscaled to 32x32, 3 channels (no CIFAR-10 here)"


def export_records(path: Path, count: int, cifar10: str | None) -> None:
    """Write ``count`` records of the data found here as a small npz (uint8, before the CIFAR
    reshaping) for a machine that has none: ``--records-file PATH`` there."""
    if cifar10 or any((d / "data_batch_1").is_file() for d in _cifar_dirs(None)):
        x, y, what = load_records(None, cifar10)
    elif (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").is_file():
        x, y = load_fashion_mnist("train")
        what = "Fashion-MNIST train, padded to 32x32, 3 channels"
    else:
        raise SystemExit("bench/gpu.py: neither CIFAR-10 nor Fashion-MNIST here to export")
    pick = np.random.default_rng(0).permutation(len(x))[:count]
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, x=(x[pick] * 255).round().astype(np.uint8), y=y[pick],
                        source=np.array(what))
    print(f"wrote {len(pick)} records ({what}) to {path}: {path.stat().st_size / 2**20:.1f} MiB")


# --------------------------------------------------------------------------- FLOPs, device


def count_flops(source: str, weights: bytes, device: torch.device, tta: int) -> tuple[float, float]:
    """FLOPs of one training sample (forward + backward) and of one evaluated record (forward per
    query), counted by torch's FlopCounterMode on a batch of 2 in float32 (the count depends on
    shapes only, not on the precision)."""
    from torch.utils.flop_counter import FlopCounterMode

    model = load_strategy(source).build_model()
    load_weights(model, weights)
    model.to(device).train()
    x = torch.rand(2, 3, 32, 32, device=device)
    with FlopCounterMode(display=False) as counter:
        model(x).sum().backward()
    train = counter.get_total_flops() / 2
    model.eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    return float(train), float(counter.get_total_flops() / 2 * tta)


def device_info(device: torch.device) -> dict:
    info = {"device": str(device), "name": cpu_name(),
            "torch": torch.__version__, "python": platform.python_version(),
            "cuda": torch.version.cuda, "bf16_peak_tflops": None, "fp32_peak_tflops": None}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(name=props.name, memory_gib=round(props.total_memory / 2**30, 1),
                    multiprocessors=props.multi_processor_count,
                    cudnn=torch.backends.cudnn.version())
        for key, bf16, fp32 in PEAKS:
            if key in props.name:
                info.update(bf16_peak_tflops=bf16 or None, fp32_peak_tflops=fp32)
                break
    return info


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


# --------------------------------------------------------------------------- the round


def run(settings: Settings, *, records: str | None, cifar10: str | None, out: Path,
        configs=CONFIGS, log=print) -> list[Row]:
    t_start = time.perf_counter()
    device = resolve_device(settings.device)
    info = device_info(device)
    log(f"device: {info['name']} ({device}), torch {info['torch']}, Python {info['python']}, "
        f"CUDA {info['cuda']}")
    x_all, y_all, what = load_records(records, cifar10)
    log(f"records: {what}: {len(x_all)} available")
    n, m = settings.models, settings.records
    if len(x_all) < m + settings.pretrain_records:
        raise SystemExit(f"bench/gpu.py: {len(x_all)} records; {m} + {settings.pretrain_records} needed")
    perm = np.random.default_rng(0).permutation(len(x_all))
    batch = perm[:m]
    builder = perm[m:m + settings.pretrain_records]
    heldout = perm[m + settings.pretrain_records:][:8 if settings.tiny else 2000]
    x, y = cifar_shaped(x_all[batch]), y_all[batch]

    base_source = STRATEGY.read_text()
    source = base_source if settings.epochs is None else _with_epochs(base_source, "RECIPE", settings.epochs)
    strategy = load_strategy(source)
    pretrain_source = _with_epochs(base_source, "PRETRAIN", settings.pretrain_epochs)
    t = time.perf_counter()
    weights = pretrain_base_model(pretrain_source, cifar_shaped(x_all[builder]), y_all[builder], seed=0,
                                  device=str(device))
    _sync(device)
    model = strategy.build_model()
    load_weights(model, weights)
    base_acc = accuracy(model.to(device), cifar_shaped(x_all[heldout]), y_all[heldout])
    del model
    log(f"base model: pretrained on {len(builder)} records x {settings.pretrain_epochs} epochs; "
        f"top-1 on {len(heldout)} held-out records: {base_acc:.3f} ({time.perf_counter() - t:.1f} s)")

    masks = make_masks(n, m, seed=7)
    seeds = model_seeds(11, n)
    models = [(i, seeds[i], masks[i]) for i in range(n)]
    recipe = strategy.recipe
    train_flops_sample, eval_flops_record = count_flops(source, weights, device, 1 + len(strategy.tta))
    trained_samples = int(masks.sum()) * recipe.epochs
    round_train_flops = train_flops_sample * trained_samples
    round_flops = round_train_flops + eval_flops_record * m * n
    log(f"round: n={n} models x m={m} records, {recipe.epochs} epochs, batch {recipe.batch_size}; "
        f"{train_flops_sample / 1e9:.2f} GFLOP per training sample, {round_flops / 1e12:.1f} TFLOP "
        f"in all")

    rows: list[Row] = []
    for engine, precision in configs:
        row = Row(engine, precision)
        rows.append(row)
        elapsed = time.perf_counter() - t_start
        if elapsed > settings.budget_s:
            row.skipped = f"time budget ({settings.budget_s:.0f} s) spent"
            log(f"{engine}/{precision}: skipped, {row.skipped}")
            continue
        if device.type == "cuda":
            # One-time costs (cuDNN/cuBLAS handles, vmap's first trace) out of the timing: four
            # models on 8 records, one epoch.
            wmasks = make_masks(4, 8, seed=1)
            finetune_and_score(strategy_source=_with_epochs(base_source, "RECIPE", 1),
                               base_weights=weights, train_x=x[:8], train_y=y[:8], eval_x=x[:8],
                               eval_y=y[:8], models=[(i, i, wmasks[i]) for i in range(4)],
                               device=str(device), engine=engine, precision=precision)
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        _sync(device)
        t = time.perf_counter()
        result = finetune_and_score(strategy_source=source, base_weights=weights, train_x=x,
                                    train_y=y, eval_x=x, eval_y=y, models=models,
                                    device=str(device), engine=engine, precision=precision)
        _sync(device)
        row.round_s = time.perf_counter() - t
        row.engine_ran, row.precision_ran = result.engine, result.precision
        row.channels_last = result.channels_last
        row.train_s, row.phi_s = result.train_s, result.phi_s
        row.s_per_model = row.round_s / n
        row.models_per_s = n / row.round_s
        row.s_per_record = n * row.s_per_model / m
        row.peak_mem_gib = _peak_memory_gib(device)
        row.tflops = round_flops / row.round_s / 1e12
        row.train_tflops = round_train_flops / max(row.train_s, 1e-9) / 1e12
        if info["bf16_peak_tflops"]:
            row.peak_fraction_bf16 = row.tflops / info["bf16_peak_tflops"]
        scored = score(result.phi, masks, method="online-per-record")
        row.auc, row.tpr_at_1pct_fpr = scored.batch.auc, scored.batch.tpr_at_1pct_fpr
        row.phi, row.scores = result.phi, scored.records.score
        first = rows[0]
        if first.phi is not None and first is not row:
            row.phi_pearson_vs_first = float(np.corrcoef(first.phi.ravel(), row.phi.ravel())[0, 1])
            row.score_pearson_vs_first = float(np.corrcoef(first.scores, row.scores)[0, 1])
            row.max_abs_phi_diff_vs_first = float(np.nanmax(np.abs(first.phi - row.phi)))
        log(_line(row))
        _write(out, settings, info, what, base_acc, round_flops, rows)
    record = _write(out, settings, info, what, base_acc, round_flops, rows)
    with (out / "results.jsonl").open("a") as f:
        f.write(json.dumps(record) + "\n")
    _summary(rows, info, settings, log)
    log(f"wrote {out / 'results.csv'} and a line of {out / 'results.jsonl'} "
        f"({time.perf_counter() - t_start:.0f} s in all)")
    return rows


def _with_epochs(source: str, name: str, epochs: int) -> str:
    """A strategy's source with its ``RECIPE`` or ``PRETRAIN`` running ``epochs`` epochs: a later
    assignment overrides the shipped dict, the rest of the recipe as shipped."""
    return source + f"\n{name} = {{**{name}, 'epochs': {int(epochs)}}}\n"


def _line(r: Row) -> str:
    frac = "" if r.peak_fraction_bf16 is None else f", {100 * r.peak_fraction_bf16:.1f}% of bf16 peak"
    agree = "" if r.phi_pearson_vs_first is None else (
        f"; vs first: phi r={r.phi_pearson_vs_first:.4f}, scores r={r.score_pearson_vs_first:.4f}")
    return (f"{r.engine}/{r.precision} (ran {r.engine_ran}, {r.precision_ran}"
            f"{', channels-last' if r.channels_last else ''}): round {r.round_s:.2f} s, "
            f"{r.s_per_model:.3f} s/model, {r.models_per_s:.2f} models/s, {r.s_per_record:.3f} s/record, "
            f"peak mem {r.peak_mem_gib:.2f} GiB, {r.tflops:.1f} TFLOP/s{frac}; AUC {r.auc:.3f}{agree}")


_COLUMNS = [f for f in Row.__dataclass_fields__ if f not in ("phi", "scores")]


def _write(out: Path, settings: Settings, info: dict, what: str, base_acc: float | None,
           round_flops: float, rows: list[Row]) -> dict:
    """results.csv rewritten after every configuration, so a run stopped early keeps its rows
    -> the run as one JSON-able record (results.jsonl)."""
    out.mkdir(parents=True, exist_ok=True)
    with (out / "results.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["device_name", *_COLUMNS])
        w.writeheader()
        for r in rows:
            w.writerow({"device_name": info["name"], **{k: getattr(r, k) for k in _COLUMNS}})
    return {
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "settings": asdict(settings),
        "device": info, "records": what, "base_model_top1": base_acc, "round_tflop": round_flops / 1e12,
        "rows": [{k: getattr(r, k) for k in _COLUMNS} for r in rows]}


def _summary(rows: list[Row], info: dict, settings: Settings, log) -> None:
    done = [r for r in rows if not r.skipped]
    if not done:
        return
    best = min(done, key=lambda r: r.round_s)
    log(f"fastest: {best.engine}/{best.precision}: round {best.round_s:.2f} s "
        f"({best.s_per_record:.3f} s per scored record; the paper: 180 s per record on a V100)")
    if not settings.tiny and info["device"].startswith("cuda"):
        ok_floor = best.round_s <= TARGET_ROUND_S
        frac = best.peak_fraction_bf16
        log(f"targets: round <= {TARGET_ROUND_S:.0f} s: {'met' if ok_floor else 'NOT met'}; "
            f">= {100 * TARGET_PEAK_FRACTION:.0f}% of bf16 peak: "
            + ("unknown device" if frac is None else
               f"{'met' if frac >= TARGET_PEAK_FRACTION else 'NOT met'} ({100 * frac:.1f}%)"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python bench/gpu.py", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Full mode needs a GPU for its 5-minute budget; --tiny runs anywhere.")
    p.add_argument("--tiny", action="store_true",
                   help="the same code on CPU at toy sizes: n=4, m=4, 1 epoch (the test suite runs it)")
    p.add_argument("--models", type=int, help="n, models per round (default 64; tiny 4)")
    p.add_argument("--records", dest="m", type=int, help="m, records in the batch (default 500; tiny 4)")
    p.add_argument("--epochs", type=int, help="override the recipe's epochs (default: the recipe's 10; tiny 1)")
    p.add_argument("--pretrain-records", type=int, help="records the base model is pretrained on "
                   "(default 5000; tiny 16)")
    p.add_argument("--pretrain-epochs", type=int, help="its epochs (default 5; tiny 1)")
    p.add_argument("--device", default=None, help="torch device (default: cuda when present; tiny: cpu)")
    p.add_argument("--configs", default=",".join(f"{e}:{q}" for e, q in CONFIGS),
                   help="engine:precision pairs, comma-separated, the first is the reference "
                   "(default: %(default)s)")
    p.add_argument("--budget-s", type=float, default=270.0,
                   help="start no configuration after this many seconds (default %(default)s)")
    p.add_argument("--records-file", dest="records_file", metavar="NPZ",
                   help="records written by --export-records")
    p.add_argument("--cifar10", metavar="DIR", help="CIFAR-10's cifar-10-batches-py directory")
    p.add_argument("--export-records", metavar="NPZ", type=Path,
                   help="write records found here for a machine without data, and stop")
    p.add_argument("--export-count", type=int, default=6000, help="records to export (default %(default)s)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default bench/out/gpu)")
    args = p.parse_args(argv)
    if args.export_records is not None:
        export_records(args.export_records, args.export_count, args.cifar10)
        return 0
    try:
        configs = [tuple(c.split(":")) for c in args.configs.split(",")]
        if any(len(c) != 2 for c in configs):
            raise ValueError
    except ValueError:
        p.error(f"--configs: engine:precision pairs, got {args.configs!r}")
    tiny = args.tiny
    settings = Settings(
        models=args.models or (4 if tiny else 64), records=args.m or (4 if tiny else 500),
        pretrain_records=args.pretrain_records or (16 if tiny else 5000),
        pretrain_epochs=args.pretrain_epochs or (1 if tiny else 5),
        epochs=args.epochs if args.epochs is not None else (1 if tiny else None),
        device=args.device or ("cpu" if tiny else ("cuda" if torch.cuda.is_available() else "cpu")),
        budget_s=args.budget_s, tiny=tiny)
    if not tiny and not settings.device.startswith("cuda"):
        print("bench/gpu.py: no CUDA device here; the full round would take hours on CPU. "
              "Use --tiny, or --device cpu to insist.", file=sys.stderr)
        if args.device is None:
            return 2
    rows = run(settings, records=args.records_file, cifar10=args.cifar10, out=args.out,
               configs=configs)
    return 0 if any(not r.skipped for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
