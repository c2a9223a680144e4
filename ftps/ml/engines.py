"""How the models of a job are fine-tuned: the engines, and the rule that picks one.

| engine | what it does |
|---|---|
| ``sequential`` | one model after another, each a full forward/backward pass per step |
| ``stacked`` | the models of a job that train on equally many records train together: their |
|   | trainable parameters stacked ``[k, ...]``, one ``torch.func.vmap(functional_call)`` |
|   | step for all k, one optimizer over the stacked tensors (elementwise, so per model) |
| ``cached`` | ``RECIPE['cache_features']``: the frozen trunk runs once per job over every record |
|   | (train, builder sample, eval and its test-time queries); each head trains on the |
|   | cached features, one after another |
| ``cached-stacked`` | the same with the heads stacked |

The rule (``plan_engine`` with ``engine="auto"``), from ``python -m bench.finetune`` on 2 CPU
cores (README, "Fine-tuning speed"):

- a free-form ``finetune()`` runs ``sequential`` (the engine cannot see inside it);
- a DP-SGD recipe (``RECIPE['dp']``) runs ``sequential`` (or ``cached``), whatever was
  requested: DP-SGD clips each record's gradient (opacus' per-record gradients), and the
  stacked step's vmap only yields each model's gradient summed over its batch. A head trained
  on cached trunk features is DP-SGD on the head alone (the frozen trunk sees no gradient);
- ``cache_features`` recipes always cache: the trunk's work is done once per job instead of
  once per step of every model, the head sees exactly the features it would see otherwise;
- on CPU the models train one after another: stacking was slower for the demo CNN (vmap turns
  each convolution into a grouped one) and for the cached head (the stacked optimizer state of k
  models leaves the cache; one model's fits), so CPU runs ``sequential`` / ``cached``;
- on CUDA they train stacked (``stacked`` / ``cached-stacked``): one kernel launch serves k models,
  which is what makes a GPU busy with models this small. Not measured here (no GPU); run
  ``python -m bench.finetune --device cuda`` to check, and pin the other engine with
  ``$FTPS_ENGINE`` (worker setting ``engine``) if it loses.

The precision of the training steps (``ftps.ml.training.PRECISIONS``) follows a rule too
(``precision="auto"``, or $FTPS_PRECISION): bf16 autocast on CUDA devices that have bfloat16
tensor cores (Ampere and later: the paper's ResNet-18 fine-tuning is convolution-bound, and a
bf16 convolution runs at several times float32's rate), float32 elsewhere and for DP-SGD (opacus'
per-record gradients and clipping stay float32). phi is computed in float32 either way.
``python bench/gpu.py`` measures both precisions on both engines side by side, with the scores'
agreement, on the GPU at hand.

The rule never looks at a timing: engines round differently, and the same job must give the
same phi on every worker of a device type (a retried job, a re-run round). A model that vmap
cannot run (data-dependent control flow, ``.item()``) falls back to ``sequential`` under "auto".
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import os
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap

from ftps.ml.jobs import JobResult
from ftps.ml.strategy import EngineError, Recipe, Strategy, StrategyError, describe_exception
from ftps.ml.training import (
    PRECISIONS,
    ModelData,
    apply_augment,
    augment_draws,
    autocast,
    batch_bounds,
    compute_phi,
    dp_budget,
    make_optimizer,
    prefer_channels_last,
    select_trainable,
    set_train_mode,
    short_list,
    strategy_code,
    to_device,
    train_with_recipe,
    trainable_names,
    tta_queries,
)

__all__ = ["ENGINES", "EnginePlan", "PRECISION_REQUESTS", "Prepared", "REQUESTS", "plan_engine",
           "run"]

log = logging.getLogger(__name__)

ENGINES = ("sequential", "stacked", "cached", "cached-stacked")
# What a caller may ask for: how the models train; caching follows the recipe.
REQUESTS = ("auto", "sequential", "stacked")
PRECISION_REQUESTS = ("auto", *PRECISIONS)

# Stacked models per vmap call: bounded by memory (parameters, gradients and two optimizer
# states per model) and by this cap (beyond it the step is already one big kernel).
_MAX_STACK = 64
_STACK_BUDGET_CPU = 1 << 30
_STACK_BUDGET_CUDA_FRACTION = 0.5
# Activations a training step keeps per element of the layers' outputs: the output itself, and
# about as much again in what backward saves and the vmap batching rules copy.
_ACTIVATION_FACTOR = 2
_FEATURE_BATCH = 512


@dataclass(frozen=True)
class EnginePlan:
    """The engine a job runs on, and why."""

    name: str
    reason: str
    precision: str = "fp32"

    @property
    def cached(self) -> bool:
        return self.name.startswith("cached")

    @property
    def stacked(self) -> bool:
        return self.name.endswith("stacked")


@dataclass
class Prepared:
    """A job (``ftps.ml.jobs.FinetuneJob``) made ready by ``ftps.ml.engine.run_job``: checked
    against its strategy, the base model built with the weights loaded, and every tensor on
    ``device``."""

    strategy: Strategy
    base: nn.Module
    device: torch.device
    train_x: torch.Tensor
    train_y: torch.Tensor
    eval_x: torch.Tensor
    eval_y: torch.Tensor
    eval_is_train: bool
    builder_x: torch.Tensor | None
    builder_y: torch.Tensor | None
    models: list[ModelData]
    progress: Callable[[int, int], None] | None = None

    def rows(self, md: ModelData) -> tuple[torch.Tensor, torch.Tensor]:
        """Model ``md``'s fine-tuning set (x, y): its train records, then its builder sample."""
        idx = torch.from_numpy(md.train_rows).to(self.device)
        x, y = self.train_x.index_select(0, idx), self.train_y.index_select(0, idx)
        if len(md.builder_rows):
            assert self.builder_x is not None and self.builder_y is not None
            pick = torch.from_numpy(md.builder_rows).to(self.device)
            x = torch.cat([x, self.builder_x.index_select(0, pick)])
            y = torch.cat([y, self.builder_y.index_select(0, pick)])
        return x, y


def plan_precision(strategy: Strategy, device: torch.device, requested: str | None = None) -> str:
    """The precision of the training steps (see the module docstring for the rule).

    ``requested``: "auto" (default: $FTPS_PRECISION, else "auto"), "fp32" or "bf16". bf16 on a
    device without bfloat16 support, or with DP-SGD, raises EngineError / trains in float32.
    """
    if not requested:
        requested = os.environ.get("FTPS_PRECISION", "").strip() or "auto"
    if requested not in PRECISION_REQUESTS:
        raise EngineError(f"precision must be one of {list(PRECISION_REQUESTS)}, got {requested!r}")
    recipe = strategy.recipe
    if recipe is None or recipe.dp is not None:
        return "fp32"  # finetune() trains as it likes; DP-SGD's clipping stays float32
    bf16_here = device.type == "cpu" or (device.type == "cuda" and torch.cuda.is_bf16_supported())
    if requested == "bf16" and not bf16_here:
        raise EngineError(f"precision bf16 requested but {device} has no bfloat16 support")
    if requested == "auto":
        # CPUs run bf16 autocast through slow paths on most server parts: float32 there.
        return "bf16" if device.type == "cuda" and bf16_here else "fp32"
    return requested


def plan_engine(strategy: Strategy, device: torch.device, requested: str | None = None,
                precision: str | None = None) -> EnginePlan:
    """The engine for ``strategy`` on ``device`` (see the module docstring for the rule).

    ``requested``: "auto" (default: $FTPS_ENGINE, else "auto"), "sequential" or "stacked" (how
    the models train; a ``cache_features`` recipe caches either way). ``precision``: see
    ``plan_precision``. Raises EngineError for an unknown request, StrategyError for "stacked"
    with a free-form ``finetune()``.
    """
    plan = _plan_engine(strategy, device, requested)
    return dataclasses.replace(plan, precision=plan_precision(strategy, device, precision))


def _plan_engine(strategy: Strategy, device: torch.device, requested: str | None) -> EnginePlan:
    if not requested:
        requested = os.environ.get("FTPS_ENGINE", "").strip() or "auto"
    if requested not in REQUESTS:
        raise EngineError(f"engine must be one of {list(REQUESTS)}, got {requested!r}")
    recipe = strategy.recipe
    if recipe is None:
        if requested == "stacked":
            raise StrategyError("the stacked engine needs a RECIPE; finetune() runs model by model")
        return EnginePlan("sequential", "free-form finetune() runs model by model")
    if recipe.dp is not None:
        return EnginePlan(
            "cached" if recipe.cache_features else "sequential",
            "DP-SGD clips each record's gradient; the stacked engine's vmap step only has each "
            "model's gradient summed over its batch")
    if requested == "auto":
        stacked = device.type == "cuda"
        why = f"rule for {device.type}"
    else:
        stacked = requested == "stacked"
        why = "requested"
    if recipe.cache_features:
        return EnginePlan("cached-stacked" if stacked else "cached", why)
    return EnginePlan("stacked" if stacked else "sequential", why)


def run(job: Prepared, plan: EnginePlan) -> JobResult:
    """Fine-tune the job's models on ``plan``'s engine -> PHI float64 [len(job.models), m], the
    engine that ran (``plan``'s, or sequential where vmap cannot run the model) and timings."""
    timings = {"features_s": 0.0, "train_s": 0.0, "phi_s": 0.0}
    recipe = job.strategy.recipe
    channels_last = recipe is not None and prefer_channels_last(job.base, job.train_x, plan.precision)
    if channels_last:
        job.base.to(memory_format=torch.channels_last)
    if plan.stacked:
        problem, computes_bf16 = _stacking_probe(job, plan)
        if problem is not None:
            if plan.reason == "requested":
                raise StrategyError(f"the stacked engine cannot run this model: {problem}")
            log.info("engine %s -> sequential: %s", plan.name, problem)
            name = "cached" if plan.cached else "sequential"
            plan = EnginePlan(name, f"vmap cannot run the model ({problem})", plan.precision)
        elif plan.precision == "bf16" and not computes_bf16:
            # The models then train in float32, and say so.
            plan = dataclasses.replace(plan, precision="fp32", reason=f"{plan.reason}; bf16 autocast "
                                       f"does not reach inside vmap on {job.device.type}")
    if plan.cached:
        phi = _run_cached(job, plan, timings)
    else:
        phi = _run_full(job, plan, timings)
    return JobResult(phi, engine=plan.name, engine_reason=plan.reason, channels_last=channels_last,
                     precision=plan.precision, **timings, **_dp_spent(job))


def _dp_spent(job: Prepared) -> dict[str, float]:
    """The JobResult's DP-SGD fields: the accountant's epsilon of the job's model that spent
    most (models train on sets of different sizes, so at different sample rates), its noise
    multiplier, and the delta. Empty without ``RECIPE['dp']``."""
    recipe = job.strategy.recipe
    if recipe is None or recipe.dp is None:
        return {}
    budgets = [dp_budget(recipe.dp, len(md.train_rows) + len(md.builder_rows),
                         batch_size=recipe.batch_size, epochs=recipe.epochs)
               for md in job.models]
    worst = max(budgets, key=lambda b: b.epsilon, default=None)
    if worst is None:
        return {"dp_delta": recipe.dp.delta}
    return {"dp_epsilon": worst.epsilon, "dp_noise_multiplier": worst.noise_multiplier,
            "dp_delta": worst.delta}


# --------------------------------------------------------------------------- full models


def _run_full(job: Prepared, plan: EnginePlan, timings: dict) -> np.ndarray:
    strategy, recipe = job.strategy, job.strategy.recipe
    phi = np.empty((len(job.models), len(job.eval_x)), dtype=np.float64)
    done = 0

    def finish(row: int, model: nn.Module) -> None:
        nonlocal done
        t = time.perf_counter()
        phi[row] = compute_phi(model, job.eval_x, job.eval_y, tta=strategy.tta)
        timings["phi_s"] += time.perf_counter() - t
        done += 1
        if job.progress is not None:
            job.progress(done, len(job.models))

    if plan.stacked:
        assert recipe is not None
        names = trainable_names(job.base, recipe)
        data = [(*job.rows(md), md.seed) for md in job.models]
        t = time.perf_counter()
        for row, model in _train_stacked(job.base, data, recipe, names, plan.precision):
            timings["train_s"] += time.perf_counter() - t
            finish(row, model)
            t = time.perf_counter()
        return phi

    for row, md in enumerate(job.models):
        x, y = job.rows(md)
        t = time.perf_counter()
        torch.manual_seed(md.seed)
        model = copy.deepcopy(job.base)
        if recipe is not None:
            train_with_recipe(model, x, y, recipe, rng=np.random.default_rng([md.seed, 1]),
                              precision=plan.precision)
        else:
            random.seed(md.seed)
            np.random.seed(md.seed % 2**32)
            with strategy_code("finetune()"):
                tuned = strategy.finetune(model, x, y, seed=md.seed, device=str(job.device))
            if not isinstance(tuned, nn.Module):
                raise StrategyError(
                    f"finetune() must return the fine-tuned torch.nn.Module, got "
                    f"{type(tuned).__name__}"
                )
            model = tuned
        timings["train_s"] += time.perf_counter() - t
        finish(row, model)
        del model
    return phi


# --------------------------------------------------------------------------- stacked


def _activation_bytes(model: nn.Module, x1: torch.Tensor) -> int:
    """Bytes of the outputs of every leaf module for one record ``x1`` [1, ...] (eval mode, no
    autograd): what a training step's activations grow by per record, up to _ACTIVATION_FACTOR."""
    total = 0

    def count(_module, _inputs, output) -> None:
        nonlocal total
        if isinstance(output, torch.Tensor):
            total += output.numel() * output.element_size()

    leaves = [m for m in model.modules() if not list(m.children())]
    hooks = [m.register_forward_hook(count) for m in leaves]
    # Each module's own mode back afterwards: set_train_mode leaves frozen BatchNorm layers in eval.
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        with torch.no_grad():
            model(x1)
    finally:
        for h in hooks:
            h.remove()
        for m, training in modes:
            m.training = training
    return total


def _max_stack(model: nn.Module, names: Sequence[str], x1: torch.Tensor | None = None,
               batch_size: int = 0) -> int:
    """Models per stacked chunk: their parameters, gradients and optimizer states (and on CUDA
    their activations for a batch of ``batch_size`` records like ``x1``) within the budget."""
    wanted = set(names)
    per_model = sum(
        p.numel() * p.element_size() * (4 if n in wanted else 0)
        for n, p in model.named_parameters()
    ) + sum(b.numel() * b.element_size() for b in model.buffers())
    device = next(iter(model.parameters()), torch.empty(0)).device
    if device.type == "cuda":
        # 64 ResNet-18s on 64 CIFAR images each keep tens of GB of activations: a GPU with less
        # memory than an H100 gets smaller chunks instead of running out of memory.
        if x1 is not None and batch_size:
            per_model += _ACTIVATION_FACTOR * batch_size * _activation_bytes(model, x1)
        free, _ = torch.cuda.mem_get_info(device)
        budget = int(free * _STACK_BUDGET_CUDA_FRACTION)
    else:  # stacking on CPU is by request only; its chunks are as they were measured
        budget = _STACK_BUDGET_CPU
    return max(1, min(_MAX_STACK, budget // max(per_model, 1)))


def _stack_step(template: nn.Module) -> Callable:
    def loss(params: dict, buffers: dict, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(functional_call(template, (params, buffers), (xb,)), yb)

    # "different": dropout draws independently per model (from torch's seeded generator).
    return vmap(loss, randomness="different")


def _stacked_state(template: nn.Module, names: Sequence[str], k: int
                   ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    params = {
        n: template.get_parameter(n).detach().unsqueeze(0).repeat_interleave(k, 0).requires_grad_()
        for n in names
    }
    buffers = {n: b.unsqueeze(0).repeat_interleave(k, 0) for n, b in template.named_buffers()}
    return params, buffers


def _train_stacked(
    base: nn.Module,
    data: Sequence[tuple[torch.Tensor, torch.Tensor, int]],
    recipe: Recipe,
    names: Sequence[str],
    precision: str = "fp32",
) -> Iterator[tuple[int, nn.Module]]:
    """Train one model per ``(x, y, seed)`` in ``data`` from ``base``, stacked -> yields
    ``(position in data, trained model in eval mode)``, a chunk at a time.

    Models with equally many records share batch boundaries and steps; they are stacked in
    chunks of at most ``_max_stack`` models. Per model the shuffles and augmentation draw from
    ``np.random.default_rng([seed, 1])`` in the same order as ``train_with_recipe``, so a model
    sees the same batches on both engines (phi agrees up to rounding).
    """
    if recipe.dp is not None:  # plan_engine never stacks these; a hand-made plan must not either
        raise EngineError("DP-SGD recipes cannot train stacked (no per-record gradients)")
    template = copy.deepcopy(base)
    if not select_trainable(template, names):
        raise StrategyError("the model has no parameters to train")
    set_train_mode(template)
    step = _stack_step(template)
    first = next((x for x, _, _ in data if len(x)), None)
    chunk_size = _max_stack(template, names, None if first is None else first[:1],
                            recipe.batch_size)
    device = next(iter(template.parameters())).device
    by_size: dict[int, list[int]] = {}
    for pos, (x, _, _) in enumerate(data):
        by_size.setdefault(int(x.shape[0]), []).append(pos)
    for size, positions in by_size.items():
        bounds = batch_bounds(size, recipe.batch_size)
        # Equal chunks: 64 models in chunks of at most 63 are 32 + 32, not 63 + a lone 1.
        even = math.ceil(len(positions) / math.ceil(len(positions) / chunk_size))
        for start in range(0, len(positions), even):
            chunk = positions[start : start + even]
            params, buffers = _stacked_state(template, names, len(chunk))
            optimizer = make_optimizer(list(params.values()), recipe)
            rngs = [np.random.default_rng([data[pos][2], 1]) for pos in chunk]
            torch.manual_seed(data[chunk[0]][2])
            k = len(chunk)
            # The chunk's records as one [k, size, ...] tensor: a batch of all k models is then one
            # gather and one augmentation, not k of each (kernel launches, not FLOPs, bound a
            # step of small models on a GPU). Each model's draws come from its own generator in
            # the order train_with_recipe takes them, so it sees the same batches as there.
            xs = torch.stack([data[pos][0] for pos in chunk]) if size else None
            ys = torch.stack([data[pos][1] for pos in chunk]) if size else None
            which = torch.arange(k, device=device)[:, None]
            for _ in range(recipe.epochs):
                if not size:
                    continue
                perms = to_device(np.stack([rng.permutation(size) for rng in rngs]), device)
                for a, b in bounds:
                    idx = perms[:, a:b]
                    xb, yb = xs[which, idx], ys[which, idx]
                    if recipe.augment:
                        draws = np.concatenate(
                            [augment_draws(recipe.augment, b - a, xs.shape[2:], rng) for rng in rngs],
                            axis=1)  # [rows, k * batch]: model j's draws in columns j*batch...
                        flat = apply_augment(xb.reshape(k * (b - a), *xs.shape[2:]), recipe.augment,
                                             to_device(draws, device))
                        xb = flat.reshape(xb.shape)
                    with strategy_code("model forward/backward pass (stacked)"):
                        with autocast(device, precision):
                            loss = step(params, buffers, xb, yb).sum()
                        optimizer.zero_grad(set_to_none=True)
                        loss.backward()
                    optimizer.step()
            for j, pos in enumerate(chunk):
                model = copy.deepcopy(base)
                with torch.no_grad():
                    for n, t in params.items():
                        model.get_parameter(n).copy_(t[j])
                    for n, t in buffers.items():
                        model.get_buffer(n).copy_(t[j])
                model.eval()
                yield pos, model
            del params, buffers, optimizer


def _stacking_probe(job: Prepared, plan: EnginePlan) -> tuple[str | None, bool]:
    """One stacked forward/backward pass of two copies on two records, on throwaway state ->
    (why vmap cannot train this job's model (or head), or None; whether its forward pass under
    bf16 autocast computes in bfloat16). Autocast is a dispatch key that functorch's batching
    rules may bypass (on CPU a vmapped convolution stays float32); the answer depends on the
    device type and torch, never on a timing. Only asked when the plan trains in bf16."""
    recipe = job.strategy.recipe
    assert recipe is not None
    if len(job.train_x) < 2:
        return None, True
    if plan.cached:
        split = _split(job, recipe)
        module, x = split.head, _features(split.trunk, job.train_x[:2])
        names = split.head_trainable
    else:
        module, x, names = job.base, job.train_x[:2], trainable_names(job.base, recipe)
    template = copy.deepcopy(module)
    if not select_trainable(template, names):
        return None, True  # the engine reports this one itself
    set_train_mode(template)
    params, buffers = _stacked_state(template, names, 2)
    xs = torch.stack([x, x])
    try:
        loss = _stack_step(template)(params, buffers, xs, torch.stack([job.train_y[:2]] * 2)).sum()
        loss.backward()
    except Exception as e:  # noqa: BLE001 - any failure means: do not stack this model
        return describe_exception(e, limit=300), False
    if plan.precision != "bf16":
        return None, False

    def logits(p: dict, b: dict, xb: torch.Tensor) -> torch.Tensor:
        return functional_call(template, (p, b), (xb,))

    try:
        with torch.no_grad(), autocast(job.device, "bf16"):
            out = vmap(logits, randomness="different")(params, buffers, xs)
    except Exception:  # noqa: BLE001 - it ran in float32 above: train in float32
        return None, False
    return None, out.dtype == torch.bfloat16


# --------------------------------------------------------------------------- cached features


@dataclass
class _Split:
    trunk: nn.Module
    head: nn.Module
    head_trainable: list[str]  # head-local names of the parameters that train


def _split(job: Prepared, recipe: Recipe) -> _Split:
    """Call the strategy's ``split_model`` on the base model and check the contract: two modules
    made of the model's own parameters, every trainable parameter in the head, and
    ``head(trunk(x)) == model(x)`` in eval mode on a few records."""
    base = job.base
    with strategy_code("split_model()"):
        out = job.strategy.split_model(base)
    if not (isinstance(out, tuple) and len(out) == 2
            and all(isinstance(m, nn.Module) for m in out)):
        got = type(out).__name__ if not isinstance(out, tuple) else \
            f"({', '.join(type(m).__name__ for m in out)})"
        raise StrategyError(
            f"split_model(model) must return (trunk, head), two torch.nn.Module, got {got}"
        )
    trunk, head = out
    full_name = {id(p): n for n, p in base.named_parameters()}
    trunk_ids = {id(p) for p in trunk.parameters()}
    head_to_full: dict[str, str] = {}
    for part, module in (("trunk", trunk), ("head", head)):
        for local, p in module.named_parameters():
            if id(p) not in full_name:
                raise StrategyError(
                    f"split_model(): {part} parameter {local!r} is not a parameter of the model; "
                    "build trunk and head from the model's own modules"
                )
            if part == "head":
                if id(p) in trunk_ids:
                    raise StrategyError(
                        f"split_model(): parameter {full_name[id(p)]!r} is in both trunk and head"
                    )
                head_to_full[local] = full_name[id(p)]
    wanted = set(trainable_names(base, recipe))
    in_trunk = sorted(n for n in wanted if id(base.get_parameter(n)) in trunk_ids)
    if in_trunk:
        raise StrategyError(
            f"RECIPE['train'] selects trunk parameters {short_list(in_trunk)}; with cache_features "
            "the trunk is frozen and only head parameters may train"
        )
    outside = sorted(wanted - set(head_to_full.values()))
    if outside:
        raise StrategyError(
            f"RECIPE['train'] selects parameters {short_list(outside)} that are in neither trunk "
            "nor head of split_model()"
        )

    x = job.train_x[:4] if len(job.train_x) else job.eval_x[:4]
    base.eval()
    trunk.eval()
    head.eval()
    with torch.no_grad():
        with strategy_code("model forward pass"):
            ref = base(x)
        with strategy_code("split_model() trunk/head forward pass"):
            got = head(trunk(x))
    if not isinstance(got, torch.Tensor) or got.shape != ref.shape:
        shape = tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
        raise StrategyError(
            f"split_model(): head(trunk(x)) returned {shape}, model(x) {tuple(ref.shape)}"
        )
    scale = float(ref.abs().max()) if ref.numel() else 0.0
    if not torch.allclose(got, ref, rtol=1e-4, atol=1e-5 * max(1.0, scale)):
        diff = float((got - ref).abs().max())
        raise StrategyError(
            f"split_model(): head(trunk(x)) must equal model(x) in eval mode; they differ by up "
            f"to {diff:.3g} on {len(x)} records"
        )
    return _Split(trunk, head, [n for n, full in head_to_full.items() if full in wanted])


def _features(trunk: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The trunk's outputs for every record, eval mode, without autograd: ``[N, ...]``.

    ``no_grad``, not ``inference_mode``: the head saves its inputs for the backward pass.
    """
    trunk.eval()
    outs = []
    with torch.no_grad():
        for start in range(0, max(len(x), 1), _FEATURE_BATCH):
            xb = x[start : start + _FEATURE_BATCH]
            with strategy_code("trunk forward pass"):
                f = trunk(xb)
            if not isinstance(f, torch.Tensor) or f.ndim < 1 or f.shape[0] != len(xb):
                shape = tuple(f.shape) if isinstance(f, torch.Tensor) else type(f).__name__
                raise StrategyError(f"split_model()'s trunk must return [batch, ...], got {shape}")
            outs.append(f)
    return torch.cat(outs) if len(outs) > 1 else outs[0]


def _run_cached(job: Prepared, plan: EnginePlan, timings: dict) -> np.ndarray:
    recipe = job.strategy.recipe
    assert recipe is not None
    t = time.perf_counter()
    split = _split(job, recipe)
    train_f = _features(split.trunk, job.train_x)
    # Builder records: only the rows some model of this job samples.
    used = np.unique(np.concatenate([md.builder_rows for md in job.models] or [np.empty(0)]))
    used = used.astype(np.int64)
    builder_f = None
    if len(used):
        assert job.builder_x is not None
        builder_f = _features(split.trunk, job.builder_x.index_select(
            0, torch.from_numpy(used).to(job.device)))
    queries = tta_queries(job.eval_x, job.strategy.tta)
    eval_f = [train_f if q is job.eval_x and job.eval_is_train else _features(split.trunk, q)
              for q in queries]
    timings["features_s"] += time.perf_counter() - t

    data = []
    for md in job.models:
        idx = torch.from_numpy(md.train_rows).to(job.device)
        x, y = train_f.index_select(0, idx), job.train_y.index_select(0, idx)
        if len(md.builder_rows):
            assert builder_f is not None and job.builder_y is not None
            pos = torch.from_numpy(np.searchsorted(used, md.builder_rows)).to(job.device)
            x = torch.cat([x, builder_f.index_select(0, pos)])
            y = torch.cat([y, job.builder_y.index_select(
                0, torch.from_numpy(md.builder_rows).to(job.device))])
        data.append((x, y, md.seed))

    phi = np.empty((len(job.models), len(job.eval_x)), dtype=np.float64)
    done = 0

    def finish(row: int, head: nn.Module) -> None:
        nonlocal done
        t = time.perf_counter()
        total = np.zeros(len(job.eval_x), dtype=np.float64)
        for f in eval_f:  # the same sum and division as compute_phi's test-time queries
            total += compute_phi(head, f, job.eval_y)
        phi[row] = total / len(eval_f)
        timings["phi_s"] += time.perf_counter() - t
        done += 1
        if job.progress is not None:
            job.progress(done, len(job.models))

    t = time.perf_counter()
    if plan.stacked:
        for row, head in _train_stacked(split.head, data, recipe, split.head_trainable,
                                        plan.precision):
            timings["train_s"] += time.perf_counter() - t
            finish(row, head)
            t = time.perf_counter()
        return phi
    for row, (x, y, seed) in enumerate(data):
        t = time.perf_counter()
        torch.manual_seed(seed)
        head = copy.deepcopy(split.head)
        train_with_recipe(head, x, y, recipe, rng=np.random.default_rng([seed, 1]),
                          trainable=split.head_trainable, precision=plan.precision)
        timings["train_s"] += time.perf_counter() - t
        finish(row, head)
    return phi
