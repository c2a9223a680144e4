"""What task settings can produce a score: rules the registry checks when a task is created, the
gateway when a round is forced, and the scorer's masks follow (one home, no service imports another)."""

from __future__ import annotations

import math

# Bounds of a round: models fine-tuned per round (and shadow models), records in one batch.
MAX_MODELS = 4096
MAX_RECORDS = 100_000
# Contributor-level masks (TaskSettings.mask_unit) draw whole contributions: a batch needs this many
# contributors, so that complementary pairs of models rarely repeat a split (C(16, 8) / 2 = 6435
# splits) and each contribution's score has others to be compared with.
MIN_CONTRIBUTORS = 16


def valid_n_models(n_models: int) -> bool:
    """Models per round: even (complementary pairs), at least 4 (2 IN and 2 OUT per record)."""
    return 4 <= n_models <= MAX_MODELS and n_models % 2 == 0


def valid_batch_size(n_records: int) -> bool:
    return 2 <= n_records <= MAX_RECORDS


def distinct_splits(n_records: int) -> int:
    """How many different ways a batch of ``n_records`` splits into two halves (unordered)."""
    m = int(n_records)
    return math.comb(m, m // 2) // (2 if m % 2 == 0 else 1)


def min_records(n_models: int) -> int:
    """The smallest batch in which every complementary pair of ``n_models`` can take its own split.

    Two pairs with the same split fine-tune on the same records; with a deterministic recipe (one
    batch per epoch, no augmentation) they are the same two models, so every record's IN (and OUT)
    statistics repeat and no per-record Gaussian can be fitted. A round of fewer records is bound
    to fail for such strategies, so tasks and forced rounds below this size are refused.
    """
    m = 2
    while distinct_splits(m) < n_models // 2:
        m += 1
    return m
