"""Who trains on what: seeds, inclusion masks, and the records a broken model is traced back to.

Pure numpy (no gRPC, no torch, no I/O). The scorer derives a round's masks and model seeds here,
and so do the clients and benches that reproduce a round without the services (``ftps-score``,
``bench/``): the same labels give the same masks and models everywhere.
"""

from __future__ import annotations

import hashlib

import numpy as np

from ftps.common.task_rules import distinct_splits
from ftps.privacy.scoring import MIN_MODELS

__all__ = ["derive_seed", "group_index", "make_group_masks", "make_masks", "model_seeds", "shadow_masks",
           "trace_failures"]


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from any labels: the same round always gets the same masks and models."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def model_seeds(base_seed: int, n: int) -> list[int]:
    """The seeds of models ``0..n-1`` of a round (or preparation stage) seeded ``base_seed``."""
    return [derive_seed(base_seed, "model", i) for i in range(n)]


def make_masks(n_models: int, n_records: int, *, seed: int) -> np.ndarray:
    """Inclusion masks of the production stage (DESIGN.md §3, Algorithm 1 of Gu et al.).

    Models ``2k`` and ``2k+1`` take complementary random halves of the batch, so every record is
    IN for exactly ``n_models / 2`` models and every model gets ``floor(m/2)`` or ``ceil(m/2)``
    records. For odd ``m`` the pair member that gets the extra record alternates between pairs, so
    model sizes are spread evenly too.

    Returns bool ``[n_models, n_records]``; deterministic given ``seed``.
    Raises ValueError unless ``n_models`` is even and >= 4 and ``n_records`` >= 1.
    """
    for name, value in (("n_models", n_models), ("n_records", n_records)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise ValueError(f"{name} must be an integer, got {value!r}")
    if n_models < MIN_MODELS or n_models % 2:
        raise ValueError(f"n_models must be even and >= {MIN_MODELS}, got {n_models}")
    if n_records < 1:
        raise ValueError(f"n_records must be >= 1, got {n_records}")
    n_pairs, m = int(n_models) // 2, int(n_records)
    rng = np.random.default_rng(seed)
    # Row k is a uniformly random ranking of the records for pair k.
    rank = rng.permuted(np.broadcast_to(np.arange(m), (n_pairs, m)), axis=1)
    first_size = np.where(np.arange(n_pairs) % 2 == 0, (m + 1) // 2, m // 2)
    first = rank < first_size[:, None]
    if distinct_splits(m) >= n_pairs:
        _redraw_repeated_splits(first, first_size, rng)
    masks = np.empty((2 * n_pairs, m), dtype=bool)
    masks[0::2] = first
    masks[1::2] = ~first
    return masks


def group_index(labels: list[str]) -> tuple[list[str], np.ndarray]:
    """The distinct labels in sorted order and, per record, the index of its label: contributors
    of a batch -> (names, group of each record). Sorted, so the groups do not depend on arrival."""
    names = sorted(set(labels))
    where = {name: g for g, name in enumerate(names)}
    return names, np.array([where[label] for label in labels], dtype=np.int64)


def make_group_masks(n_models: int, groups: np.ndarray, *, seed: int) -> np.ndarray:
    """Inclusion masks that draw whole groups (a contributor's records) in or out together:
    :func:`make_masks` over the groups, each record taking its group's column. Every group is IN
    for exactly ``n_models / 2`` models; models get about half of the groups (not of the records).

    ``groups``: int ``[n_records]``, the group of each record, values ``0..G-1`` (``group_index``).
    Returns bool ``[n_models, n_records]``.
    """
    groups = np.asarray(groups)
    if groups.ndim != 1 or len(groups) == 0 or groups.dtype.kind not in "iu" or groups.min() < 0:
        raise ValueError("groups must be a non-empty 1-D array of group indices >= 0")
    return make_masks(n_models, int(groups.max()) + 1, seed=seed)[:, groups]


def _redraw_repeated_splits(first: np.ndarray, first_size: np.ndarray, rng: np.random.Generator) -> None:
    """Give every pair its own split, in place, redrawing a pair whose split repeats an earlier one.

    Only small batches ever repeat a split (at m >= 20 the chance is below 1e-4 per pair), so for
    the batches of real rounds no redraw happens and the masks are exactly those of the plain draw.
    """
    def key(row: np.ndarray) -> bytes:  # the half holding record 0 names the split
        return (row if row[0] else ~row).tobytes()

    seen: set[bytes] = set()
    for k in range(len(first)):
        while key(first[k]) in seen:
            first[k] = rng.permutation(first.shape[1]) < first_size[k]
        seen.add(key(first[k]))


def shadow_masks(k: int, n_pool: int, *, seed: int) -> np.ndarray:
    """The preparation stage's masks of ``k`` shadow models over a pool of ``n_pool`` records:
    :func:`make_masks` when ``k`` allows complementary pairs (even, >= 4), else independent random
    halves. Returns bool ``[k, n_pool]``; deterministic given ``seed``."""
    if k >= 4 and k % 2 == 0:
        return make_masks(k, n_pool, seed=seed)
    rng = np.random.default_rng(seed)
    return np.stack([rng.permutation(n_pool) < n_pool // 2 for _ in range(k)])


def trace_failures(phi: np.ndarray, member: np.ndarray,
                   failed: dict[int, str]) -> tuple[dict[int, str], int, str]:
    """The records to blame for what went wrong in a round, each with the reason for its contributor.

    Args:
        phi: float ``[n, m]``, NaN where a record's statistic was not finite (a model whose
            fine-tuning diverged has a NaN row).
        member: bool ``[n, m]``, record ``j`` IN model ``i``.
        failed: models whose job failed with a task error, with the error.

    A record is blamed when its statistic is NaN on a model that worked for the other records; when
    those records do not account for every broken (failed or diverged) model, also each record that
    trained a broken model and no sound one. With complementary pairs a single such record is found
    by its IN models, which are precisely the broken ones; an innocent record shares all n/2 of
    them with probability 2^(-n/2) (1/65536 at n = 32) and is then left out with it.

    Returns ``({column: reason}, number of broken models, why they broke if no record explains
    every one of them, else "")``: e.g. a strategy that fails on every model is nobody's record.
    """
    n, m = phi.shape
    broken = {i: "fine-tuning diverged (every logit NaN or infinite)" for i in range(n)
              if i not in failed and np.isnan(phi[i]).all()}
    broken.update(failed)
    sound = np.array([i for i in range(n) if i not in broken], dtype=int)
    causes: dict[int, str] = {}
    for j in np.flatnonzero(np.isnan(phi[sound]).any(axis=0)) if len(sound) else ():
        causes[int(j)] = "its statistic is not finite (the model's logits for it overflow)"
    if not broken:
        return causes, 0, ""
    rows = sorted(broken)
    reason = broken[rows[0]]
    if causes and member[np.ix_(rows, sorted(causes))].any(axis=1).all():
        return causes, len(broken), ""  # the records with bad statistics trained every broken model
    suspects = member[rows].any(axis=0) & ~member[sound].any(axis=0)
    # Blame only what explains every broken model, and never half the batch or more.
    if not suspects.any() or suspects.sum() > m // 2 or not member[np.ix_(rows, suspects)].any(axis=1).all():
        return causes, len(broken), reason
    for j in np.flatnonzero(suspects):
        causes.setdefault(int(j), f"fine-tuning failed on every model that trained on it: {reason}")
    return causes, len(broken), ""
