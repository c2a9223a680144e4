"""Fine-tune n models and evaluate the statistic phi (DESIGN.md §3, production stage).

Model i = S(M0, train[mask_i] ∪ P_i) where P_i is ``builder_mix`` records sampled from the
builder's distribution with model i's seed; the result is PHI[n, m] over the m eval records.
This module holds the job (validation, weights, the statistic) and the one-model-at-a-time
training loop; ``ftps.ml.engines`` decides how a job's models train (one after another, stacked
with torch.func, or on cached trunk features) and runs them.

Determinism: the same job (same seeds) on the same device type and thread count gives the same
phi bit for bit: torch is seeded per model, shuffles, augmentation and the builder sample come
from numpy Generators seeded by the model seed, cuDNN is pinned to deterministic kernels, and
every choice the engine makes (engine, memory format, fused optimizer) depends only on the
strategy, the record shape and the device type, never on a timing.

This module runs strategy code in-process; untrusted strategies go through
``services.finetune_worker.sandbox``.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save
from torch import nn

from ftps.common.cpus import usable_cpus
from ftps.ml.datasets import validate_records
from ftps.ml.strategy import (
    EngineError,
    Recipe,
    RecordsError,
    Strategy,
    StrategyError,
    WeightsError,
    describe_exception,
    load_strategy,
)

__all__ = [
    "CHECK_ONLY",
    "ENGINE_VERSION",
    "ModelData",
    "ModelSpec",
    "compute_phi",
    "configure_threads",
    "finetune_and_score",
    "load_weights",
    "model_data",
    "prefer_channels_last",
    "resolve_device",
    "save_weights",
    "train_with_recipe",
    "trainable_names",
]

# Changes whenever the same job may give different phi (kernels, engine rule): part of every
# cache key of stored phi (bench/attacks.py). 2: fused optimizers, channels-last on CPU, engines.
ENGINE_VERSION = "2"

# (index, seed, inclusion mask over the train records)
ModelSpec = tuple[int, int, np.ndarray]
Progress = Callable[[int, int], None]

_MAX_LISTED_KEYS = 8


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


def _pin_determinism(device: torch.device) -> None:
    if device.type == "cuda":
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False


def _owned_tensor(
    a: np.ndarray | torch.Tensor, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """A torch-allocated copy on ``device`` with standard (row-major) strides.

    Never a view of the caller's memory: numpy calls an array with odd strides on size-1 axes
    C-contiguous (``x[:, None]`` of an indexed array), torch then sees ``[N, 1, H, W]`` as
    channels-last and picks other convolution kernels, which round differently; phi would
    depend on how the caller built its arrays.
    """
    t = a if isinstance(a, torch.Tensor) else torch.from_numpy(np.asarray(a))
    return t.to(device=device, dtype=dtype).clone(memory_format=torch.contiguous_format)


def _model_device(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


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
        problems.append(f"missing keys {_short(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_short(unexpected)}")
    if mis_shaped:
        problems.append(f"shape mismatches {_short(mis_shaped)}")
    if problems:
        raise WeightsError("weights do not match build_model(): " + "; ".join(problems))
    non_finite = sorted(
        k for k, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()
    )
    if non_finite:
        raise WeightsError(f"weights hold NaN or infinite values in {_short(non_finite)}")
    with torch.no_grad():
        model.load_state_dict(tensors, strict=True)


def _short(items: Sequence[str]) -> str:
    shown = list(items[:_MAX_LISTED_KEYS])
    more = len(items) - len(shown)
    return str(shown) + (f" and {more} more" if more > 0 else "")


# --------------------------------------------------------------------------- statistic


def _phi_from_logits(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """phi = z_y - logsumexp_{c != y} z_c = log(p_y / (1 - p_y)), in float64."""
    z = logits.to(torch.float64)
    z_y = z.gather(1, y[:, None]).squeeze(1)
    others = z.scatter(1, y[:, None], float("-inf"))
    return z_y - torch.logsumexp(others, dim=1)


def _tta_queries(x: torch.Tensor, tta: Sequence[str]) -> list[torch.Tensor]:
    queries = [x]
    for name in tta:
        if name == "hflip":
            queries.append(x.flip(-1))
        else:  # parse_recipe rejects these; kept for direct callers
            raise StrategyError(f"unknown test-time augmentation {name!r}")
    return queries


def compute_phi(
    model: nn.Module,
    x: np.ndarray | torch.Tensor,
    y: np.ndarray | torch.Tensor,
    *,
    batch_size: int = 1024,
    tta: Sequence[str] = (),
) -> np.ndarray:
    """The statistic phi for every record, float64 ``[m]``, with the model in eval mode.

    phi_j = z_{y_j} - logsumexp_{c != y_j} z_c over the logits z of ``model(x_j)``, i.e. the
    logit-scaled confidence log(p / (1 - p)) computed without forming p. With ``tta`` the
    identity query and each listed query (e.g. "hflip") are evaluated and their phi averaged.
    A record whose logits are not finite gets NaN (the scorer isolates such records).
    Raises StrategyError when the model's outputs are not logits ``[batch, classes>=2]``.
    """
    device = _model_device(model)
    x_t = _owned_tensor(x, device, torch.float32)
    y_t = _owned_tensor(y, device, torch.int64)
    if x_t.shape[0] != y_t.shape[0]:
        raise RecordsError(f"x has {x_t.shape[0]} records but y has {y_t.shape[0]} labels")
    model.eval()
    out = np.empty(x_t.shape[0], dtype=np.float64)
    with torch.inference_mode():
        for start in range(0, x_t.shape[0], batch_size):
            xb, yb = x_t[start : start + batch_size], y_t[start : start + batch_size]
            total = torch.zeros(xb.shape[0], dtype=torch.float64, device=device)
            queries = _tta_queries(xb, tta)
            for q in queries:
                with _strategy_code("model forward pass"):
                    logits = model(q)
                _check_logits(logits, xb.shape[0])
                if yb.numel() and int(yb.max()) >= logits.shape[1]:
                    raise RecordsError(
                        f"labels must be in [0, {logits.shape[1]}), got {int(yb.max())}"
                    )
                # Non-finite logits give NaN phi for those records (every record, for a model
                # whose fine-tuning diverged) instead of failing the job: the scorer traces them
                # to the records that caused them and scores the round without those.
                bad = ~torch.isfinite(logits).all(dim=1)
                phi_b = _phi_from_logits(torch.nan_to_num(logits), yb)
                total += torch.where(bad, torch.nan, phi_b)
            out[start : start + xb.shape[0]] = (total / len(queries)).cpu().numpy()
    return out


def _check_logits(logits: object, batch: int) -> None:
    if not isinstance(logits, torch.Tensor) or logits.ndim != 2 or logits.shape[0] != batch:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise StrategyError(f"model must return logits [batch, classes], got {shape}")
    if logits.shape[1] < 2:
        raise StrategyError(f"model must return at least 2 class logits, got {logits.shape[1]}")


# --------------------------------------------------------------------------- training


def _is_out_of_memory(e: BaseException) -> bool:
    if isinstance(e, MemoryError):
        return True
    if isinstance(e, getattr(torch, "OutOfMemoryError", ())):
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and (
        "can't allocate memory" in text or "out of memory" in text or "bad_alloc" in text
    )


@contextmanager
def _strategy_code(what: str) -> Iterator[None]:
    """Turn failures of strategy code into StrategyError (allocation failures into MemoryError)."""
    try:
        yield
    except EngineError:
        raise
    except BaseException as e:
        if isinstance(e, KeyboardInterrupt):
            raise
        if _is_out_of_memory(e):
            raise MemoryError(f"{what}: {e}" if str(e) else what) from e
        raise StrategyError(f"strategy {what} raised {describe_exception(e)}") from e


def trainable_names(model: nn.Module, recipe: Recipe) -> list[str]:
    """Names of the parameters ``recipe.train`` selects (all of them for "all").

    Raises StrategyError for a prefix that matches no parameter.
    """
    named = [name for name, _ in model.named_parameters()]
    if recipe.train == "all":
        return named
    for prefix in recipe.train:
        if not any(name.startswith(prefix) for name in named):
            raise StrategyError(
                f"RECIPE['train'] prefix {prefix!r} matches no parameter; parameters: "
                f"{_short(named)}"
            )
    return [name for name in named if any(name.startswith(p) for p in recipe.train)]


def _select_trainable(model: nn.Module, names: Collection[str]) -> list[nn.Parameter]:
    """Parameters named in ``names`` train, the others are frozen -> the trainable ones."""
    wanted = set(names)
    trainable = []
    for name, p in model.named_parameters():
        p.requires_grad_(name in wanted)
        if name in wanted:
            trainable.append(p)
    return trainable


def _set_train_mode(model: nn.Module) -> None:
    """Train mode, except frozen BatchNorm layers keep their running statistics."""
    model.train()
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            params = list(module.parameters(recurse=False))
            if params and not any(p.requires_grad for p in params):
                module.eval()


def _make_optimizer(params: list[torch.Tensor], recipe: Recipe) -> torch.optim.Optimizer:
    """The recipe's optimizer; the fused kernel where torch has one for the parameters' device
    (one pass over the state instead of ~6: 1.5-2x faster fine-tuning of small CNNs on CPU).
    The choice depends only on the device, so phi stays deterministic."""
    kinds = {p.device.type for p in params}
    fused = kinds <= {"cpu", "cuda"} and all(p.is_floating_point() for p in params)
    kwargs: dict = {"lr": recipe.lr, "weight_decay": recipe.weight_decay}
    if recipe.optimizer == "adam":
        cls = torch.optim.Adam
    elif recipe.optimizer == "adamw":
        cls = torch.optim.AdamW
    else:
        cls = torch.optim.SGD
        kwargs["momentum"] = recipe.momentum
    if fused:
        try:
            return cls(params, fused=True, **kwargs)
        except (RuntimeError, ValueError):  # no fused kernel for this dtype/device in this torch
            pass
    return cls(params, **kwargs)


def _batch_bounds(n: int, batch_size: int) -> list[tuple[int, int]]:
    """Batches of ``batch_size``; a trailing batch of one record joins the previous batch
    (BatchNorm cannot train on a single record)."""
    bounds = [(a, min(a + batch_size, n)) for a in range(0, n, batch_size)]
    if len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] == 1:
        bounds[-2:] = [(bounds[-2][0], n)]
    return bounds


def _augment(xb: torch.Tensor, augment: Sequence[str], rng: np.random.Generator) -> torch.Tensor:
    for aug in augment:
        name, _, arg = aug.partition(":")
        b = xb.shape[0]
        if name == "hflip":
            flip = torch.from_numpy(rng.random(b) < 0.5).to(xb.device)
            xb = torch.where(flip.view(b, *([1] * (xb.ndim - 1))), xb.flip(-1), xb)
        elif name == "random-crop":
            if xb.ndim != 4:
                raise StrategyError(
                    f"random-crop needs image records [N, C, H, W], got {tuple(xb.shape)}"
                )
            _, c, h, w = xb.shape
            pad = int(arg) if arg else max(1, h // 8)
            padded = F.pad(xb, (pad, pad, pad, pad))
            dy = torch.from_numpy(rng.integers(0, 2 * pad + 1, b)).to(xb.device)
            dx = torch.from_numpy(rng.integers(0, 2 * pad + 1, b)).to(xb.device)
            rows = (dy[:, None] + torch.arange(h, device=xb.device))[:, None, :, None]
            cols = (dx[:, None] + torch.arange(w, device=xb.device))[:, None, None, :]
            batch_idx = torch.arange(b, device=xb.device)[:, None, None, None]
            chan_idx = torch.arange(c, device=xb.device)[None, :, None, None]
            xb = padded[batch_idx, chan_idx, rows, cols]
        else:
            raise StrategyError(f"unknown augmentation {aug!r}")
    return xb


def train_with_recipe(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    recipe: Recipe,
    *,
    rng: np.random.Generator,
    on_epoch: Callable[[int, int], None] | None = None,
    trainable: Collection[str] | None = None,
) -> nn.Module:
    """Train ``model`` in place on tensors already on its device; shuffles and augmentation
    draw from ``rng``. ``on_epoch(done, total)`` after each epoch. ``trainable``: names of the
    parameters that train (default: those ``recipe.train`` selects), the others are frozen.
    """
    names = trainable_names(model, recipe) if trainable is None else trainable
    params = _select_trainable(model, names)
    if not params:
        raise StrategyError("the model has no parameters to train")
    optimizer = _make_optimizer(params, recipe)
    _set_train_mode(model)
    n = x.shape[0]
    bounds = _batch_bounds(n, recipe.batch_size)
    for epoch in range(recipe.epochs):
        if n:
            perm = torch.from_numpy(rng.permutation(n)).to(x.device)
            for a, b in bounds:
                idx = perm[a:b]
                xb = _augment(x.index_select(0, idx), recipe.augment, rng)
                yb = y.index_select(0, idx)
                with _strategy_code("model forward/backward pass"):
                    loss = F.cross_entropy(model(xb), yb)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                optimizer.step()
        if on_epoch is not None:
            on_epoch(epoch + 1, recipe.epochs)
    model.eval()
    return model


def prefer_channels_last(model: nn.Module, x: torch.Tensor) -> bool:
    """Whether to run ``model`` in channels-last memory format on records like ``x``.

    On CPU, for image records [N, C, H, W], when a train-mode forward/backward pass works in that
    format and gives the same logits: oneDNN's channels-last pooling and convolution kernels made
    the demo CNN's fine-tuning ~1.5x faster (bench/finetune.py). Not on CUDA (no gain in float32).
    A strategy whose forward cannot take a channels-last tensor (``.view`` on it) stays in the
    default format. Depends only on the model, the record shape and the device: deterministic.
    """
    if x.ndim != 4 or x.device.type != "cpu" or x.shape[0] == 0:
        return False
    probe = copy.deepcopy(model).to(memory_format=torch.channels_last)
    xb = x[:2]
    try:
        probe.eval()
        model.eval()
        with torch.no_grad():
            same = torch.allclose(probe(xb), model(xb), rtol=1e-3, atol=1e-4)
        probe.train()
        probe(xb).float().sum().backward()
    except Exception:  # noqa: BLE001 - any failure: stay in the default format
        return False
    return bool(same)


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
            logits = probe(_owned_tensor(x[:1], _model_device(probe), torch.float32))
    except (Exception, SystemExit) as e:
        if _is_out_of_memory(e):
            raise MemoryError(str(e)) from e
        raise RecordsError(
            f"{what} of shape {shape} do not fit the model: forward pass failed with "
            f"{describe_exception(e)}"
        ) from e
    _check_logits(logits, 1)
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


@dataclass(frozen=True)
class ModelData:
    """What model ``index`` trains on: rows of the train records and of the builder records."""

    index: int
    seed: int
    train_rows: np.ndarray
    builder_rows: np.ndarray


def model_data(models: Sequence[ModelSpec], masks: Sequence[np.ndarray], builder_len: int,
               builder_mix: int) -> list[ModelData]:
    """Each model's rows: ``train[mask_i]``, then ``builder_mix`` builder rows drawn without
    replacement by a stream of the model's seed of its own, so the sample never shifts the
    training shuffles (which draw from ``np.random.default_rng([seed, 1])``)."""
    out = []
    for (index, seed, _), mask in zip(models, masks, strict=True):
        seed = int(seed)
        rows = np.empty(0, dtype=np.int64)
        if builder_mix > 0:
            rows = np.random.default_rng([seed, 0]).choice(
                builder_len, size=builder_mix, replace=False
            )
        out.append(ModelData(int(index), seed, np.flatnonzero(mask), rows))
    return out


# ``engine=CHECK_ONLY``: build the model, load the weights, check the records against it; no training.
CHECK_ONLY = "check"


def finetune_and_score(
    *,
    strategy_source: str,
    base_weights: bytes,
    train_x: np.ndarray,
    train_y: np.ndarray,
    eval_x: np.ndarray,
    eval_y: np.ndarray,
    models: Sequence[ModelSpec],
    builder_x: np.ndarray | None = None,
    builder_y: np.ndarray | None = None,
    builder_mix: int | None = 0,
    device: str | None = None,
    progress: Progress | None = None,
    engine: str | None = None,
    info: dict | None = None,
) -> np.ndarray:
    """Fine-tune one model per ``(index, seed, mask)`` and evaluate phi on the eval records.

    Model i starts from the base weights and trains (RECIPE or ``finetune()``) on
    ``train[mask_i]`` followed by ``builder_mix`` builder records drawn without replacement with
    the model's seed (``builder_mix=None`` uses the recipe's ``builder_mix``).

    ``engine``: "auto" (default, or $FTPS_ENGINE) or one of ``ftps.ml.engines.ENGINES``; see
    ``ftps.ml.engines.plan_engine`` for the rule; ``CHECK_ONLY`` checks the job without training
    (``info`` then gets ``classes`` and ``parameters``; PHI is zeros). ``info``, when given, receives ``engine`` (the
    engine that ran), ``engine_reason``, ``channels_last`` and ``features_s`` / ``train_s`` /
    ``phi_s`` (seconds).

    Shapes: train_x float32 [N, *S], train_y int64 [N], masks bool [N], eval_x float32 [m, *S],
    eval_y int64 [m], builder_x float32 [B, *S]. Returns PHI float64 [len(models), m], rows in
    the order of ``models``. ``progress(done, total)`` is called as models finish.

    Raises StrategyError, WeightsError, RecordsError (all EngineError), or MemoryError.
    """
    from ftps.ml import engines  # builds on this module

    strategy = load_strategy(strategy_source)
    validate_records(train_x, train_y, what="train records")
    validate_records(eval_x, eval_y, what="eval records")
    if train_x.shape[1:] != eval_x.shape[1:]:
        raise RecordsError(
            f"train records have shape {train_x.shape[1:]} but eval records {eval_x.shape[1:]}"
        )
    if builder_mix is None:
        builder_mix = strategy.recipe.builder_mix if strategy.recipe is not None else 0
    if builder_mix < 0:
        raise RecordsError(f"builder_mix must be >= 0, got {builder_mix}")
    if builder_mix > 0:
        if builder_x is None or builder_y is None:
            raise RecordsError(f"builder_mix={builder_mix} but no builder data was given")
        validate_records(builder_x, builder_y, what="builder records")
        if builder_x.shape[1:] != train_x.shape[1:]:
            raise RecordsError(
                f"builder records have shape {builder_x.shape[1:]} but train records "
                f"{train_x.shape[1:]}"
            )
        if builder_mix > len(builder_x):
            raise RecordsError(
                f"builder_mix={builder_mix} exceeds the {len(builder_x)} builder records"
            )
    masks = []
    for index, seed, mask in models:
        mask = np.asarray(mask)
        if mask.dtype != np.bool_ or mask.shape != (len(train_x),):
            raise RecordsError(
                f"inclusion mask of model {index} must be bool [{len(train_x)}], got "
                f"{mask.dtype} {mask.shape}"
            )
        if not isinstance(seed, (int, np.integer)) or not 0 <= int(seed) < 2**64:
            raise RecordsError(
                f"seed of model {index} must be an integer in [0, 2**64), got {seed!r}"
            )
        masks.append(mask)

    configure_threads()
    dev = resolve_device(device)
    _pin_determinism(dev)
    check_only = engine == CHECK_ONLY
    plan = None if check_only else engines.plan_engine(strategy, dev, engine)

    with _strategy_code("build_model()"):
        base = strategy.build_model()
    if not isinstance(base, nn.Module):
        raise StrategyError(
            f"build_model() must return a torch.nn.Module, got {type(base).__name__}"
        )
    load_weights(base, base_weights)
    base.to(dev)

    classes = _check_records(strategy, base, eval_x, "eval records")
    classes = max(classes, _check_records(strategy, base, train_x, "train records"))
    _check_labels(train_y, classes, "train records")
    _check_labels(eval_y, classes, "eval records")
    if builder_mix > 0:
        _check_labels(builder_y, classes, "builder records")
    if check_only:
        # The registry's upload check: the weights load into build_model() and the model answers
        # records of the task's shape with one logit per class. Nothing is trained.
        if info is not None:
            info.update(engine=CHECK_ONLY, classes=classes,
                        parameters=sum(int(p.numel()) for p in base.parameters()))
        return np.zeros((len(models), len(eval_x)), dtype=np.float64)

    data = model_data(models, masks, len(builder_x) if builder_mix > 0 else 0, builder_mix)
    job = engines.Job(
        strategy=strategy,
        base=base,
        device=dev,
        train_x=_owned_tensor(train_x, dev, torch.float32),
        train_y=_owned_tensor(train_y, dev, torch.int64),
        eval_x=_owned_tensor(eval_x, dev, torch.float32),
        eval_y=_owned_tensor(eval_y, dev, torch.int64),
        eval_is_train=eval_x.shape == train_x.shape and np.array_equal(eval_x, train_x)
        and np.array_equal(eval_y, train_y),
        builder_x=_owned_tensor(builder_x, dev, torch.float32) if builder_mix > 0 else None,
        builder_y=_owned_tensor(builder_y, dev, torch.int64) if builder_mix > 0 else None,
        models=data,
        progress=progress,
    )
    return engines.run(job, plan, info=info)
