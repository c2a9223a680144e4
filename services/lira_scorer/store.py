"""The scorer's state: rounds (state, progress, lease, result reference) and offline Gaussians.

The scorer is the only owner of a round; the row is the one place its state lives, so any replica
answers GetResult and WatchRound from it. Blobs (batch, PHI, RoundResult) stay in object storage and
a row points at one only once it is stored.

Leases: the replica running a round holds it (``lease_owner``) until ``lease_until`` (epoch seconds of
the replicas' clocks, which must agree within a small part of a lease) and renews it while it runs.
A round whose lease ran out is claimed by another replica and run again from its batch (the jobs are
deterministic given the batch, so the scores are the same). Every write of a running round names its
owner: once another replica took the round over, the old owner's writes change nothing.

Tables (``services/lira_scorer/migrations``, version table ``alembic_version_scorer``)::

    scorer_rounds    round_id PK, task_id, state, progress, batch/result BlobRefs, lease
    scorer_offline   (task_id, base_model_sha256) PK, the OfflineGaussian
    scorer_preparations  (task_id, base_model_sha256) PK, the preparation stage running or last run
                     for it (a long-running operation: id, state, progress, lease like a round's)
"""

from __future__ import annotations

import abc
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from ftps.common import serde
from ftps.common.db import Database
from ftps.v1 import common_pb2, scorer_pb2

MIGRATIONS = str(Path(__file__).parent / "migrations")
VERSION_TABLE = "alembic_version_scorer"
TERMINAL = serde.TERMINAL_ROUND_STATES


def migrate(db: Database) -> None:
    """The scorer's tables at the code's version (raises MigrationError with one line)."""
    db.migrate(MIGRATIONS, version_table=VERSION_TABLE)


@dataclass(frozen=True)
class Variant:
    """A round that runs another round's batch under another recipe (CompareScoringRecipes):
    ``of`` the round it varies, ``name``, ``strategy`` (None: the task's own), ``eval_records``
    (the batch, then held-out builder records)."""

    of: str
    name: str
    strategy: common_pb2.BlobRef | None
    eval_records: common_pb2.BlobRef


@dataclass(frozen=True)
class RoundRow:
    """One round as stored."""

    round_id: str
    task_id: str
    state: int  # common_pb2.RoundState
    models_done: int
    models_total: int
    n_records: int
    message: str
    batch: common_pb2.BlobRef
    record_ids: list[str]
    contributors: list[str]
    result: common_pb2.BlobRef | None = None  # the RoundResult blob, once DONE
    lease_owner: str | None = None
    lease_until: float | None = None
    created_at: float = 0.0
    updated_at: float = 0.0
    grow_from: int | None = None  # growing (GrowScoring): the models it had before; else None
    variant: Variant | None = None  # a recipe comparison's variant of another round

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL

    def status(self) -> common_pb2.RoundStatus:
        return common_pb2.RoundStatus(task_id=self.task_id, round_id=self.round_id, state=self.state,
                                      models_done=self.models_done, models_total=self.models_total,
                                      message=self.message, n_records=self.n_records)


@dataclass(frozen=True)
class NewRound:
    """What StartRound stores: the round, PENDING."""

    round_id: str
    task_id: str
    models_total: int
    batch: common_pb2.BlobRef
    record_ids: list[str]
    contributors: list[str]
    message: str = ""
    variant: Variant | None = None


class RoundStore(abc.ABC):
    """The scorer's rounds. Every method is one transaction; none does work proportional to the
    number of rounds stored (indexed by round_id, and by (state, lease_until) for claims)."""

    @abc.abstractmethod
    def create(self, new: NewRound, *, owner: str, lease_s: float,
               now: float | None = None) -> tuple[RoundRow, bool]:
        """Store ``new`` (PENDING, leased to ``owner`` until ``now + lease_s``) unless a round with its
        id exists. Returns ``(row, True)`` when this call created it, ``(the existing row, False)``
        otherwise (the existing one is left exactly as it was: StartRound is idempotent)."""

    @abc.abstractmethod
    def get(self, round_id: str) -> RoundRow | None:
        """The round, or None."""

    @abc.abstractmethod
    def claim_expired(self, *, owner: str, lease_s: float, limit: int = 8,
                      now: float | None = None) -> list[RoundRow]:
        """Rounds not DONE or FAILED whose lease ran out (or was released), at most ``limit``, now
        leased to ``owner`` until ``now + lease_s``. Concurrent claimers never get the same round:
        one wins, the other gets the rest (row locks skipped on PostgreSQL, one writer on SQLite)."""

    @abc.abstractmethod
    def renew(self, round_id: str, *, owner: str, lease_s: float, now: float | None = None) -> bool:
        """Extend ``owner``'s lease to ``now + lease_s``; False (nothing changed) when ``owner`` no
        longer holds the round (taken over, released, or finished)."""

    @abc.abstractmethod
    def update(self, round_id: str, *, owner: str, state: int | None = None, models_done: int | None = None,
               message: str | None = None, result: common_pb2.BlobRef | None = None,
               models_total: int | None = None) -> bool:
        """Write the round's progress if ``owner`` holds its lease and it is not DONE or FAILED; False
        (nothing written) otherwise. Ending it (DONE, FAILED) also ends the lease and its growth."""

    @abc.abstractmethod
    def grow(self, round_id: str, *, models_total: int, owner: str, lease_s: float, message: str,
             now: float | None = None) -> RoundRow | None:
        """A DONE round with a stored result, running again (FINETUNING, leased to ``owner``) to
        reach ``models_total`` models: ``grow_from`` keeps the models it has, its result stays until
        the grown one replaces it. None (nothing changed) when the round is not DONE."""

    @abc.abstractmethod
    def variants(self, round_id: str) -> list[RoundRow]:
        """The recipe comparison variants of ``round_id``, by id ("-c0" the current recipe first)."""

    @abc.abstractmethod
    def latest_done(self, task_id: str) -> RoundRow | None:
        """The task's most recently finished DONE round with a stored result, or None (the basis of
        a cost estimate: what a round of this task took)."""

    @abc.abstractmethod
    def release(self, round_ids: Sequence[str], *, owner: str) -> int:
        """End ``owner``'s leases on these rounds at once (a replica shutting down): another
        replica claims them on its next pass instead of after the lease. Returns how many."""

    @abc.abstractmethod
    def release_owners(self, prefix: str, *, keep: str) -> int:
        """End every lease held by an owner named ``prefix`` + anything, except ``keep``: the rounds
        of an earlier incarnation of this replica (same replica id, it died), claimable at once."""


class OfflineStore(abc.ABC):
    """Offline Gaussians, one per task and base model."""

    @abc.abstractmethod
    def get(self, task_id: str, base_model_sha256: str) -> common_pb2.OfflineGaussian | None:
        """The stored Gaussian, or None."""

    @abc.abstractmethod
    def put(self, gaussian: common_pb2.OfflineGaussian, *, replace: bool = False) -> common_pb2.OfflineGaussian:
        """Store ``gaussian`` (keyed by its task_id and base_model_sha256). Without ``replace`` a stored
        one wins (two replicas fitting at once fit the same numbers) and is returned; with it, the new
        one replaces it (a refit). Returns the Gaussian stored."""


PREPARING = scorer_pb2.PREPARATION_STATE_PREPARING
PREPARATION_TERMINAL = (scorer_pb2.PREPARATION_STATE_READY, scorer_pb2.PREPARATION_STATE_FAILED)


@dataclass(frozen=True)
class PreparationRow:
    """The preparation stage of a task for one base model, as stored (the last one started)."""

    task_id: str
    base_model_sha256: str
    preparation_id: str
    state: int  # scorer_pb2.PreparationState
    models_done: int
    models_total: int
    message: str
    refit: bool
    lease_owner: str | None
    lease_until: float | None
    started_at: float
    run_started_at: float  # this run's start: a replica that takes it over starts again from model 0
    ended_at: float | None
    updated_at: float

    @property
    def terminal(self) -> bool:
        return self.state in PREPARATION_TERMINAL


class PreparationStore(abc.ABC):
    """Preparation stages, one row per task and base model (the last started). Every method is one
    transaction. Leases as for rounds: the replica running one renews it; one whose lease ran out
    (its replica died) is claimed by another replica and run again (the fit is deterministic)."""

    @abc.abstractmethod
    def start(self, task_id: str, base_model_sha256: str, *, preparation_id: str, models_total: int,
              refit: bool, owner: str, lease_s: float, restart_ready: bool,
              now: float | None = None) -> tuple[PreparationRow, bool]:
        """Start a preparation unless one runs: returns ``(row, True)`` when ``owner`` is to run it
        (stored now as PREPARING under ``preparation_id``, or a PREPARING one whose lease ran out,
        taken over), ``(row, False)`` when one runs elsewhere, or when it is READY and not
        ``restart_ready`` (returned as it is). A FAILED one is always replaced."""

    @abc.abstractmethod
    def get(self, task_id: str, base_model_sha256: str) -> PreparationRow | None:
        """The last preparation started for the task and base model, or None."""

    @abc.abstractmethod
    def update(self, row: PreparationRow, *, owner: str, state: int | None = None,
               models_done: int | None = None, message: str | None = None, now: float | None = None) -> bool:
        """Write progress if ``owner`` holds the lease of this preparation (same id) and it still runs;
        False (nothing written) otherwise. A terminal state ends the lease and records ``ended_at``."""

    @abc.abstractmethod
    def renew(self, row: PreparationRow, *, owner: str, lease_s: float, now: float | None = None) -> bool:
        """Extend ``owner``'s lease; False when it no longer holds it."""

    @abc.abstractmethod
    def claim_expired(self, *, owner: str, lease_s: float, limit: int = 4,
                      now: float | None = None) -> list[PreparationRow]:
        """PREPARING preparations whose lease ran out (or was released), now ``owner``'s, from model 0."""

    @abc.abstractmethod
    def release(self, rows: Sequence[PreparationRow], *, owner: str) -> int:
        """End ``owner``'s leases on these at once (a replica stopping)."""

    @abc.abstractmethod
    def release_owners(self, prefix: str, *, keep: str) -> int:
        """End the leases of owners named ``prefix`` + anything but ``keep`` (an earlier incarnation)."""


metadata = sa.MetaData()
rounds_t = sa.Table(
    "scorer_rounds", metadata,
    sa.Column("round_id", sa.String(128), primary_key=True),
    sa.Column("task_id", sa.String(128), nullable=False),
    sa.Column("state", sa.Integer, nullable=False),
    sa.Column("models_done", sa.Integer, nullable=False),
    sa.Column("models_total", sa.Integer, nullable=False),
    sa.Column("n_records", sa.Integer, nullable=False),
    sa.Column("message", sa.Text, nullable=False),
    sa.Column("batch_ref", sa.LargeBinary, nullable=False),
    sa.Column("record_ids", sa.Text, nullable=False),
    sa.Column("contributors", sa.Text, nullable=False),
    sa.Column("result_ref", sa.LargeBinary, nullable=True),
    sa.Column("lease_owner", sa.String(255), nullable=True),
    sa.Column("lease_until", sa.Float, nullable=True),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
    sa.Column("grow_from", sa.Integer, nullable=True),
    sa.Column("variant_of", sa.String(128), nullable=True),
    sa.Column("variant_name", sa.Text, nullable=True),
    sa.Column("strategy_ref", sa.LargeBinary, nullable=True),
    sa.Column("eval_ref", sa.LargeBinary, nullable=True),
)
offline_t = sa.Table(
    "scorer_offline", metadata,
    sa.Column("task_id", sa.String(128), primary_key=True),
    sa.Column("base_model_sha256", sa.String(64), primary_key=True),
    sa.Column("gaussian", sa.LargeBinary, nullable=False),
    sa.Column("fitted_at", sa.Float, nullable=False),
)
preparations_t = sa.Table(
    "scorer_preparations", metadata,
    sa.Column("task_id", sa.String(128), primary_key=True),
    sa.Column("base_model_sha256", sa.String(64), primary_key=True),
    sa.Column("preparation_id", sa.String(64), nullable=False),
    sa.Column("state", sa.Integer, nullable=False),
    sa.Column("models_done", sa.Integer, nullable=False),
    sa.Column("models_total", sa.Integer, nullable=False),
    sa.Column("message", sa.Text, nullable=False),
    sa.Column("refit", sa.Boolean, nullable=False),
    sa.Column("lease_owner", sa.String(255), nullable=True),
    sa.Column("lease_until", sa.Float, nullable=True),
    sa.Column("started_at", sa.Float, nullable=False),
    sa.Column("run_started_at", sa.Float, nullable=False),
    sa.Column("ended_at", sa.Float, nullable=True),
    sa.Column("updated_at", sa.Float, nullable=False),
)


def _insert(db: Database):
    return (postgresql.insert if db.dialect == "postgresql" else sqlite.insert)


def _ref(data: bytes | None) -> common_pb2.BlobRef | None:
    return None if data is None else common_pb2.BlobRef.FromString(data)


def _row(r: sa.Row) -> RoundRow:
    return RoundRow(round_id=r.round_id, task_id=r.task_id, state=r.state, models_done=r.models_done,
                    models_total=r.models_total, n_records=r.n_records, message=r.message,
                    batch=_ref(r.batch_ref), record_ids=json.loads(r.record_ids),
                    contributors=json.loads(r.contributors), result=_ref(r.result_ref),
                    lease_owner=r.lease_owner, lease_until=r.lease_until, created_at=r.created_at,
                    updated_at=r.updated_at, grow_from=r.grow_from,
                    variant=None if r.variant_of is None else Variant(
                        of=r.variant_of, name=r.variant_name, strategy=_ref(r.strategy_ref),
                        eval_records=_ref(r.eval_ref)))


def _like_prefix(prefix: str) -> str:
    return prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


_Key = tuple  # the values of a _Leases' key columns, in their order


class _Leases:
    """The leases of one table of leased work (rounds, preparations): its ``lease_owner`` and
    ``lease_until`` columns, moved only while the work ``runs`` (ended work is never claimed nor
    written). One home for the SQL, so that rounds and preparations obey the same lease rules.

    ``key``: the columns naming one piece of work (with the run's id where a row is reused by
    later runs, so that a lease never reaches a later run of the same row). ``on_take``: the columns
    a replica resets when it takes the work over, as a function of ``now``."""

    def __init__(self, table: sa.Table, key: Sequence[sa.Column], *, runs: sa.ColumnElement[bool],
                 on_take: Callable[[float], dict] = lambda now: {}) -> None:
        self.table, self.key, self.runs, self._on_take = table, list(key), runs, on_take

    def named(self, key: _Key) -> sa.ColumnElement[bool]:
        return sa.and_(*(c == v for c, v in zip(self.key, key)))

    def match(self, keys: Sequence[_Key]) -> sa.ColumnElement[bool]:
        if len(self.key) == 1:
            return self.key[0].in_([k[0] for k in keys])
        return sa.or_(*(self.named(k) for k in keys))

    def held(self, key: _Key, owner: str) -> sa.ColumnElement[bool]:
        """The work named ``key`` while ``owner`` holds its lease and it runs."""
        return sa.and_(self.named(key), self.table.c.lease_owner == owner, self.runs)

    def take(self, *, owner: str, lease_s: float, now: float) -> dict:
        """The values that hand the work to ``owner`` until ``now + lease_s``."""
        return dict(lease_owner=owner, lease_until=now + lease_s, updated_at=now, **self._on_take(now))

    def claim_expired(self, db: Database, *, owner: str, lease_s: float, limit: int,
                      now: float | None) -> list[sa.Row]:
        now = time.time() if now is None else now
        t = self.table
        expired = sa.and_(self.runs, sa.or_(t.c.lease_until.is_(None), t.c.lease_until < now))
        with db.write() as conn:
            # Locks the rows it picks and skips rows another claimer holds (PostgreSQL; SQLite has
            # one writer at a time): each piece of work goes to one claimer.
            keys = [tuple(k) for k in conn.execute(sa.select(*self.key).where(expired).order_by(t.c.lease_until.asc().nulls_first())
                                                   .limit(limit).with_for_update(skip_locked=True))]
            if not keys:
                return []
            # Still conditional: whatever happened between the two statements, only expired leases move.
            conn.execute(t.update().where(self.match(keys), expired)
                         .values(**self.take(owner=owner, lease_s=lease_s, now=now)))
            rows = {tuple(getattr(r, c.name) for c in self.key): r
                    for r in conn.execute(sa.select(t).where(self.match(keys), t.c.lease_owner == owner))}
        return [rows[k] for k in keys if k in rows]  # longest expired first, as claimed

    def renew(self, db: Database, key: _Key, *, owner: str, lease_s: float, now: float | None) -> bool:
        now = time.time() if now is None else now
        with db.write() as conn:
            return conn.execute(self.table.update().where(self.held(key, owner))
                                .values(lease_until=now + lease_s)).rowcount == 1

    def release(self, db: Database, keys: Sequence[_Key], *, owner: str) -> int:
        if not keys:
            return 0
        t = self.table
        with db.write() as conn:
            return conn.execute(t.update().where(self.match(keys), t.c.lease_owner == owner, self.runs)
                                .values(lease_owner=None, lease_until=None)).rowcount

    def release_owners(self, db: Database, prefix: str, *, keep: str) -> int:
        t = self.table
        with db.write() as conn:
            return conn.execute(t.update().where(
                self.runs, t.c.lease_owner.like(_like_prefix(prefix), escape="\\"),
                t.c.lease_owner != keep).values(lease_owner=None, lease_until=None)).rowcount


def _progress(now: float, *, state: int | None, models_done: int | None, message: str | None,
              terminal: Sequence[int]) -> dict:
    """The columns a progress write sets; ending the work (a ``terminal`` state) ends its lease."""
    values: dict = {"updated_at": now}
    if state is not None:
        values["state"] = state
        if state in terminal:
            values["lease_until"] = None
    if models_done is not None:
        values["models_done"] = models_done
    if message is not None:
        values["message"] = message
    return values


_ROUND_LEASES = _Leases(rounds_t, [rounds_t.c.round_id], runs=rounds_t.c.state.notin_(TERMINAL))


class SqlRoundStore(RoundStore):
    def __init__(self, db: Database) -> None:
        self._db = db

    def create(self, new, *, owner, lease_s, now=None):
        now = time.time() if now is None else now
        values = dict(round_id=new.round_id, task_id=new.task_id, state=common_pb2.ROUND_STATE_PENDING,
                      models_done=0, models_total=new.models_total, n_records=len(new.record_ids),
                      message=new.message, batch_ref=new.batch.SerializeToString(),
                      record_ids=json.dumps(list(new.record_ids)),
                      contributors=json.dumps(list(new.contributors)), result_ref=None,
                      lease_owner=owner, lease_until=now + lease_s, created_at=now, updated_at=now)
        if new.variant is not None:
            values.update(variant_of=new.variant.of, variant_name=new.variant.name,
                          strategy_ref=None if new.variant.strategy is None else new.variant.strategy.SerializeToString(),
                          eval_ref=new.variant.eval_records.SerializeToString())
        with self._db.write() as conn:
            created = conn.execute(_insert(self._db)(rounds_t).values(**values)
                                   .on_conflict_do_nothing(index_elements=["round_id"])
                                   .returning(rounds_t.c.round_id)).first() is not None
            row = conn.execute(sa.select(rounds_t).where(rounds_t.c.round_id == new.round_id)).one()
        return _row(row), created

    def get(self, round_id):
        with self._db.read() as conn:
            row = conn.execute(sa.select(rounds_t).where(rounds_t.c.round_id == round_id)).first()
        return None if row is None else _row(row)

    def claim_expired(self, *, owner, lease_s, limit=8, now=None):
        return [_row(r) for r in _ROUND_LEASES.claim_expired(self._db, owner=owner, lease_s=lease_s,
                                                             limit=limit, now=now)]

    def renew(self, round_id, *, owner, lease_s, now=None):
        return _ROUND_LEASES.renew(self._db, (round_id,), owner=owner, lease_s=lease_s, now=now)

    def update(self, round_id, *, owner, state=None, models_done=None, message=None, result=None,
               models_total=None):
        values = _progress(time.time(), state=state, models_done=models_done, message=message,
                           terminal=TERMINAL)
        if state in TERMINAL:
            values["grow_from"] = None
        if result is not None:
            values["result_ref"] = result.SerializeToString()
        if models_total is not None:
            values["models_total"] = models_total
        with self._db.write() as conn:
            return conn.execute(rounds_t.update().where(_ROUND_LEASES.held((round_id,), owner))
                                .values(**values)).rowcount == 1

    def grow(self, round_id, *, models_total, owner, lease_s, message, now=None):
        now = time.time() if now is None else now
        t = rounds_t.c
        with self._db.write() as conn:
            changed = conn.execute(rounds_t.update().where(
                t.round_id == round_id, t.state == common_pb2.ROUND_STATE_DONE, t.result_ref.isnot(None),
                t.grow_from.is_(None), t.models_total < models_total).values(
                state=common_pb2.ROUND_STATE_FINETUNING, grow_from=t.models_total, models_done=t.models_total,
                models_total=models_total, message=message, lease_owner=owner, lease_until=now + lease_s,
                updated_at=now)).rowcount
            row = conn.execute(sa.select(rounds_t).where(t.round_id == round_id)).first() if changed else None
        return None if row is None else _row(row)

    def variants(self, round_id):
        with self._db.read() as conn:
            rows = conn.execute(sa.select(rounds_t).where(rounds_t.c.variant_of == round_id)
                                .order_by(rounds_t.c.created_at, rounds_t.c.round_id)).all()
        return [_row(r) for r in rows]

    def latest_done(self, task_id):
        with self._db.read() as conn:
            row = conn.execute(sa.select(rounds_t).where(
                rounds_t.c.task_id == task_id, rounds_t.c.state == common_pb2.ROUND_STATE_DONE,
                rounds_t.c.result_ref.is_not(None)).order_by(rounds_t.c.updated_at.desc()).limit(1)).first()
        return None if row is None else _row(row)

    def release(self, round_ids, *, owner):
        return _ROUND_LEASES.release(self._db, [(r,) for r in round_ids], owner=owner)

    def release_owners(self, prefix, *, keep):
        return _ROUND_LEASES.release_owners(self._db, prefix, keep=keep)


class SqlOfflineStore(OfflineStore):
    def __init__(self, db: Database) -> None:
        self._db = db

    def get(self, task_id, base_model_sha256):
        with self._db.read() as conn:
            data = conn.execute(sa.select(offline_t.c.gaussian).where(
                offline_t.c.task_id == task_id, offline_t.c.base_model_sha256 == base_model_sha256)).scalar()
        return None if data is None else common_pb2.OfflineGaussian.FromString(data)

    def put(self, gaussian, *, replace=False):
        values = dict(task_id=gaussian.task_id, base_model_sha256=gaussian.base_model_sha256,
                      gaussian=gaussian.SerializeToString(), fitted_at=time.time())
        stmt = _insert(self._db)(offline_t).values(**values)
        keys = ["task_id", "base_model_sha256"]
        stmt = (stmt.on_conflict_do_update(index_elements=keys, set_=dict(gaussian=stmt.excluded.gaussian,
                                                                          fitted_at=stmt.excluded.fitted_at))
                if replace else stmt.on_conflict_do_nothing(index_elements=keys))
        with self._db.write() as conn:
            conn.execute(stmt)
            data = conn.execute(sa.select(offline_t.c.gaussian).where(
                offline_t.c.task_id == gaussian.task_id,
                offline_t.c.base_model_sha256 == gaussian.base_model_sha256)).scalar_one()
        return common_pb2.OfflineGaussian.FromString(data)


def _prep_row(r: sa.Row) -> PreparationRow:
    return PreparationRow(**{c.name: getattr(r, c.name) for c in preparations_t.columns})


def _prep_key(task_id: str, base_model_sha256: str):
    return sa.and_(preparations_t.c.task_id == task_id, preparations_t.c.base_model_sha256 == base_model_sha256)


# A row is reused by every later preparation of its task and base model: the lease is that run's.
_PREP_LEASES = _Leases(preparations_t, [preparations_t.c.task_id, preparations_t.c.base_model_sha256,
                                        preparations_t.c.preparation_id],
                       runs=preparations_t.c.state == PREPARING,
                       on_take=lambda now: dict(models_done=0, run_started_at=now))  # from model 0 again


def _prep_lease(row: PreparationRow) -> _Key:
    return row.task_id, row.base_model_sha256, row.preparation_id


class SqlPreparationStore(PreparationStore):
    def __init__(self, db: Database) -> None:
        self._db = db

    def _select(self, conn, task_id, sha):
        r = conn.execute(sa.select(preparations_t).where(_prep_key(task_id, sha))).first()
        return None if r is None else _prep_row(r)

    def start(self, task_id, base_model_sha256, *, preparation_id, models_total, refit, owner, lease_s,
              restart_ready, now=None):
        now = time.time() if now is None else now
        values = dict(task_id=task_id, base_model_sha256=base_model_sha256, preparation_id=preparation_id,
                      state=PREPARING, models_done=0, models_total=models_total,
                      message=f"fine-tuning {models_total} shadow models", refit=bool(refit),
                      lease_owner=owner, lease_until=now + lease_s, started_at=now, run_started_at=now,
                      ended_at=None, updated_at=now)
        key = _prep_key(task_id, base_model_sha256)
        with self._db.write() as conn:
            existing = conn.execute(sa.select(preparations_t).where(key).with_for_update()).first()
            if existing is None:
                created = conn.execute(_insert(self._db)(preparations_t).values(**values)
                                       .on_conflict_do_nothing(index_elements=["task_id", "base_model_sha256"])
                                       .returning(preparations_t.c.preparation_id)).first() is not None
                return self._select(conn, task_id, base_model_sha256), created
            row = _prep_row(existing)
            if row.state == PREPARING:
                if row.lease_until is not None and row.lease_until >= now:
                    return row, False
                taken = conn.execute(preparations_t.update().where(
                    _PREP_LEASES.named(_prep_lease(row)), _PREP_LEASES.runs)
                    .values(**_PREP_LEASES.take(owner=owner, lease_s=lease_s, now=now))).rowcount == 1
                return self._select(conn, task_id, base_model_sha256), taken
            if row.state == scorer_pb2.PREPARATION_STATE_READY and not restart_ready:
                return row, False
            replaced = conn.execute(preparations_t.update().where(
                key, preparations_t.c.preparation_id == row.preparation_id).values(**values)).rowcount == 1
            return self._select(conn, task_id, base_model_sha256), replaced

    def get(self, task_id, base_model_sha256):
        with self._db.read() as conn:
            return self._select(conn, task_id, base_model_sha256)

    def update(self, row, *, owner, state=None, models_done=None, message=None, now=None):
        now = time.time() if now is None else now
        values = _progress(now, state=state, models_done=models_done, message=message,
                           terminal=PREPARATION_TERMINAL)
        if state in PREPARATION_TERMINAL:
            values["ended_at"] = now
        with self._db.write() as conn:
            return conn.execute(preparations_t.update().where(_PREP_LEASES.held(_prep_lease(row), owner))
                                .values(**values)).rowcount == 1

    def renew(self, row, *, owner, lease_s, now=None):
        return _PREP_LEASES.renew(self._db, _prep_lease(row), owner=owner, lease_s=lease_s, now=now)

    def claim_expired(self, *, owner, lease_s, limit=4, now=None):
        return [_prep_row(r) for r in _PREP_LEASES.claim_expired(self._db, owner=owner, lease_s=lease_s,
                                                                 limit=limit, now=now)]

    def release(self, rows, *, owner):
        return _PREP_LEASES.release(self._db, [_prep_lease(row) for row in rows], owner=owner)

    def release_owners(self, prefix, *, keep):
        return _PREP_LEASES.release_owners(self._db, prefix, keep=keep)
