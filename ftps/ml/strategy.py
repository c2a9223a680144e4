"""Fine-tuning strategy scripts (DESIGN.md §4): the contract, its validation, the error types.

A strategy is Python source uploaded by the model builder. It defines

- ``build_model() -> torch.nn.Module``: the architecture (weights come from the base model's
  safetensors file), and either
- ``RECIPE = {...}``: a declarative fine-tuning recipe the engine runs itself (and may train
  many models at once, see ``ftps.ml.engines``), or
- ``finetune(model, x, y, *, seed, device) -> torch.nn.Module``: free-form fine-tuning, called
  once per model with the base model already loaded on ``device``; ``x`` float32
  ``[N, *INPUT_SHAPE]`` and ``y`` int64 ``[N]`` are tensors on ``device``.

Optional ``split_model(model) -> (trunk, head)``: two modules sharing ``model``'s parameters with
``model(x) == head(trunk(x))`` in eval mode. With ``RECIPE['cache_features']`` the trunk is frozen
and runs once per job, in eval mode, over every record; only the head trains, on the cached
features (the recipe's ``train`` prefixes, full-model parameter names, must all lie in the head).

Optional module constants: ``PRETRAIN = {...}`` (recipe overrides used to build the base model),
``TTA = [...]`` (test-time augmentation for strategies without a RECIPE), ``INPUT_SHAPE =
(C, H, W)`` and ``NUM_CLASSES`` (checked against records before any training, for precise
error messages).

Recipe keys (``optimizer``, ``lr``, ``epochs``, ``batch_size`` are required in RECIPE):

| key | meaning |
|---|---|
| optimizer | "adam", "adamw" or "sgd" |
| lr | learning rate, > 0 |
| epochs | passes over the fine-tuning set, >= 1 |
| batch_size | records per step, >= 1 |
| weight_decay | L2 / decoupled decay, >= 0 (default 0) |
| momentum | SGD momentum in [0, 1) (default 0; ignored by Adam) |
| train | "all", or parameter-name prefixes that train; the rest is frozen (and frozen |
|       | BatchNorm layers keep their running statistics) |
| augment | "hflip", "random-crop" or "random-crop:P" (pad P pixels, default H // 8) |
| tta | test-time queries averaged into phi: "hflip" (the identity query is always included) |
| builder_mix | builder records mixed into each model when the job does not say (default 0) |
| cache_features | true: the trunk is frozen (eval mode) and runs once per job, the head |
|       | trains on its cached outputs; needs ``split_model``, ``train`` prefixes, no ``augment`` |
|       | (default false) |
| dp | DP-SGD (Opacus): {"max_grad_norm": C > 0, exactly one of "noise_multiplier": sigma >= 0 |
|       | or "target_epsilon": eps > 0, "delta": d in (0, 1) (default 1e-5)}; each record's |
|       | gradient is clipped to norm C and Gaussian noise of std sigma * C is added to each |
|       | step's sum; steps draw records by Poisson sampling at rate batch_size / n (n: the |
|       | model's fine-tuning set); a target epsilon sets sigma for the recipe's epochs (RDP |
|       | accountant at delta). Trainable layers must have no buffers (no trainable BatchNorm). |
|       | Not inherited by PRETRAIN (the base model trains on the builder's own data) |
|       | (default none) |

``load_strategy`` executes the source in the current process: callers that do not trust it run it
in ``services.finetune_worker.sandbox``.
"""

from __future__ import annotations

import itertools
import math
import sys
import threading
import traceback
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ftps.common.errors import InvalidArgument
from ftps.records import RecordsError

__all__ = [
    "AUGMENTATIONS",
    "DEFAULT_DP_DELTA",
    "DPRecipe",
    "EngineError",
    "JOB_ERRORS",
    "OPTIMIZERS",
    "Recipe",
    "Strategy",
    "StrategyError",
    "TTA_QUERIES",
    "WeightsError",
    "check_source",
    "describe_exception",
    "load_strategy",
    "parse_recipe",
]


class EngineError(Exception):
    """Base class of every failure a fine-tuning job reports back as a task error."""


class StrategyError(EngineError):
    """The strategy script is invalid or failed while running."""


class WeightsError(EngineError):
    """The base model weights are unreadable or do not match ``build_model()``."""


# What a job reports back as its error (the worker answers FAILED_PRECONDITION with it): the
# engine's errors and records that do not fit (RecordsError lives with the records, ftps.records).
JOB_ERRORS: tuple[type[Exception], ...] = (EngineError, RecordsError)


OPTIMIZERS = ("adam", "adamw", "sgd")
AUGMENTATIONS = ("hflip", "random-crop")
TTA_QUERIES = ("hflip",)
DEFAULT_DP_DELTA = 1e-5
_DP_KEYS = ("max_grad_norm", "noise_multiplier", "target_epsilon", "delta")

_REQUIRED = ("optimizer", "lr", "epochs", "batch_size")
_DEFAULTS: dict[str, Any] = {
    "optimizer": "adam",
    "lr": 1e-3,
    "epochs": 1,
    "batch_size": 64,
    "weight_decay": 0.0,
    "momentum": 0.0,
    "train": "all",
    "augment": (),
    "tta": (),
    "builder_mix": 0,
    "cache_features": False,
    "dp": None,
}


@dataclass(frozen=True)
class DPRecipe:
    """DP-SGD settings of a recipe (``RECIPE['dp']``): exactly one of ``noise_multiplier`` and
    ``target_epsilon`` is set."""

    max_grad_norm: float
    noise_multiplier: float | None = None
    target_epsilon: float | None = None
    delta: float = DEFAULT_DP_DELTA


@dataclass(frozen=True)
class Recipe:
    """A validated declarative recipe (see the module docstring for the keys)."""

    optimizer: str
    lr: float
    epochs: int
    batch_size: int
    weight_decay: float = 0.0
    momentum: float = 0.0
    train: str | tuple[str, ...] = "all"
    augment: tuple[str, ...] = ()
    tta: tuple[str, ...] = ()
    builder_mix: int = 0
    cache_features: bool = False
    dp: DPRecipe | None = None


@dataclass(frozen=True)
class Strategy:
    """A loaded, validated strategy script."""

    source: str
    module: types.ModuleType = field(repr=False)
    build_model: Callable[[], Any] = field(repr=False)
    recipe: Recipe | None
    finetune: Callable[..., Any] | None = field(repr=False)
    pretrain_recipe: Recipe | None
    tta: tuple[str, ...]
    input_shape: tuple[int, ...] | None
    num_classes: int | None
    split_model: Callable[[Any], Any] | None = field(default=None, repr=False)


def _fail(field_name: str, message: str, where: str) -> StrategyError:
    return StrategyError(f"{where}[{field_name!r}] {message}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _string_list(value: Any, field_name: str, where: str) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        raise _fail(field_name, f"must be a list of strings, got {value!r}", where)
    if not all(isinstance(v, str) for v in value):
        raise _fail(field_name, f"must be a list of strings, got {value!r}", where)
    return tuple(value)


def parse_recipe(
    raw: Any, *, where: str = "RECIPE", base: Mapping[str, Any] | None = None
) -> Recipe:
    """Validate a recipe dict (on top of ``base`` when given) -> Recipe, or raise StrategyError.

    Every message names the offending field, e.g. ``RECIPE['lr'] must be a number > 0, got -1``.
    """
    if not isinstance(raw, Mapping):
        raise StrategyError(f"{where} must be a dict, got {type(raw).__name__}")
    unknown = sorted(str(k) for k in raw if k not in _DEFAULTS)
    if unknown:
        raise StrategyError(
            f"{where} has unknown key(s) {unknown}; known keys: {sorted(_DEFAULTS)}"
        )
    if base is None:
        missing = [k for k in _REQUIRED if k not in raw]
        if missing:
            raise StrategyError(f"{where} is missing required key(s) {missing}")
        merged = {**_DEFAULTS, **raw}
    else:
        merged = {**_DEFAULTS, **base, **raw}

    optimizer = merged["optimizer"]
    if not isinstance(optimizer, str) or optimizer.lower() not in OPTIMIZERS:
        raise _fail("optimizer", f"must be one of {list(OPTIMIZERS)}, got {optimizer!r}", where)
    lr = merged["lr"]
    if not _is_number(lr) or not math.isfinite(lr) or lr <= 0:
        raise _fail("lr", f"must be a number > 0, got {lr!r}", where)
    epochs = merged["epochs"]
    if not _is_int(epochs) or epochs < 1:
        raise _fail("epochs", f"must be an integer >= 1, got {epochs!r}", where)
    batch_size = merged["batch_size"]
    if not _is_int(batch_size) or batch_size < 1:
        raise _fail("batch_size", f"must be an integer >= 1, got {batch_size!r}", where)
    weight_decay = merged["weight_decay"]
    if not _is_number(weight_decay) or not math.isfinite(weight_decay) or weight_decay < 0:
        raise _fail("weight_decay", f"must be a number >= 0, got {weight_decay!r}", where)
    momentum = merged["momentum"]
    if not _is_number(momentum) or not 0 <= momentum < 1:
        raise _fail("momentum", f"must be a number in [0, 1), got {momentum!r}", where)

    train = merged["train"]
    if train != "all":
        train = _string_list(train, "train", where)
        if not train:
            raise _fail("train", "must be 'all' or a non-empty list of parameter prefixes", where)

    augment = _string_list(merged["augment"], "augment", where)
    for aug in augment:
        name, _, arg = aug.partition(":")
        if name not in AUGMENTATIONS or (arg and (name != "random-crop" or not arg.isdigit())):
            raise _fail(
                "augment",
                f"has unknown augmentation {aug!r}; known: {list(AUGMENTATIONS)} "
                "('random-crop:P' pads P pixels)",
                where,
            )
    tta = _check_tta(_string_list(merged["tta"], "tta", where), where)

    builder_mix = merged["builder_mix"]
    if not _is_int(builder_mix) or builder_mix < 0:
        raise _fail("builder_mix", f"must be an integer >= 0, got {builder_mix!r}", where)

    cache_features = merged["cache_features"]
    if not isinstance(cache_features, bool):
        raise _fail("cache_features", f"must be true or false, got {cache_features!r}", where)
    if cache_features:
        if train == "all":
            raise _fail(
                "cache_features",
                "freezes the trunk: name the head's parameters in 'train' (prefixes), not 'all'",
                where,
            )
        if augment:
            raise _fail(
                "cache_features",
                f"cannot be combined with augment {list(augment)}: augmented inputs would need "
                "the trunk at every step",
                where,
            )

    dp = merged["dp"]
    if dp is not None:
        dp = _parse_dp(dp, f"{where}['dp']")

    return Recipe(
        optimizer=optimizer.lower(),
        lr=float(lr),
        epochs=epochs,
        batch_size=batch_size,
        weight_decay=float(weight_decay),
        momentum=float(momentum),
        train=train,
        augment=augment,
        tta=tta,
        builder_mix=builder_mix,
        cache_features=cache_features,
        dp=dp,
    )


def _parse_dp(raw: Any, where: str) -> DPRecipe:
    if not isinstance(raw, Mapping):
        raise StrategyError(
            f"{where} must be a dict with 'max_grad_norm' and one of 'noise_multiplier', "
            f"'target_epsilon', got {raw!r}"
        )
    unknown = sorted(str(k) for k in raw if k not in _DP_KEYS)
    if unknown:
        raise StrategyError(f"{where} has unknown key(s) {unknown}; known keys: {list(_DP_KEYS)}")
    if "max_grad_norm" not in raw:
        raise StrategyError(f"{where} is missing required key 'max_grad_norm'")
    clip = raw["max_grad_norm"]
    if not _is_number(clip) or not math.isfinite(clip) or clip <= 0:
        raise _fail("max_grad_norm", f"must be a number > 0, got {clip!r}", where)
    given = [k for k in ("noise_multiplier", "target_epsilon") if k in raw]
    if len(given) != 1:
        raise StrategyError(
            f"{where} needs exactly one of 'noise_multiplier' and 'target_epsilon', got "
            f"{given or 'neither'}"
        )
    sigma = eps = None
    if "noise_multiplier" in raw:
        sigma = raw["noise_multiplier"]
        if not _is_number(sigma) or not math.isfinite(sigma) or sigma < 0:
            raise _fail("noise_multiplier", f"must be a number >= 0, got {sigma!r}", where)
        sigma = float(sigma)
    else:
        eps = raw["target_epsilon"]
        if not _is_number(eps) or not math.isfinite(eps) or eps <= 0:
            raise _fail("target_epsilon", f"must be a number > 0, got {eps!r}", where)
        eps = float(eps)
    delta = raw.get("delta", DEFAULT_DP_DELTA)
    if not _is_number(delta) or not 0 < delta < 1:
        raise _fail("delta", f"must be a number in (0, 1), got {delta!r}", where)
    return DPRecipe(max_grad_norm=float(clip), noise_multiplier=sigma, target_epsilon=eps,
                    delta=float(delta))


def _check_tta(tta: tuple[str, ...], where: str) -> tuple[str, ...]:
    for query in tta:
        if query not in TTA_QUERIES:
            raise _fail("tta", f"has unknown query {query!r}; known: {list(TTA_QUERIES)}", where)
    return tta


_counter = itertools.count()


_COMPILE_LOCK = threading.Lock()


def check_source(data: bytes, *, what: str = "strategy") -> str:
    """A strategy's bytes as Python source, checked for UTF-8 and syntax only, never run (the
    registry and the scorer take strategies from builders; only a worker's sandbox runs them).
    InvalidArgument (STRATEGY_INVALID) says what is wrong and where."""
    try:
        source = bytes(data).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidArgument(f"{what} is not UTF-8 Python source: {exc}", reason="STRATEGY_INVALID") from exc
    try:
        with _COMPILE_LOCK:  # CPython 3.11 can fail concurrent parses ("AST ... recursion depth mismatch")
            compile(source, "strategy.py", "exec")
    except SyntaxError as exc:
        raise InvalidArgument(f"{what} has a syntax error at line {exc.lineno}: {exc.msg}",
                              reason="STRATEGY_INVALID") from exc
    return source


def load_strategy(source: str) -> Strategy:
    """Execute strategy source in a fresh module namespace and validate its contract.

    Raises StrategyError (never anything else) when the source does not compile, raises while
    executing, or breaks the contract. The source runs in this process: sandbox untrusted code.
    """
    if not isinstance(source, str):
        raise StrategyError(f"strategy source must be str, got {type(source).__name__}")
    try:
        code = compile(source, "<strategy>", "exec")
    except SyntaxError as e:
        raise StrategyError(f"strategy does not compile: {e.msg} (line {e.lineno})") from e
    except ValueError as e:  # e.g. null bytes
        raise StrategyError(f"strategy does not compile: {e}") from e

    # Registered while executing so that dataclasses/typing inside the script can find their
    # module; removed afterwards so strategies never leak into each other.
    name = f"ftps_strategy_{next(_counter)}"
    module = types.ModuleType(name)
    module.__file__ = "<strategy>"
    sys.modules[name] = module
    try:
        exec(code, module.__dict__)  # noqa: S102 - running the builder's script is the contract
    except MemoryError:
        raise
    except BaseException as e:  # SystemExit too: a script must not stop the worker
        raise StrategyError(
            f"strategy raised while loading: {describe_exception(e)}"
        ) from e
    finally:
        sys.modules.pop(name, None)

    ns = module.__dict__
    build_model = ns.get("build_model")
    if build_model is None:
        raise StrategyError("strategy defines no build_model()")
    if not callable(build_model):
        raise StrategyError("strategy's build_model is not callable")

    has_recipe = "RECIPE" in ns
    finetune = ns.get("finetune")
    if finetune is not None and not callable(finetune):
        raise StrategyError("strategy's finetune is not callable")
    if not has_recipe and finetune is None:
        raise StrategyError(
            "strategy defines neither RECIPE nor finetune(); define exactly one of them"
        )
    if has_recipe and finetune is not None:
        raise StrategyError(
            "strategy defines both RECIPE and finetune(); define exactly one of them"
        )

    recipe = parse_recipe(ns["RECIPE"], where="RECIPE") if has_recipe else None

    split_model = ns.get("split_model")
    if split_model is not None and not callable(split_model):
        raise StrategyError("strategy's split_model is not callable")
    if recipe is not None and recipe.cache_features and split_model is None:
        raise StrategyError(
            "RECIPE['cache_features'] needs split_model(model) -> (trunk, head) in the strategy"
        )

    pretrain_recipe: Recipe | None
    if "PRETRAIN" in ns:
        base = _recipe_dict(recipe) if recipe is not None else dict(_DEFAULTS)
        pretrain_recipe = parse_recipe(ns["PRETRAIN"], where="PRETRAIN", base=base)
        if pretrain_recipe.cache_features and split_model is None:
            raise StrategyError(
                "PRETRAIN['cache_features'] needs split_model(model) -> (trunk, head)"
            )
    else:
        pretrain_recipe = recipe

    if recipe is not None:
        if "TTA" in ns:
            raise StrategyError("strategy defines TTA and RECIPE; put 'tta' in RECIPE instead")
        tta = recipe.tta
    else:
        tta = _check_tta(_string_list(ns.get("TTA", ()), "TTA", "strategy"), "TTA")

    input_shape = ns.get("INPUT_SHAPE")
    if input_shape is not None:
        if not isinstance(input_shape, (tuple, list)) or not all(
            _is_int(d) and d > 0 for d in input_shape
        ):
            raise StrategyError(
                f"INPUT_SHAPE must be a tuple of positive ints, got {input_shape!r}"
            )
        input_shape = tuple(input_shape)
    num_classes = ns.get("NUM_CLASSES")
    if num_classes is not None and (not _is_int(num_classes) or num_classes < 2):
        raise StrategyError(f"NUM_CLASSES must be an int >= 2, got {num_classes!r}")

    return Strategy(
        source=source,
        module=module,
        build_model=build_model,
        recipe=recipe,
        finetune=finetune,
        pretrain_recipe=pretrain_recipe,
        tta=tta,
        input_shape=input_shape,
        num_classes=num_classes,
        split_model=split_model,
    )


def _recipe_dict(recipe: Recipe) -> dict[str, Any]:
    return {
        "optimizer": recipe.optimizer,
        "lr": recipe.lr,
        "epochs": recipe.epochs,
        "batch_size": recipe.batch_size,
        "weight_decay": recipe.weight_decay,
        "momentum": recipe.momentum,
        "train": recipe.train,
        "augment": recipe.augment,
        "tta": recipe.tta,
        "builder_mix": recipe.builder_mix,
        "cache_features": recipe.cache_features,
        # DP-SGD protects the contributors' records; PRETRAIN trains on the builder's own data,
        # so it runs without unless it asks for it.
        "dp": None,
    }


def describe_exception(e: BaseException, *, limit: int = 2000) -> str:
    """``Type: message`` plus the innermost strategy frame (``<strategy>`` line), kept short."""
    text = f"{type(e).__name__}: {e}"
    frames = [f for f in traceback.extract_tb(e.__traceback__) if f.filename == "<strategy>"]
    if frames:
        text += f" (strategy line {frames[-1].lineno})"
    return text if len(text) <= limit else text[: limit - 3] + "..."

