"""One model: the statistic phi and the training loop, the pieces every engine builds on.

``ftps.ml.engines`` trains a job's models with these (one after another, stacked, or on cached
trunk features) and ``ftps.ml.engine.run_job`` is the job's front door; this module
imports neither. Strategy code runs in-process here; untrusted strategies go through
``services.finetune_worker.sandbox``.
"""

from __future__ import annotations

import copy
import functools
import math
import warnings
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from torch import nn

from ftps.ml.jobs import ModelSpec
from ftps.records import RecordsError
from ftps.ml.strategy import (
    JOB_ERRORS,
    DPRecipe,
    Recipe,
    StrategyError,
    describe_exception,
)

__all__ = [
    "DPBudget",
    "ModelData",
    "PRECISIONS",
    "apply_augment",
    "augment_batch",
    "augment_draws",
    "autocast",
    "batch_bounds",
    "check_logits",
    "compute_phi",
    "dp_budget",
    "is_out_of_memory",
    "make_optimizer",
    "model_data",
    "model_device",
    "owned_tensor",
    "prefer_channels_last",
    "select_trainable",
    "set_train_mode",
    "short_list",
    "strategy_code",
    "train_with_recipe",
    "to_device",
    "trainable_names",
    "tta_queries",
]

_MAX_LISTED_KEYS = 8  # names listed in an error message before "and N more"

# How training steps compute: "fp32", or "bf16" autocast (matrix products and convolutions in
# bfloat16 on tensor cores, reductions and the optimizer in float32; no loss scaling needed, the
# exponent range is float32's). phi is always computed in float32 (``compute_phi``): the
# difference between a record's IN and OUT models is a small change of its logit, which bfloat16's
# 8-bit mantissa would blur.
PRECISIONS = ("fp32", "bf16")


# --------------------------------------------------------------------------- tensors


def owned_tensor(
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


def model_device(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")



def short_list(items: Sequence[str]) -> str:
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


def tta_queries(x: torch.Tensor, tta: Sequence[str]) -> list[torch.Tensor]:
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
    device = model_device(model)
    x_t = owned_tensor(x, device, torch.float32)
    y_t = owned_tensor(y, device, torch.int64)
    if x_t.shape[0] != y_t.shape[0]:
        raise RecordsError(f"x has {x_t.shape[0]} records but y has {y_t.shape[0]} labels")
    model.eval()
    out = np.empty(x_t.shape[0], dtype=np.float64)
    with torch.inference_mode():
        for start in range(0, x_t.shape[0], batch_size):
            xb, yb = x_t[start : start + batch_size], y_t[start : start + batch_size]
            total = torch.zeros(xb.shape[0], dtype=torch.float64, device=device)
            queries = tta_queries(xb, tta)
            for q in queries:
                with strategy_code("model forward pass"):
                    logits = model(q)
                check_logits(logits, xb.shape[0])
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


def check_logits(logits: object, batch: int) -> None:
    if not isinstance(logits, torch.Tensor) or logits.ndim != 2 or logits.shape[0] != batch:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise StrategyError(f"model must return logits [batch, classes], got {shape}")
    if logits.shape[1] < 2:
        raise StrategyError(f"model must return at least 2 class logits, got {logits.shape[1]}")


# --------------------------------------------------------------------------- training


def autocast(device: torch.device, precision: str):
    """The context a training step's forward pass and loss run in for ``precision``."""
    if precision not in PRECISIONS:
        raise StrategyError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16,
                          enabled=precision == "bf16")


def is_out_of_memory(e: BaseException) -> bool:
    if isinstance(e, MemoryError):
        return True
    if isinstance(e, getattr(torch, "OutOfMemoryError", ())):
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and (
        "can't allocate memory" in text or "out of memory" in text or "bad_alloc" in text
    )


@contextmanager
def strategy_code(what: str) -> Iterator[None]:
    """Turn failures of strategy code into StrategyError (allocation failures into MemoryError)."""
    try:
        yield
    except JOB_ERRORS:
        raise
    except BaseException as e:
        if isinstance(e, KeyboardInterrupt):
            raise
        if is_out_of_memory(e):
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
                f"{short_list(named)}"
            )
    return [name for name in named if any(name.startswith(p) for p in recipe.train)]


def select_trainable(model: nn.Module, names: Collection[str]) -> list[nn.Parameter]:
    """Parameters named in ``names`` train, the others are frozen -> the trainable ones."""
    wanted = set(names)
    trainable = []
    for name, p in model.named_parameters():
        p.requires_grad_(name in wanted)
        if name in wanted:
            trainable.append(p)
    return trainable


def set_train_mode(model: nn.Module) -> None:
    """Train mode, except frozen BatchNorm layers keep their running statistics."""
    model.train()
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            params = list(module.parameters(recurse=False))
            if params and not any(p.requires_grad for p in params):
                module.eval()


def make_optimizer(params: list[torch.Tensor], recipe: Recipe) -> torch.optim.Optimizer:
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


def batch_bounds(n: int, batch_size: int) -> list[tuple[int, int]]:
    """Batches of ``batch_size``; a trailing batch of one record joins the previous batch
    (BatchNorm cannot train on a single record)."""
    bounds = [(a, min(a + batch_size, n)) for a in range(0, n, batch_size)]
    if len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] == 1:
        bounds[-2:] = [(bounds[-2][0], n)]
    return bounds


def to_device(a: np.ndarray, device: torch.device) -> torch.Tensor:
    """A host array on ``device`` without stalling the host: on CUDA through pinned memory and an
    asynchronous copy (a copy from pageable memory waits for every kernel queued before it, so
    each batch's shuffle and augmentation draws would drain the GPU's queue)."""
    t = torch.from_numpy(a)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _crop_pad(aug: str, record_shape: Sequence[int]) -> int:
    _, _, arg = aug.partition(":")
    return int(arg) if arg else max(1, record_shape[-2] // 8)


def augment_draws(augment: Sequence[str], b: int, record_shape: Sequence[int],
                  rng: np.random.Generator) -> np.ndarray:
    """The random numbers ``augment`` takes for a batch of ``b`` records of ``record_shape``,
    drawn from ``rng`` in the order the augmentations are listed -> int64 ``[rows, b]`` (a hflip
    takes one row, 0/1; a random crop two, its row and column offsets)."""
    rows = []
    for aug in augment:
        name = aug.partition(":")[0]
        if name == "hflip":
            rows.append(rng.random(b) < 0.5)
        elif name == "random-crop":
            if len(record_shape) != 3:
                raise StrategyError(
                    f"random-crop needs image records [N, C, H, W], got [N, {', '.join(map(str, record_shape))}]"
                )
            pad = _crop_pad(aug, record_shape)
            rows.append(rng.integers(0, 2 * pad + 1, b))
            rows.append(rng.integers(0, 2 * pad + 1, b))
        else:
            raise StrategyError(f"unknown augmentation {aug!r}")
    return np.stack(rows).astype(np.int64) if rows else np.empty((0, b), dtype=np.int64)


def apply_augment(xb: torch.Tensor, augment: Sequence[str], draws: torch.Tensor) -> torch.Tensor:
    """Augment the records ``xb`` [b, ...] with ``draws`` [rows, b] from ``augment_draws`` (on
    ``xb``'s device). Elementwise selections and gathers only: a batch of several models' batches
    laid end to end gives each model exactly what its own batch alone would."""
    b, row = xb.shape[0], 0
    for aug in augment:
        if aug.partition(":")[0] == "hflip":
            flip = draws[row].bool()
            row += 1
            xb = torch.where(flip.view(b, *([1] * (xb.ndim - 1))), xb.flip(-1), xb)
        else:  # random-crop (augment_draws refused anything else)
            dy, dx = draws[row], draws[row + 1]
            row += 2
            _, c, h, w = xb.shape
            pad = _crop_pad(aug, xb.shape[1:])
            padded = F.pad(xb, (pad, pad, pad, pad))
            rows = (dy[:, None] + torch.arange(h, device=xb.device))[:, None, :, None]
            cols = (dx[:, None] + torch.arange(w, device=xb.device))[:, None, None, :]
            batch_idx = torch.arange(b, device=xb.device)[:, None, None, None]
            chan_idx = torch.arange(c, device=xb.device)[None, :, None, None]
            xb = padded[batch_idx, chan_idx, rows, cols]
    return xb


def augment_batch(xb: torch.Tensor, augment: Sequence[str], rng: np.random.Generator) -> torch.Tensor:
    """``xb`` augmented as ``augment`` lists, its random numbers drawn from ``rng``."""
    if not augment:
        return xb
    draws = augment_draws(augment, xb.shape[0], xb.shape[1:], rng)
    return apply_augment(xb, augment, to_device(draws, xb.device))


def train_with_recipe(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    recipe: Recipe,
    *,
    rng: np.random.Generator,
    on_epoch: Callable[[int, int], None] | None = None,
    trainable: Collection[str] | None = None,
    precision: str = "fp32",
) -> nn.Module:
    """Train ``model`` in place on tensors already on its device; shuffles and augmentation
    draw from ``rng``. ``on_epoch(done, total)`` after each epoch. ``trainable``: names of the
    parameters that train (default: those ``recipe.train`` selects), the others are frozen.
    ``precision``: of the forward passes (``PRECISIONS``); DP-SGD always trains in float32.
    """
    names = trainable_names(model, recipe) if trainable is None else trainable
    params = select_trainable(model, names)
    if not params:
        raise StrategyError("the model has no parameters to train")
    optimizer = make_optimizer(params, recipe)
    set_train_mode(model)
    if recipe.dp is not None:
        _train_dp(model, x, y, recipe, params, optimizer, rng=rng, on_epoch=on_epoch)
        model.eval()
        return model
    n = x.shape[0]
    bounds = batch_bounds(n, recipe.batch_size)
    cast = autocast(x.device, precision)
    for epoch in range(recipe.epochs):
        if n:
            perm = to_device(rng.permutation(n), x.device)
            for a, b in bounds:
                idx = perm[a:b]
                xb = augment_batch(x.index_select(0, idx), recipe.augment, rng)
                yb = y.index_select(0, idx)
                with strategy_code("model forward/backward pass"):
                    with cast:
                        loss = F.cross_entropy(model(xb), yb)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                optimizer.step()
        if on_epoch is not None:
            on_epoch(epoch + 1, recipe.epochs)
    model.eval()
    return model


@dataclass(frozen=True)
class DPBudget:
    """What DP-SGD spends on one model: ``steps`` steps (``steps_per_epoch`` per epoch) that each
    draw every record with probability ``sample_rate``, Gaussian noise of std
    ``noise_multiplier * max_grad_norm`` on each step's clipped gradient sum, and the (epsilon,
    delta) the RDP accountant gives for that (epsilon inf without noise)."""

    noise_multiplier: float
    sample_rate: float
    steps_per_epoch: int
    steps: int
    epsilon: float
    delta: float


@functools.lru_cache(maxsize=256)
def dp_budget(dp: DPRecipe, n: int, *, batch_size: int, epochs: int) -> DPBudget:
    """The DP-SGD budget of a model fine-tuned on ``n`` records: sample rate ``batch_size / n``
    (1 when n <= batch_size), ``ceil(n / batch_size)`` steps per epoch (as many as without DP),
    the noise multiplier given or the one opacus finds for ``dp.target_epsilon`` over exactly
    these steps, and the epsilon the RDP accountant gives at ``dp.delta``. Pure and cached: the
    engine reports what ``train_with_recipe`` spends without training.

    Raises StrategyError when no noise multiplier reaches the target epsilon.
    """
    if n == 0:  # nothing trains, nothing is spent
        return DPBudget(dp.noise_multiplier or 0.0, 0.0, 0, 0, 0.0, dp.delta)
    sample_rate = min(1.0, batch_size / n)
    steps_per_epoch = math.ceil(n / batch_size)
    steps = epochs * steps_per_epoch
    if dp.target_epsilon is not None:
        try:
            from opacus.accountants.utils import get_noise_multiplier

            sigma = float(get_noise_multiplier(
                target_epsilon=dp.target_epsilon, target_delta=dp.delta,
                sample_rate=sample_rate, steps=steps, accountant="rdp"))
        except ValueError as e:  # opacus: "The privacy budget is too low."
            raise StrategyError(
                f"RECIPE['dp']: no noise multiplier reaches target_epsilon={dp.target_epsilon} "
                f"at delta={dp.delta} over {steps} steps at sample rate {sample_rate:.3g} ({e})"
            ) from e
    else:
        assert dp.noise_multiplier is not None
        sigma = dp.noise_multiplier
    if sigma == 0:
        epsilon = math.inf
    else:
        from opacus.accountants import RDPAccountant

        accountant = RDPAccountant()
        accountant.history = [(sigma, sample_rate, steps)]
        epsilon = float(accountant.get_epsilon(delta=dp.delta))
    return DPBudget(sigma, sample_rate, steps_per_epoch, steps, epsilon, dp.delta)


def _train_dp(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    recipe: Recipe,
    params: list[nn.Parameter],
    optimizer: torch.optim.Optimizer,
    *,
    rng: np.random.Generator,
    on_epoch: Callable[[int, int], None] | None,
) -> None:
    """DP-SGD (Abadi et al. 2016) with opacus: per-record gradients (GradSampleModule), each
    clipped to ``max_grad_norm``, summed, noised and divided by the expected batch size
    (DPOptimizer, around the recipe's optimizer). Batches are Poisson samples drawn from ``rng``,
    as the accountant assumes; the noise comes from a generator seeded from ``rng`` too, so the
    model depends only on its seed."""
    # Imported on first use (~3-9 s, so no child pays it for a recipe without DP); in the sandbox
    # the child preloads opacus before its privilege drop when the strategy names "dp".
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    dp = recipe.dp
    assert dp is not None
    n = x.shape[0]
    budget = dp_budget(dp, n, batch_size=recipe.batch_size, epochs=recipe.epochs)
    # A trainable layer with buffers (BatchNorm's running statistics) mixes the records of a
    # batch: its per-record gradients do not exist and its buffers would leak unclipped.
    problems = GradSampleModule.validate(model, strict=False)
    if problems:
        raise StrategyError(
            "RECIPE['dp'] needs per-record gradients, but a trainable layer has buffers "
            f"(BatchNorm): {describe_exception(problems[0], limit=300)}; freeze it ('train' "
            "prefixes) or use GroupNorm/LayerNorm"
        )
    generator = torch.Generator(device=x.device)
    generator.manual_seed(int(rng.integers(2**63)))
    with strategy_code("model setup for DP-SGD"):
        gsm = GradSampleModule(model, batch_first=True, loss_reduction="sum", strict=False)
    dp_optimizer = DPOptimizer(
        optimizer, noise_multiplier=budget.noise_multiplier, max_grad_norm=dp.max_grad_norm,
        expected_batch_size=budget.sample_rate * n, loss_reduction="mean", generator=generator)
    try:
        with warnings.catch_warnings():
            # Raised on every backward pass because records do not require grad; harmless.
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            for epoch in range(recipe.epochs):
                for _ in range(budget.steps_per_epoch):
                    # Poisson sampling: a batch may even be empty; the step still adds noise.
                    pick = np.flatnonzero(rng.random(n) < budget.sample_rate)
                    idx = torch.from_numpy(pick).to(x.device)
                    xb = augment_batch(x.index_select(0, idx), recipe.augment, rng)
                    yb = y.index_select(0, idx)
                    with strategy_code("model forward/backward pass (DP-SGD)"):
                        loss = F.cross_entropy(gsm(xb), yb, reduction="sum")
                        dp_optimizer.zero_grad(set_to_none=True)
                        loss.backward()
                    dp_optimizer.step()
                if on_epoch is not None:
                    on_epoch(epoch + 1, recipe.epochs)
    finally:
        gsm.cleanup()  # hooks off, per-record gradients dropped: the model is plain again
        for p in params:
            p.grad = None
            if hasattr(p, "summed_grad"):
                del p.summed_grad


def prefer_channels_last(model: nn.Module, x: torch.Tensor, precision: str = "fp32") -> bool:
    """Whether to run ``model`` in channels-last memory format on records like ``x``.

    For image records [N, C, H, W], when a train-mode forward/backward pass works in that format
    and gives the same logits: on CPU, oneDNN's channels-last pooling and convolution kernels made
    the demo CNN's fine-tuning ~1.5x faster (bench/finetune.py); on CUDA in bf16, cuDNN's tensor-core
    convolutions read and write NHWC, so the default NCHW layout costs a transpose around each one
    (in float32 CUDA stays NCHW). A strategy whose forward cannot take a channels-last tensor
    (``.view`` on it) stays in the default format. Depends only on the model, the record shape, the
    device type and the precision: deterministic.
    """
    on = x.device.type == "cpu" or (x.device.type == "cuda" and precision == "bf16")
    if x.ndim != 4 or not on or x.shape[0] == 0:
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


# --------------------------------------------------------------------------- each model's data


@dataclass(frozen=True)
class ModelData:
    """What model ``index`` trains on: rows of the train records and of the builder records."""

    index: int
    seed: int
    train_rows: np.ndarray
    builder_rows: np.ndarray


def model_data(models: Sequence[ModelSpec], builder_len: int, builder_mix: int) -> list[ModelData]:
    """Each model's rows: ``train[mask_i]``, then ``builder_mix`` builder rows drawn without
    replacement by a stream of the model's seed of its own, so the sample never shifts the
    training shuffles (which draw from ``np.random.default_rng([seed, 1])``)."""
    out = []
    for m in models:
        seed = int(m.seed)
        rows = np.empty(0, dtype=np.int64)
        if builder_mix > 0:
            rows = np.random.default_rng([seed, 0]).choice(
                builder_len, size=builder_mix, replace=False
            )
        out.append(ModelData(int(m.index), seed, np.flatnonzero(m.mask), rows))
    return out
