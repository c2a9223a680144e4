"""What the web client prepares on the user's side before calling the services, as the command-line
tools and ``ftps-stack demo`` do: the demo data sets' public splits, the shipped strategy scripts
with edited hyperparameters, the demo base model (pretrained once, cached) and a few figures.

Nothing here decides who may see what: every call to the services carries the user's own token.
"""

from __future__ import annotations

import ast
import io
import math
import pprint
import threading
import time
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

STRATEGIES_DIR = Path(__file__).resolve().parents[1] / "strategies"
# The demo data sets, by the record shape a task declares.
DEMO_DATASETS = {(1, 8, 8): "digits", (1, 28, 28): "fashion-mnist"}
# The tabular demo data sets: a task is theirs when it has their schema's columns.
TABULAR_DEMOS = ("breast-cancer",)
DEFAULT_STRATEGY = {"digits": "digits_cnn.py", "fashion-mnist": "fmnist_cnn.py", "breast-cancer": "tabular_mlp.py"}
DATASET_SHAPES = {v: k for k, v in DEMO_DATASETS.items()}
BUILDER_DATA_MAX = 4000  # as ftps-stack demo uploads
SAMPLE_PAGE = 48         # records shown per page of a task's sample set
EDITABLE = ("lr", "epochs", "batch_size")


class AssetError(ValueError):
    """A user-side input problem, shown to the user as is."""


def dataset_for_shape(shape) -> str | None:
    return DEMO_DATASETS.get(tuple(int(d) for d in shape))


def dataset_for_task(settings) -> str | None:
    """The demo data set whose assets (sample set, demo base model and builder split) fit a task:
    by record shape for images, by the schema's columns and label for a tabular task."""
    if not settings.HasField("schema"):
        return dataset_for_shape(settings.record_shape)
    names = ([f.name for f in settings.schema.features], settings.schema.label_column)
    for dataset in TABULAR_DEMOS:
        try:
            schema = demo_schema(dataset)
        except (OSError, ValueError, ImportError):
            continue
        if (schema.names, schema.label_column) == names:
            return dataset
    return None


def is_tabular(dataset: str) -> bool:
    return dataset in TABULAR_DEMOS


@lru_cache(maxsize=2)
def _tabular_demo(dataset: str):
    from ftps.ml.datasets import demo_tabular

    return demo_tabular(dataset, seed=0)


def demo_schema(dataset: str):
    """A tabular demo's schema (``ftps-stack demo``'s: inferred from the builder's own splits)."""
    return _tabular_demo(dataset)[0]


# -- strategies ---------------------------------------------------------------------------------

def shipped_strategies() -> list[str]:
    return sorted(p.name for p in STRATEGIES_DIR.glob("*.py") if not p.name.startswith("_"))


def shipped_source(name: str) -> str:
    if name not in shipped_strategies():
        raise AssetError(f"unknown strategy {name!r}; shipped: {', '.join(shipped_strategies())}")
    return (STRATEGIES_DIR / name).read_text()


def shipped_recipe(name: str) -> dict[str, Any]:
    """A shipped strategy's RECIPE (read once per version of the file)."""
    path = STRATEGIES_DIR / name
    return _recipe_of(name, path.stat().st_mtime_ns) or {}


@lru_cache(maxsize=64)
def _recipe_of(name: str, mtime_ns: int) -> dict[str, Any] | None:
    return read_recipe(shipped_source(name))


_PARSE_LOCK = threading.Lock()


def _parse(source: str) -> ast.Module:
    """``ast.parse``, serialised and retried: CPython 3.11.7 (this project's venv) can fail with
    "AST constructor recursion depth mismatch" when two threads build ASTs at once (gh-106905),
    e.g. a page here while the in-process registry compiles an uploaded strategy."""
    for attempt in range(3):
        try:
            with _PARSE_LOCK:
                return ast.parse(source)
        except SystemError:
            if attempt == 2:
                raise
            time.sleep(0.05)
    raise AssertionError("unreachable")


def _recipe_node(tree: ast.Module) -> ast.expr | None:
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "RECIPE" for t in node.targets):
            return node.value
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.target.id == "RECIPE":
            return node.value
    return None


def read_recipe(source: str) -> dict[str, Any] | None:
    """The script's ``RECIPE`` dict when it is a literal (read, never executed); else None."""
    try:
        node = _recipe_node(_parse(source))
        value = ast.literal_eval(node) if node is not None else None
    except (SyntaxError, ValueError, TypeError):
        return None
    return value if isinstance(value, dict) else None


def parse_overrides(form: dict[str, str]) -> dict[str, Any]:
    """lr / epochs / batch_size from a form (blank = keep the script's value)."""
    out: dict[str, Any] = {}
    for key in EDITABLE:
        raw = (form.get(key) or "").strip()
        if not raw:
            continue
        try:
            value: Any = float(raw) if key == "lr" else int(raw)
        except ValueError:
            raise AssetError(f"RECIPE['{key}'] must be a {'number' if key == 'lr' else 'whole number'}, "
                             f"got {raw!r}") from None
        if key == "lr" and not math.isfinite(value):
            raise AssetError(f"RECIPE['lr'] must be finite, got {raw!r}")
        out[key] = value
    return out


def rewrite_recipe(source: str, overrides: dict[str, Any]) -> str:
    """``source`` with its literal ``RECIPE = {...}`` updated by ``overrides``, validated by the
    same recipe checks the worker runs (the script itself is not executed here)."""
    if not overrides:
        return source
    from ftps.ml.strategy import StrategyError, parse_recipe

    try:
        tree = _parse(source)
    except SyntaxError as exc:
        raise AssetError(f"the strategy is not valid Python (line {exc.lineno}: {exc.msg})") from None
    node = _recipe_node(tree)
    if node is None:
        raise AssetError("the strategy has no RECIPE = {...} to edit (a free-form finetune() strategy "
                         "keeps its own hyperparameters); upload it without edits")
    try:
        recipe = ast.literal_eval(node)
    except ValueError:
        raise AssetError("the strategy's RECIPE is not a literal dict, so it cannot be edited here") from None
    if not isinstance(recipe, dict):
        raise AssetError("the strategy's RECIPE is not a dict")
    recipe.update(overrides)
    try:
        parse_recipe(recipe)
    except StrategyError as exc:
        raise AssetError(str(exc)) from None
    # Offsets are in UTF-8 bytes; replace the dict literal in place, keep everything else.
    data = source.encode()
    starts = [0]
    for line in data.splitlines(keepends=True):
        starts.append(starts[-1] + len(line))
    a = starts[node.lineno - 1] + node.col_offset
    b = starts[node.end_lineno - 1] + node.end_col_offset
    text = pprint.pformat(recipe, sort_dicts=False, width=90)
    return (data[:a] + text.encode() + data[b:]).decode()


# -- demo data ----------------------------------------------------------------------------------

@lru_cache(maxsize=2)
def contributor_pool(dataset: str) -> tuple[np.ndarray, np.ndarray]:
    """The public contributor split of a demo data set (what ``ftps-stack demo`` submits from):
    digits -> 697 images of scikit-learn's bundled set; fashion-mnist -> the 10,000 test images;
    breast-cancer -> 269 patients' raw rows [N, 30]."""
    from ftps.ml.datasets import demo_split_indices, load_digits, load_fashion_mnist

    if is_tabular(dataset):
        x, y = (a.copy() for a in _tabular_demo(dataset)[1]["contributors"])  # raw rows, as a CSV holds them
    else:
        src, idx = demo_split_indices(dataset)["contributors"]
        x, y = load_digits() if dataset == "digits" else load_fashion_mnist(src)
        x, y = x[idx], y[idx]
    x.flags.writeable = False
    y.flags.writeable = False
    return x, y


def sample_page(dataset: str, page: int) -> list[int]:
    """Indices into the contributor pool shown on one page of the sample set (a fixed shuffle)."""
    n = len(contributor_pool(dataset)[1])
    order = np.random.default_rng(12345).permutation(n)
    pages = max(1, math.ceil(n / SAMPLE_PAGE))
    page = page % pages
    return [int(i) for i in order[page * SAMPLE_PAGE:(page + 1) * SAMPLE_PAGE]]


def sample_pages(dataset: str) -> int:
    return max(1, math.ceil(len(contributor_pool(dataset)[1]) / SAMPLE_PAGE))


def pick_samples(dataset: str, picks: list[str], random_n: str, *, seed: int) -> tuple[np.ndarray, np.ndarray, list[int]]:
    x, y = contributor_pool(dataset)
    idx: list[int] = []
    for p in picks:
        if not p.isdigit() or int(p) >= len(y):
            raise AssetError(f"sample record {p!r} is not in the sample set")
        idx.append(int(p))
    raw = (random_n or "").strip()
    if raw:
        if not raw.isdigit() or int(raw) < 1:
            raise AssetError(f"the number of random records must be a whole number >= 1, got {raw!r}")
        rest = np.setdiff1d(np.arange(len(y)), idx)
        k = int(raw)
        if k > len(rest):
            raise AssetError(f"the sample set has {len(rest)} more records, not {k}")
        idx += [int(i) for i in np.random.default_rng(seed).choice(rest, size=k, replace=False)]
    if not idx:
        raise AssetError("pick some records from the sample set, or ask for a number of random ones")
    idx = list(dict.fromkeys(idx))
    return np.ascontiguousarray(x[idx]), np.ascontiguousarray(y[idx]), idx


def builder_data(dataset: str) -> tuple[np.ndarray, np.ndarray]:
    """The demo builder split: images, or a tabular demo's raw rows (sent as records; the registry
    encodes them)."""
    from ftps.ml.datasets import demo_splits

    x, y = _tabular_demo(dataset)[1]["builder"] if is_tabular(dataset) else demo_splits(dataset)["builder"]
    return x[:BUILDER_DATA_MAX], y[:BUILDER_DATA_MAX]


def demo_base_model(dataset: str, report: Callable[[int, int, str], None]) -> tuple[bytes, bool]:
    """The demo base model M0 of ``ftps-stack demo`` (same cache): pretrained on the builder's own
    split with the dataset's shipped strategy, once. -> (safetensors bytes, came from the cache)."""
    from ftps.ml.datasets import demo_splits
    from ftps.ml.pretrain import cached_base_model

    source = shipped_source(DEFAULT_STRATEGY[dataset])
    x, y = demo_splits(dataset)["pretrain"]  # a tabular demo's encoded rows: the model's inputs
    text = f"pretraining the base model on {len(x)} {dataset} {'rows' if is_tabular(dataset) else 'images'}"
    return cached_base_model(dataset, source, x, y, seed=0, progress=lambda done, total: report(done, total, text))


# -- figures ------------------------------------------------------------------------------------

def thumbnail(record: np.ndarray) -> bytes | None:
    from clients.report_plots import thumbnail_png

    return thumbnail_png(record, target=64)


def offline_gaussian_png(mu: float, sigma: float, k: int, n_values: int, alpha: float) -> bytes:
    """The preparation stage's Gaussian over OUT statistics, with the offline attack's threshold
    (one-sided p-value alpha): records whose phi lands right of it are called members."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from scipy import stats

    fig = Figure(figsize=(5.0, 2.6))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    s = sigma if sigma > 0 else 1.0
    t = mu + float(stats.norm.isf(alpha)) * s
    grid = np.linspace(mu - 4 * s, max(mu + 4 * s, t + s), 500)
    pdf = stats.norm.pdf(grid, mu, s)
    ax.plot(grid, pdf, color="tab:blue", lw=1.6, label=f"OUT: N({mu:.2f}, {sigma:.2f}²)")
    ax.fill_between(grid, pdf, color="tab:blue", alpha=0.12, lw=0)
    ax.fill_between(grid, 0, pdf, where=grid >= t, color="tab:red", alpha=0.35, lw=0,
                    label=f"p < {alpha:g}: called member")
    ax.axvline(t, color="black", ls="--", lw=1)
    ax.set_xlabel("phi = log(p_y / (1 - p_y)) on held-out builder records", fontsize=8)
    ax.set_ylabel("density", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.set_title(f"Offline Gaussian from k = {k} shadow models ({n_values} statistics)", fontsize=9)
    ax.legend(fontsize=7, frameon=False, loc="upper left")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()
