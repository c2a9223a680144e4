"""The contributor gateway's state: submissions, which round holds each, and the batch handed to the
scorer. Rounds themselves (state, progress, result) are the scorer's; the gateway asks it over gRPC.

:class:`SubmissionStore` is the contract; :class:`SqlSubmissionStore` keeps it in the gateway's own
tables (``gateway_*``, migrations in ``services/contributor_gateway/migrations``) on SQLite or
PostgreSQL. Every replica of the gateway shares one database: claims lock rows, so two replicas at
the batch threshold never put a record into two rounds.
"""

from __future__ import annotations

import abc
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc

from ftps.common import paging
from ftps.common.clock import iso, to_ts
from ftps.common.db import Database
from ftps.common.errors import ResourceExhausted
from ftps.v1 import common_pb2, gateway_pb2

MIGRATIONS = str(Path(__file__).resolve().parent / "migrations")
VERSION_TABLE = "alembic_version_gateway"

PENDING = gateway_pb2.SUBMISSION_STATE_PENDING
IN_ROUND = gateway_pb2.SUBMISSION_STATE_IN_ROUND
SCORED = gateway_pb2.SUBMISSION_STATE_SCORED
FAILED = gateway_pb2.SUBMISSION_STATE_FAILED

# A submission in this many failed rounds is not retried automatically: no batch is re-queued forever.
MAX_FAILED_ROUNDS = 2


@dataclass
class Claim:
    """What :meth:`SubmissionStore.claim` saw and took: ``pending`` records of the task were waiting;
    ``submissions`` (arrival order) are now IN_ROUND of the new round, or empty if too few."""

    pending: int
    submissions: list[gateway_pb2.Submission] = field(default_factory=list)
    contributors: int = 0  # distinct contributors of the pending records


@dataclass
class RoundRef:
    """The gateway's own facts about a round (none of them change once written, except the times)."""

    round_id: str
    task_id: str
    n_records: int
    claimed_at: float
    handed_at: float | None = None
    released_at: float | None = None
    batch: common_pb2.BlobRef | None = None


def record_ids(submission_id: str, n_records: int) -> list[str]:
    return [f"{submission_id}-{i}" for i in range(n_records)]


class SubmissionStore(abc.ABC):
    """Submissions of records and their assignment to rounds. Thread-safe; any number of gateway
    replicas may share one store. Every method is one transaction."""

    @abc.abstractmethod
    def add(self, sub: gateway_pb2.Submission, *, max_pending: int | None = None) -> gateway_pb2.Submission:
        """Store ``sub`` (PENDING, its records blob already durable) and return it; if a submission
        with its id exists, return that one unchanged (a retried submit gets the first
        acknowledgement). With ``max_pending``: ResourceExhausted instead, when the contributor's
        pending records in the task would exceed it (checked atomically with the insert)."""

    @abc.abstractmethod
    def get(self, submission_id: str) -> gateway_pb2.Submission | None:
        """The submission (``pending_in_task`` unset), or None."""

    @abc.abstractmethod
    def pending_records(self, task_id: str, contributor: str = "") -> int:
        """Records of the task waiting for a round (only ``contributor``'s, if given)."""

    @abc.abstractmethod
    def claim(self, task_id: str, round_id: str, *, at_least: int, at_least_contributors: int = 0,
              now: float | None = None) -> Claim:
        """Atomically move every pending submission of the task (that no concurrent claim holds) to
        IN_ROUND of the new ``round_id`` and record the round, if they hold at least ``at_least``
        records of at least ``at_least_contributors`` contributors; otherwise change nothing.
        Concurrent claims never take the same submission."""

    @abc.abstractmethod
    def hand_over(self, round_id: str, batch: common_pb2.BlobRef, *, now: float | None = None) -> bool:
        """Note that the round's batch goes to the scorer now. False (and nothing noted) if the round
        was released meanwhile: then it must not be started."""

    @abc.abstractmethod
    def release(self, round_id: str, *, not_since: float) -> int:
        """A round the scorer does not know, claimed (or handed over) before ``not_since``: its
        IN_ROUND submissions are PENDING again without counting a failure, and the round can no
        longer be handed over. Returns the submissions released (0 if too recent or done before)."""

    @abc.abstractmethod
    def apply_done(self, round_id: str, excluded: Iterable[common_pb2.ExcludedRecord] = ()) -> int:
        """The round is DONE: its submissions still IN_ROUND of it become SCORED, or FAILED when the
        scorer left some of their records out (the reason names them). Idempotent; returns how many
        submissions changed."""

    @abc.abstractmethod
    def apply_failed(self, round_id: str, message: str) -> int:
        """The round FAILED: its submissions still IN_ROUND of it are PENDING again with one more
        failed round, or FAILED at :data:`MAX_FAILED_ROUNDS` (reason ends with ``message``).
        Idempotent; returns how many submissions changed."""

    @abc.abstractmethod
    def list_submissions(self, *, contributor: str = "", task_id: str = "", page_size: int = 0,
                         page_token: str = "") -> tuple[list[gateway_pb2.Submission], str]:
        """Submissions in arrival order (of ``contributor`` / of ``task_id`` when given), one page;
        returns them and the next page's token ("" after the last page)."""

    @abc.abstractmethod
    def scored_rounds(self, task_id: str, *, contributor: str = "") -> list[str]:
        """Ids of the rounds that scored submissions of the task (of ``contributor``'s, if given),
        sorted."""

    @abc.abstractmethod
    def has_records_in(self, round_id: str, contributor: str) -> bool:
        """Whether ``contributor`` had records in the round (also after it ended)."""

    @abc.abstractmethod
    def round(self, round_id: str) -> RoundRef | None:
        """The round as the gateway recorded it, or None if this gateway never claimed it."""

    @abc.abstractmethod
    def open_rounds(self) -> list[RoundRef]:
        """Rounds still holding IN_ROUND submissions: those whose outcome is yet to be applied."""


def _fail_excluded_reason(sub_id: str, round_id: str, mine: list[common_pb2.ExcludedRecord]) -> str:
    return ("; ".join(f"record {e.record_id} (#{e.record_id.rsplit('-', 1)[1]} of the submission) left "
                      f"out of round {round_id}: {e.reason}" for e in mine[:5])
            + (f"; and {len(mine) - 5} more" if len(mine) > 5 else ""))


def _failed_rounds_reason(n: int, message: str) -> str:
    return (f"{n} rounds holding these records failed; not retried automatically "
            f"(submit again to retry). Last: {message}")


class SqlSubmissionStore(SubmissionStore):
    """:class:`SubmissionStore` in the gateway's tables (SQLAlchemy Core)."""

    def __init__(self, db: Database) -> None:
        self._db = db
        md = sa.MetaData()
        self.subs = sa.Table(
            "gateway_submissions", md,
            sa.Column("submission_id", sa.String(64), primary_key=True),
            sa.Column("task_id", sa.String(64)), sa.Column("contributor", sa.String(64)),
            sa.Column("n_records", sa.Integer), sa.Column("state", sa.Integer),
            sa.Column("round_id", sa.String(64)), sa.Column("failed_rounds", sa.Integer),
            sa.Column("failure_reason", sa.Text), sa.Column("created_at", sa.String(32)))
        self.rounds = sa.Table(
            "gateway_rounds", md,
            sa.Column("round_id", sa.String(64), primary_key=True), sa.Column("task_id", sa.String(64)),
            sa.Column("n_records", sa.Integer), sa.Column("claimed_at", sa.Float),
            sa.Column("handed_at", sa.Float), sa.Column("released_at", sa.Float),
            sa.Column("batch", sa.LargeBinary))
        self.members = sa.Table(
            "gateway_round_contributors", md,
            sa.Column("round_id", sa.String(64), primary_key=True),
            sa.Column("contributor", sa.String(64), primary_key=True))

    @classmethod
    def open(cls, db: Database, *, migrate: bool = True) -> "SqlSubmissionStore":
        if migrate:
            db.migrate(MIGRATIONS, version_table=VERSION_TABLE)
        return cls(db)

    # -- rows ----------------------------------------------------------------------------------
    @staticmethod
    def _sub(row) -> gateway_pb2.Submission:
        return gateway_pb2.Submission(
            submission_id=row.submission_id, task_id=row.task_id, contributor=row.contributor,
            record_ids=record_ids(row.submission_id, row.n_records), state=row.state, round_id=row.round_id,
            failed_rounds=row.failed_rounds, failure_reason=row.failure_reason,
            created_at=to_ts(row.created_at))

    def _round(self, row) -> RoundRef:
        batch = common_pb2.BlobRef.FromString(row.batch) if row.batch is not None else None
        return RoundRef(round_id=row.round_id, task_id=row.task_id, n_records=row.n_records,
                        claimed_at=row.claimed_at, handed_at=row.handed_at, released_at=row.released_at,
                        batch=batch)

    def _pending(self, conn, task_id: str, contributor: str = "") -> int:
        s = self.subs.c
        q = sa.select(sa.func.coalesce(sa.func.sum(s.n_records), 0)).where(s.task_id == task_id, s.state == PENDING)
        if contributor:
            q = q.where(s.contributor == contributor)
        return int(conn.execute(q).scalar_one())

    def _serialize_contributor(self, conn, task_id: str, contributor: str) -> None:
        # One contributor's submits to a task check their limit one at a time, across replicas (on
        # SQLite the write transaction already holds the database's write lock).
        if self._db.dialect == "postgresql":
            key = zlib.crc32(f"gateway\0{task_id}\0{contributor}".encode())
            conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": key})

    # -- contract ------------------------------------------------------------------------------
    def add(self, sub, *, max_pending=None):
        s = self.subs.c
        try:
            with self._db.write() as conn:
                self._serialize_contributor(conn, sub.task_id, sub.contributor)
                row = conn.execute(sa.select(self.subs).where(s.submission_id == sub.submission_id)).first()
                if row is not None:
                    return self._sub(row)
                if max_pending is not None:
                    mine = self._pending(conn, sub.task_id, sub.contributor)
                    if mine + len(sub.record_ids) > max_pending:
                        raise ResourceExhausted(f"contributor {sub.contributor} would have "
                                                f"{mine + len(sub.record_ids)} records pending; at most {max_pending}",
                                                reason="QUOTA_EXCEEDED")
                conn.execute(self.subs.insert().values(
                    submission_id=sub.submission_id, task_id=sub.task_id, contributor=sub.contributor,
                    n_records=len(sub.record_ids), state=PENDING, round_id="", failed_rounds=0,
                    failure_reason="", created_at=iso(sub.created_at)))
        except sa_exc.IntegrityError:
            # The same id committed by a concurrent retry (another replica): the first one stands.
            return self.get(sub.submission_id)
        out = gateway_pb2.Submission()
        out.CopyFrom(sub)
        out.ClearField("pending_in_task")
        return out

    def get(self, submission_id):
        with self._db.read() as conn:
            row = conn.execute(sa.select(self.subs).where(self.subs.c.submission_id == submission_id)).first()
        return None if row is None else self._sub(row)

    def pending_records(self, task_id, contributor=""):
        with self._db.read() as conn:
            return self._pending(conn, task_id, contributor)

    def pending_by_task(self) -> dict[str, tuple[int, int]]:
        """``{task_id: (records, submissions)}`` pending, of the tasks with pending work (metrics)."""
        s = self.subs.c
        q = (sa.select(s.task_id, sa.func.coalesce(sa.func.sum(s.n_records), 0), sa.func.count())
             .where(s.state == PENDING).group_by(s.task_id))
        with self._db.read() as conn:
            return {row[0]: (int(row[1]), int(row[2])) for row in conn.execute(q)}

    def claim(self, task_id, round_id, *, at_least, at_least_contributors=0, now=None):
        s = self.subs.c
        with self._db.write() as conn:
            # Rows another replica is claiming right now are skipped, not waited for: its round takes them.
            rows = conn.execute(
                sa.select(s.submission_id, s.contributor, s.n_records, s.created_at)
                .where(s.task_id == task_id, s.state == PENDING)
                .order_by(s.created_at, s.submission_id)
                .with_for_update(skip_locked=True)).all()
            total = sum(r.n_records for r in rows)
            contributors = len({r.contributor for r in rows})
            if not rows or total < at_least or contributors < at_least_contributors:
                return Claim(pending=total, contributors=contributors)
            ids = [r.submission_id for r in rows]
            for i in range(0, len(ids), 500):  # bounded IN lists
                conn.execute(self.subs.update().where(s.submission_id.in_(ids[i:i + 500]), s.state == PENDING)
                             .values(state=IN_ROUND, round_id=round_id))
            conn.execute(self.rounds.insert().values(round_id=round_id, task_id=task_id, n_records=total,
                                                     claimed_at=time.time() if now is None else now))
            conn.execute(self.members.insert(), [{"round_id": round_id, "contributor": c}
                                                 for c in sorted({r.contributor for r in rows})])
        subs = [gateway_pb2.Submission(submission_id=r.submission_id, task_id=task_id, contributor=r.contributor,
                                       record_ids=record_ids(r.submission_id, r.n_records), state=IN_ROUND,
                                       round_id=round_id, created_at=to_ts(r.created_at)) for r in rows]
        return Claim(pending=total, submissions=subs, contributors=contributors)

    def hand_over(self, round_id, batch, *, now=None):
        r = self.rounds.c
        with self._db.write() as conn:
            done = conn.execute(self.rounds.update().where(r.round_id == round_id, r.released_at.is_(None))
                                .values(handed_at=time.time() if now is None else now,
                                        batch=batch.SerializeToString()))
        return done.rowcount == 1

    def release(self, round_id, *, not_since):
        r, s = self.rounds.c, self.subs.c
        with self._db.write() as conn:
            row = conn.execute(sa.select(self.rounds).where(r.round_id == round_id).with_for_update()).first()
            if row is None or row.released_at is not None:
                return 0
            if (row.handed_at if row.handed_at is not None else row.claimed_at) >= not_since:
                return 0
            conn.execute(self.rounds.update().where(r.round_id == round_id).values(released_at=time.time()))
            return conn.execute(self.subs.update().where(s.round_id == round_id, s.state == IN_ROUND)
                                .values(state=PENDING, round_id="")).rowcount

    def apply_done(self, round_id, excluded=()):
        s = self.subs.c
        by_sub: dict[str, list[common_pb2.ExcludedRecord]] = {}
        for e in excluded:
            by_sub.setdefault(e.record_id.rsplit("-", 1)[0], []).append(e)
        with self._db.write() as conn:
            ids = set(conn.execute(sa.select(s.submission_id).where(s.round_id == round_id, s.state == IN_ROUND)
                                   .with_for_update()).scalars())
            if not ids:
                return 0
            for sid, mine in by_sub.items():
                if sid in ids:
                    conn.execute(self.subs.update().where(s.submission_id == sid).values(
                        state=FAILED, failure_reason=_fail_excluded_reason(sid, round_id, mine)))
            conn.execute(self.subs.update().where(s.round_id == round_id, s.state == IN_ROUND).values(state=SCORED))
        return len(ids)

    def apply_failed(self, round_id, message):
        s = self.subs.c
        mine = sa.and_(s.round_id == round_id, s.state == IN_ROUND)
        with self._db.write() as conn:
            n = len(conn.execute(sa.select(s.submission_id).where(mine).with_for_update()).all())
            # A failed round loses no record: its submissions wait for the next round, once.
            conn.execute(self.subs.update().where(mine, s.failed_rounds + 1 >= MAX_FAILED_ROUNDS).values(
                state=FAILED, round_id="", failed_rounds=s.failed_rounds + 1,
                failure_reason=_failed_rounds_reason(MAX_FAILED_ROUNDS, message)))
            conn.execute(self.subs.update().where(mine).values(state=PENDING, round_id="",
                                                               failed_rounds=s.failed_rounds + 1))
        return n

    def list_submissions(self, *, contributor="", task_id="", page_size=0, page_token=""):
        s = self.subs.c
        n = paging.page_size(page_size)
        q = sa.select(self.subs).order_by(s.created_at, s.submission_id).limit(n + 1)
        if contributor:
            q = q.where(s.contributor == contributor)
        if task_id:
            q = q.where(s.task_id == task_id)
        after = paging.decode_token(page_token, 2, rpc="ListSubmissions")
        if after is not None:
            q = q.where(sa.tuple_(s.created_at, s.submission_id) > sa.tuple_(*after))
        with self._db.read() as conn:
            rows = conn.execute(q).all()
        subs = [self._sub(r) for r in rows[:n]]
        token = paging.encode_token([rows[n - 1].created_at, rows[n - 1].submission_id]) if len(rows) > n else ""
        return subs, token

    def scored_rounds(self, task_id, *, contributor=""):
        s = self.subs.c
        # Excluded records' submissions end FAILED but keep their (DONE) round; failed rounds' do not.
        q = (sa.select(s.round_id).distinct()
             .where(s.task_id == task_id, s.state.in_([SCORED, FAILED]), s.round_id != "").order_by(s.round_id))
        if contributor:
            q = q.where(s.contributor == contributor)
        with self._db.read() as conn:
            return list(conn.execute(q).scalars())

    def has_records_in(self, round_id, contributor):
        m = self.members.c
        with self._db.read() as conn:
            return conn.execute(sa.select(m.round_id).where(m.round_id == round_id,
                                                            m.contributor == contributor)).first() is not None

    def round(self, round_id):
        with self._db.read() as conn:
            row = conn.execute(sa.select(self.rounds).where(self.rounds.c.round_id == round_id)).first()
        return None if row is None else self._round(row)

    def open_rounds(self):
        s, r = self.subs.c, self.rounds.c
        held = sa.select(s.round_id).where(s.state == IN_ROUND).distinct().scalar_subquery()
        with self._db.read() as conn:
            rows = conn.execute(sa.select(self.rounds).where(r.round_id.in_(held)).order_by(r.round_id)).all()
        return [self._round(row) for row in rows]

