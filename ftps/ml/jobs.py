"""A fine-tune job and its result: the one form a job takes from the worker's servicer through
the sandbox and its child to the engine (DESIGN.md §3, production stage).

``FinetuneJob`` is built once per process where the job enters it (the worker from the proto,
the sandbox child from the files its parent wrote, in-process callers from arrays); building it
is where its records and models are validated, so nothing downstream validates them again.
Records keep the npz blob they were read from, so the sandbox hands the child the blob as it
came instead of encoding the arrays again. ``JobResult`` is what the engine returns: PHI and
how it was computed.

No torch here: the worker process imports this module, and only the sandbox child runs models.
"""

from __future__ import annotations

import dataclasses
import io
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from ftps.common import archives
from ftps.records import RecordsError
from ftps.records.npz import Records

__all__ = ["CHECK_ONLY", "FinetuneJob", "JobResult", "ModelSpec", "Records"]

# ``FinetuneJob.engine=CHECK_ONLY``: build the model, load the weights, check the records against
# it; no training (the registry's upload check).
CHECK_ONLY = "check"

# The files of a job on disk (``FinetuneJob.to_files``): the sandbox child reads them.
_STRATEGY, _WEIGHTS, _SPEC, _MASKS = "strategy.txt", "base.safetensors", "job.json", "masks.npy"
_TRAIN, _EVAL, _BUILDER = "train.npz", "eval.npz", "builder.npz"


@dataclass(frozen=True, eq=False)
class ModelSpec:
    """Model ``index`` of a round: its seed and its inclusion mask, bool [N] over the train
    records (``FinetuneJob`` checks the mask against them)."""

    index: int
    seed: int
    mask: np.ndarray


@dataclass(frozen=True, eq=False)
class FinetuneJob:
    """Fine-tune one model per ``models`` entry from ``base_weights`` on its train records (and
    ``builder_mix`` builder records; None: the recipe's), then compute phi on the eval records.

    ``eval_records`` None: evaluate on the train records. ``engine``: None, "auto", "sequential",
    "stacked" (``ftps.ml.engines``) or ``CHECK_ONLY``; ``precision``: None, "auto", "fp32" or
    "bf16" (``ftps.ml.engines.plan_precision``). ``models`` may be given as
    ``(index, seed, mask)`` tuples; they are kept as ``ModelSpec``. Raises RecordsError for a
    mask that is not bool [len(train_records)] or a seed outside [0, 2**64). How the records fit
    each other and the strategy's model is the engine's check (it knows the strategy).
    """

    strategy_source: str
    base_weights: bytes
    train_records: Records
    models: tuple[ModelSpec, ...]
    eval_records: Records | None = None
    builder_records: Records | None = None
    builder_mix: int | None = 0
    engine: str | None = None
    precision: str | None = None

    def __post_init__(self) -> None:
        n = len(self.train_records)
        models = []
        for m in self.models:
            m = m if isinstance(m, ModelSpec) else ModelSpec(*m)
            mask = np.asarray(m.mask)
            if mask.dtype != np.bool_ or mask.shape != (n,):
                raise RecordsError(
                    f"inclusion mask of model {m.index} must be bool [{n}], got {mask.dtype} "
                    f"{mask.shape}"
                )
            if not isinstance(m.seed, (int, np.integer)) or not 0 <= int(m.seed) < 2**64:
                raise RecordsError(
                    f"seed of model {m.index} must be an integer in [0, 2**64), got {m.seed!r}"
                )
            models.append(ModelSpec(m.index, m.seed, mask))
        object.__setattr__(self, "models", tuple(models))

    @property
    def evaluated(self) -> Records:
        """The records phi is computed on."""
        return self.train_records if self.eval_records is None else self.eval_records

    @property
    def masks(self) -> np.ndarray:
        """bool [len(models), len(train_records)]."""
        out = np.zeros((len(self.models), len(self.train_records)), dtype=np.bool_)
        for row, m in enumerate(self.models):
            out[row] = m.mask
        return out

    # -- as files (the sandbox's parent writes them, its child reads them) -----------------------

    def to_files(self) -> dict[str, bytes]:
        """The job as files: the strategy, the weights and each records blob as they came, the
        masks as one .npy, the rest as JSON. Nothing pickled."""
        files = {
            _STRATEGY: self.strategy_source.encode("utf-8"),
            _WEIGHTS: bytes(self.base_weights),
            _TRAIN: self.train_records.to_npz(),
        }
        if self.eval_records is not None:
            files[_EVAL] = self.eval_records.to_npz()
        if self.builder_records is not None:
            files[_BUILDER] = self.builder_records.to_npz()
        buf = io.BytesIO()
        np.save(buf, self.masks, allow_pickle=False)
        files[_MASKS] = buf.getvalue()
        files[_SPEC] = json.dumps({
            "models": [{"index": int(m.index), "seed": int(m.seed)} for m in self.models],
            "builder_mix": self.builder_mix, "engine": self.engine, "precision": self.precision,
            "has_eval": self.eval_records is not None,
            "has_builder": self.builder_records is not None,
        }).encode()
        return files

    @classmethod
    def from_files(cls, read: Callable[[str], bytes]) -> FinetuneJob:
        """The job ``to_files`` wrote, each file got by ``read(name)``; validated as any job is.
        Every file is bounded before it is read (``archives.INTERNAL_LIMITS``: the parent wrote
        them from blobs validated at the edge). The records' blobs are not kept."""
        spec = json.loads(read(_SPEC).decode("utf-8"))
        train = Records.load(read(_TRAIN), keep_npz=False)
        masks = archives.read_npy(read(_MASKS), what=_MASKS,
                                  spec=archives.ArraySpec((len(spec["models"]), None), "b"))
        return cls(
            strategy_source=read(_STRATEGY).decode("utf-8"),
            base_weights=read(_WEIGHTS),
            train_records=train,
            models=tuple(ModelSpec(m["index"], m["seed"], masks[row])
                         for row, m in enumerate(spec["models"])),
            eval_records=Records.load(read(_EVAL), keep_npz=False) if spec["has_eval"] else None,
            builder_records=(Records.load(read(_BUILDER), keep_npz=False)
                             if spec["has_builder"] else None),
            builder_mix=spec["builder_mix"],
            engine=spec["engine"],
            precision=spec.get("precision"),
        )


@dataclass(frozen=True, eq=False)
class JobResult:
    """What a job gave: PHI float64 [len(models), len(eval records)], rows in the order of the
    job's models, and how it was computed.

    ``engine``: the engine that ran (``ftps.ml.engines.ENGINES``, or CHECK_ONLY) and
    ``engine_reason`` why; ``device`` it ran on; ``precision`` of the training steps
    (``ftps.ml.training.PRECISIONS``); ``features_s`` / ``train_s`` / ``phi_s``: seconds
    spent on cached trunk features, training, phi; ``seconds``: the job's wall time as whoever
    ran it measured it. A CHECK_ONLY job has ``classes`` (logits per record) and ``parameters``
    (of the base model) and zeros for PHI. ``cpu_limit_s``: the sandbox child's soft CPU limit
    for the job (None in-process). With ``RECIPE['dp']`` (DP-SGD): ``dp_epsilon``, the RDP
    accountant's epsilon at ``dp_delta`` of the job's model that spent most (inf without noise),
    and ``dp_noise_multiplier``, that model's; all 0 without DP-SGD.
    """

    phi: np.ndarray
    engine: str = ""
    engine_reason: str = ""
    device: str = ""
    channels_last: bool = False
    precision: str = ""
    features_s: float = 0.0
    train_s: float = 0.0
    phi_s: float = 0.0
    seconds: float = 0.0
    classes: int | None = None
    parameters: int | None = None
    cpu_limit_s: int | None = None
    dp_epsilon: float = 0.0
    dp_noise_multiplier: float = 0.0
    dp_delta: float = 0.0

    def report(self) -> dict[str, Any]:
        """Every field but PHI, those that are set (JSON: the sandbox child's report)."""
        return {f.name: getattr(self, f.name) for f in _REPORTED if getattr(self, f.name) is not None}

    @classmethod
    def from_report(cls, phi: np.ndarray, report: object) -> JobResult:
        """PHI and a report from ``report()`` that is not trusted (a sandbox child wrote it):
        fields of the wrong type, and unknown ones, are left out."""
        fields: dict[str, Any] = {}
        if isinstance(report, Mapping):
            for f in _REPORTED:
                value = report.get(f.name)
                if _typed(value, _TYPES[f.name]):
                    fields[f.name] = float(value) if _TYPES[f.name] is float else value
        return cls(phi, **fields)


def _typed(value: object, kind: type) -> bool:
    if kind is float:
        return type(value) in (int, float)
    return type(value) is kind  # bool is not an int here, nor an int a bool


_REPORTED = tuple(f for f in dataclasses.fields(JobResult) if f.name != "phi")
_TYPES: dict[str, type] = {
    "engine": str, "engine_reason": str, "device": str, "channels_last": bool, "precision": str,
    "features_s": float, "train_s": float, "phi_s": float, "seconds": float,
    "classes": int, "parameters": int, "cpu_limit_s": int,
    "dp_epsilon": float, "dp_noise_multiplier": float, "dp_delta": float,
}
