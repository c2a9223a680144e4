"""Build the base model M0 from a strategy: the builder's side of the demo.

The base model is trained from scratch with the strategy's ``PRETRAIN`` overrides on top of its
``RECIPE`` and returned as safetensors bytes, ready to upload as the task's base weights.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ftps.records.checks import validate
from ftps.ml.engine import configure_threads, pin_determinism, resolve_device, save_weights
from ftps.ml.strategy import StrategyError, load_strategy
from ftps.ml.training import (
    model_device,
    owned_tensor,
    prefer_channels_last,
    strategy_code,
    train_with_recipe,
)

__all__ = ["accuracy", "pretrain_base_model"]


def cache_dir() -> Path:
    """Where pretrained base models are kept between runs ($FTPS_CACHE_DIR, default ~/.cache/ftps)."""
    return Path(os.environ.get("FTPS_CACHE_DIR", Path.home() / ".cache" / "ftps"))


def cached_base_model(name: str, strategy_source: str, x: np.ndarray, y: np.ndarray, *, seed: int,
                      progress: Callable[[int, int], None] | None = None) -> tuple[bytes, bool]:
    """A base model M0 pretrained on ``x, y`` with the strategy once, then read from the cache
    (keyed by content: name, seed, size, strategy source) -> (safetensors bytes, came from the cache).
    ``progress(epochs done, epochs)`` while pretraining. Shared by ``ftps-stack demo``, the web
    client's demo model and the benches, so they pretrain it once between them."""
    digest = hashlib.sha256(f"{name}:{seed}:{len(x)}:".encode() + strategy_source.encode()).hexdigest()
    path = cache_dir() / f"base-{name}-{digest[:16]}.safetensors"
    if path.exists():
        return path.read_bytes(), True
    weights = pretrain_base_model(strategy_source, x, y, seed=seed, progress=progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")  # atomic: a reader never sees half a file
    tmp.write_bytes(weights)
    tmp.replace(path)
    return weights, False


def pretrain_base_model(
    strategy_source: str,
    x: np.ndarray,
    y: np.ndarray,
    *,
    seed: int = 0,
    device: str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> bytes:
    """Train ``build_model()`` from its seeded initialisation on (x float32 [N, ...], y int64 [N])
    with the strategy's pretraining recipe -> safetensors bytes of the base model.

    ``progress(epoch, epochs)`` after each epoch. Raises StrategyError when the strategy has no
    recipe to pretrain with (a free-form strategy needs ``PRETRAIN``).
    """
    strategy = load_strategy(strategy_source)
    if strategy.pretrain_recipe is None:
        raise StrategyError("strategy defines neither RECIPE nor PRETRAIN to pretrain with")
    validate(x, y, what="pretraining records")
    configure_threads()
    dev = resolve_device(device)
    pin_determinism(dev)
    torch.manual_seed(seed)
    with strategy_code("build_model()"):
        model = strategy.build_model()
    if not isinstance(model, nn.Module):
        raise StrategyError(
            f"build_model() must return a torch.nn.Module, got {type(model).__name__}"
        )
    model.to(dev)
    x_t = owned_tensor(x, dev, torch.float32)
    y_t = owned_tensor(y, dev, torch.int64)
    if prefer_channels_last(model, x_t):  # as the fine-tuning engine does (ftps.ml.engines)
        model.to(memory_format=torch.channels_last)
    train_with_recipe(
        model, x_t, y_t, strategy.pretrain_recipe,
        rng=np.random.default_rng([seed, 2]), on_epoch=progress,
    )
    return save_weights(model)  # contiguous tensors, whatever the memory format trained in


def accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray, *, batch_size: int = 1024) -> float:
    """Top-1 accuracy of ``model`` (eval mode) on (x, y), in [0, 1]."""
    device = model_device(model)
    model.eval()
    correct = 0
    with torch.inference_mode():
        for start in range(0, len(x), batch_size):
            xb = owned_tensor(x[start : start + batch_size], device, torch.float32)
            yb = owned_tensor(y[start : start + batch_size], device, torch.int64)
            correct += int((model(xb).argmax(dim=1) == yb).sum())
    return correct / max(len(x), 1)
