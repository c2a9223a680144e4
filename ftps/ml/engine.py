"""Fine-tune n models and evaluate the statistic phi (DESIGN.md §3, production stage).

Model i = S(M0, train[mask_i] ∪ P_i) where P_i is ``builder_mix`` records sampled from the
builder's distribution with model i's seed; the result is PHI[n, m] over the m eval records.
This module is the job's front door (device, threads, weights, the job's records checked
against each other and the strategy's model); the job itself is an ``ftps.ml.jobs.FinetuneJob``,
validated where it was built. ``ftps.ml.engines`` decides how a job's models train (one after
another, stacked with torch.func, or on cached trunk features) and runs them, on the statistic and
training loop of ``ftps.ml.training``. The arrows point one way: engine -> engines -> training,
and all of them -> jobs.

Determinism: the same job (same seeds) on the same device type and thread count gives the same
phi bit for bit: torch is seeded per model, shuffles, augmentation and the builder sample come
from numpy Generators seeded by the model seed, cuDNN is pinned to deterministic kernels, and
every choice the engine makes (engine, memory format, fused optimizer) depends only on the
strategy, the record shape and the device type, never on a timing.

This module runs strategy code in-process; untrusted strategies go through
``services.finetune_worker.sandbox``.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save
from torch import nn

from ftps.common.cpus import usable_cpus
from ftps.ml import engines
from ftps.ml.jobs import CHECK_ONLY, FinetuneJob, JobResult, ModelSpec
from ftps.records import RecordsError
from ftps.records.npz import Records
from ftps.ml.strategy import (
    EngineError,
    Strategy,
    StrategyError,
    WeightsError,
    describe_exception,
    load_strategy,
)
from ftps.ml.training import (
    check_logits,
    is_out_of_memory,
    model_data,
    model_device,
    owned_tensor,
    short_list,
    strategy_code,
)

__all__ = [
    "CHECK_ONLY",
    "ENGINE_VERSION",
    "configure_threads",
    "finetune_and_score",
    "load_weights",
    "pin_determinism",
    "resolve_device",
    "run_job",
    "save_weights",
]

# Changes whenever the same job may give different phi (kernels, engine rule): part of every
# cache key of stored phi (bench/attacks.py). 2: fused optimizers, channels-last on CPU, engines.
# (bf16 autocast and channels-last on CUDA came later without a bump: no CPU job changed.)
ENGINE_VERSION = "2"

Progress = Callable[[int, int], None]


# --------------------------------------------------------------------------- device, threads


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``None`` -> CUDA when available, CPU otherwise; otherwise the named device."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise EngineError(f"device {device!r} requested but CUDA is not available")
    return dev


def configure_threads() -> int:
    """Set torch's intra-op threads: $FTPS_TORCH_THREADS, else the CPUs this process may use.

    torch's default counts the machine's cores, which oversubscribes a container limited by
    affinity or a cgroup quota. Returns the thread count in force.
    """
    env = os.environ.get("FTPS_TORCH_THREADS", "").strip()
    if env:
        try:
            threads = int(env)
        except ValueError:
            raise EngineError(f"FTPS_TORCH_THREADS must be an integer, got {env!r}") from None
        if threads < 1:
            raise EngineError(f"FTPS_TORCH_THREADS must be >= 1, got {threads}")
    else:
        threads = usable_cpus()
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return threads


def pin_determinism(device: torch.device) -> None:
    if device.type == "cuda":
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False


# --------------------------------------------------------------------------- weights


def save_weights(model: nn.Module) -> bytes:
    """The model's state dict as safetensors bytes (tied tensors are stored as copies)."""
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    return safetensors_save(state)


def load_weights(model: nn.Module, safetensors_bytes: bytes) -> None:
    """Load safetensors bytes into ``model`` strictly; never unpickles.

    Raises WeightsError naming the missing, unexpected or mis-shaped keys, or a file that is
    not safetensors or holds non-finite values.
    """
    if not isinstance(safetensors_bytes, (bytes, bytearray, memoryview)):
        raise WeightsError(f"weights must be bytes, got {type(safetensors_bytes).__name__}")
    try:
        tensors = safetensors_load(bytes(safetensors_bytes))
    except (SafetensorError, ValueError, RuntimeError, OSError) as e:
        raise WeightsError(f"weights are not a valid safetensors file: {e}") from e

    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    mis_shaped = [
        f"{k}: file {tuple(tensors[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(set(expected) & set(tensors))
        if tensors[k].shape != expected[k].shape
    ]
    problems = []
    if missing:
        problems.append(f"missing keys {short_list(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {short_list(unexpected)}")
    if mis_shaped:
        problems.append(f"shape mismatches {short_list(mis_shaped)}")
    if problems:
        raise WeightsError("weights do not match build_model(): " + "; ".join(problems))
    non_finite = sorted(
        k for k, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()
    )
    if non_finite:
        raise WeightsError(f"weights hold NaN or infinite values in {short_list(non_finite)}")
    with torch.no_grad():
        model.load_state_dict(tensors, strict=True)


# --------------------------------------------------------------------------- the job


def _check_records(strategy: Strategy, probe: nn.Module, x: np.ndarray, what: str) -> int:
    """Check record shape against the model with a one-record forward pass -> number of classes."""
    shape = tuple(x.shape[1:])
    if strategy.input_shape is not None and shape != strategy.input_shape:
        raise RecordsError(
            f"{what} have shape {shape} but the strategy's model expects INPUT_SHAPE "
            f"{strategy.input_shape}"
        )
    if len(x) == 0:
        return -1
    probe.eval()
    try:
        with torch.inference_mode():
            logits = probe(owned_tensor(x[:1], model_device(probe), torch.float32))
    except (Exception, SystemExit) as e:
        if is_out_of_memory(e):
            raise MemoryError(str(e)) from e
        raise RecordsError(
            f"{what} of shape {shape} do not fit the model: forward pass failed with "
            f"{describe_exception(e)}"
        ) from e
    check_logits(logits, 1)
    classes = int(logits.shape[1])
    if strategy.num_classes is not None and classes != strategy.num_classes:
        raise StrategyError(
            f"model returns {classes} logits but the strategy declares NUM_CLASSES = "
            f"{strategy.num_classes}"
        )
    return classes


def _check_labels(y: np.ndarray, classes: int, what: str) -> None:
    if classes > 0 and len(y) and int(y.max()) >= classes:
        raise RecordsError(f"{what}: labels must be in [0, {classes}), got {int(y.max())}")


def run_job(job: FinetuneJob, *, device: str | None = None,
            progress: Progress | None = None) -> JobResult:
    """Fine-tune one model per ``job.models`` entry and evaluate phi on the eval records.

    Model i starts from the base weights and trains (RECIPE or ``finetune()``) on
    ``train[mask_i]`` followed by ``builder_mix`` builder records drawn without replacement with
    the model's seed (``builder_mix=None`` uses the recipe's ``builder_mix``).

    ``job.engine``: "auto" (default, or $FTPS_ENGINE) or one of ``ftps.ml.engines.REQUESTS``;
    see ``ftps.ml.engines.plan_engine`` for the rule; ``CHECK_ONLY`` checks the job without
    training (the result then has ``classes`` and ``parameters``; PHI is zeros).

    The job's records are validated already (``ftps.ml.jobs``); here they are checked against
    each other and the strategy's model. Returns PHI float64 [len(models), m] and how it was
    computed (``JobResult``). ``progress(done, total)`` is called as models finish.

    Raises StrategyError, WeightsError (EngineError), RecordsError, or MemoryError.
    """
    t0 = time.perf_counter()
    strategy = load_strategy(job.strategy_source)
    train, evaluated, builder = job.train_records, job.evaluated, job.builder_records
    if train.record_shape != evaluated.record_shape:
        raise RecordsError(
            f"train records have shape {train.x.shape[1:]} but eval records {evaluated.x.shape[1:]}"
        )
    builder_mix = job.builder_mix
    if builder_mix is None:
        builder_mix = strategy.recipe.builder_mix if strategy.recipe is not None else 0
    if builder_mix < 0:
        raise RecordsError(f"builder_mix must be >= 0, got {builder_mix}")
    if builder_mix > 0:
        if builder is None:
            raise RecordsError(f"builder_mix={builder_mix} but no builder data was given")
        if builder.record_shape != train.record_shape:
            raise RecordsError(
                f"builder records have shape {builder.x.shape[1:]} but train records "
                f"{train.x.shape[1:]}"
            )
        if builder_mix > len(builder):
            raise RecordsError(
                f"builder_mix={builder_mix} exceeds the {len(builder)} builder records"
            )

    configure_threads()
    dev = resolve_device(device)
    pin_determinism(dev)
    check_only = job.engine == CHECK_ONLY
    plan = None if check_only else engines.plan_engine(strategy, dev, job.engine, job.precision)

    with strategy_code("build_model()"):
        base = strategy.build_model()
    if not isinstance(base, nn.Module):
        raise StrategyError(
            f"build_model() must return a torch.nn.Module, got {type(base).__name__}"
        )
    load_weights(base, job.base_weights)
    base.to(dev)

    classes = _check_records(strategy, base, evaluated.x, "eval records")
    classes = max(classes, _check_records(strategy, base, train.x, "train records"))
    _check_labels(train.y, classes, "train records")
    _check_labels(evaluated.y, classes, "eval records")
    if builder_mix > 0:
        _check_labels(builder.y, classes, "builder records")
    if check_only:
        # The registry's upload check: the weights load into build_model() and the model answers
        # records of the task's shape with one logit per class. Nothing is trained.
        return JobResult(np.zeros((len(job.models), len(evaluated)), dtype=np.float64),
                         engine=CHECK_ONLY, device=str(dev), classes=classes,
                         parameters=sum(int(p.numel()) for p in base.parameters()),
                         seconds=time.perf_counter() - t0)

    prepared = engines.Prepared(
        strategy=strategy,
        base=base,
        device=dev,
        train_x=owned_tensor(train.x, dev, torch.float32),
        train_y=owned_tensor(train.y, dev, torch.int64),
        eval_x=owned_tensor(evaluated.x, dev, torch.float32),
        eval_y=owned_tensor(evaluated.y, dev, torch.int64),
        eval_is_train=evaluated is train or (
            evaluated.x.shape == train.x.shape and np.array_equal(evaluated.x, train.x)
            and np.array_equal(evaluated.y, train.y)),
        builder_x=owned_tensor(builder.x, dev, torch.float32) if builder_mix > 0 else None,
        builder_y=owned_tensor(builder.y, dev, torch.int64) if builder_mix > 0 else None,
        models=model_data(job.models, len(builder) if builder_mix > 0 else 0, builder_mix),
        progress=progress,
    )
    result = engines.run(prepared, plan)
    return dataclasses.replace(result, device=str(dev), seconds=time.perf_counter() - t0)


def finetune_and_score(
    *,
    strategy_source: str,
    base_weights: bytes,
    train_x: np.ndarray,
    train_y: np.ndarray,
    eval_x: np.ndarray,
    eval_y: np.ndarray,
    models: Sequence[ModelSpec | tuple[int, int, np.ndarray]],
    builder_x: np.ndarray | None = None,
    builder_y: np.ndarray | None = None,
    builder_mix: int | None = 0,
    device: str | None = None,
    progress: Progress | None = None,
    engine: str | None = None,
    precision: str | None = None,
) -> JobResult:
    """``run_job`` on arrays -> its JobResult (``phi`` float64 [len(models), m], the engine that
    ran, timings); for in-process callers holding arrays (tests, bench). Shapes: train_x float32
    [N, *S], train_y int64 [N], masks bool [N], eval_x float32 [m, *S], eval_y int64 [m],
    builder_x float32 [B, *S].
    """
    train = Records.of(train_x, train_y, what="train records")
    evaluated = None
    if eval_x is not train_x or eval_y is not train_y:
        evaluated = Records.of(eval_x, eval_y, what="eval records")
    builder = None
    if builder_x is not None and builder_y is not None:
        builder = Records.of(builder_x, builder_y, what="builder records")
    job = FinetuneJob(strategy_source=strategy_source, base_weights=base_weights,
                      train_records=train, models=tuple(models), eval_records=evaluated,
                      builder_records=builder, builder_mix=builder_mix, engine=engine,
                      precision=precision)
    return run_job(job, device=device, progress=progress)
