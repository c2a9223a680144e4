"""Where the builder registry keeps its tasks: :class:`TaskStore` and its SQL implementation.

One row per task in ``registry_tasks`` (this service's own table, its schema by the migrations beside
this file, version table ``alembic_version_registry``): the columns that are queried (task_id, owner,
name, created_at) beside the whole ``registry_pb2.Task``, serialized. Blobs are not here: a task holds
references (``BlobRef``: key, sha256, size, version) to objects in object storage.

Any number of registry replicas share one database: every change is one transaction that takes the
task's row lock (``SELECT ... FOR UPDATE`` on PostgreSQL; SQLite's write lock, ``BEGIN IMMEDIATE``).
"""

from __future__ import annotations

import abc
import datetime as dt
from pathlib import Path
from typing import Callable, Collection

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc

from ftps.common.db import Database
from ftps.common.errors import AlreadyExists, InvalidArgument, NotFound
from ftps.common.paging import DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE, decode_token, encode_token
from ftps.v1 import registry_pb2

MIGRATIONS = str(Path(__file__).resolve().with_name("migrations"))
VERSION_TABLE = "alembic_version_registry"
class TaskStore(abc.ABC):
    """The registry's tasks. Implementations are safe to call from many threads and from many
    processes sharing one backend; none keeps tasks in process memory between calls."""

    @abc.abstractmethod
    def create(self, task: registry_pb2.Task) -> None:
        """Store a new task (``task_id``, ``owner``, ``name`` set). Its place in the created order is
        the time of this call. AlreadyExists if ``task_id`` is taken (the stored task is unchanged)."""

    @abc.abstractmethod
    def get(self, task_id: str) -> registry_pb2.Task | None:
        """The task as last stored, or None if there is none with that id."""

    @abc.abstractmethod
    def list(self, *, owner: str | None = None, task_ids: Collection[str] | None = None,
             page_size: int = DEFAULT_PAGE_SIZE, page_token: str = "") -> tuple[list[registry_pb2.Task], str]:
        """One page of tasks in created order (oldest first; ties by task_id) -> (tasks, next_page_token).

        ``owner``: only that owner's tasks; ``task_ids``: only those (empty: none); both: both
        conditions; neither: every task. ``page_size`` (1..MAX_PAGE_SIZE): at most that many tasks.
        ``page_token``: "" for the first page, else the ``next_page_token`` of the previous page (with
        the same filters); it is "" after the last page. A token stays valid across calls and
        replicas: the next page starts after the last task of the previous one, so tasks are neither
        repeated nor skipped while others are created. InvalidArgument for a token not made here."""

    @abc.abstractmethod
    def update(self, task_id: str, mutate: Callable[[registry_pb2.Task], None]) -> registry_pb2.Task:
        """Change one task atomically -> the task as stored after the change.

        ``mutate`` gets the current task (a copy, changed in place) while the task is locked: two
        updates of one task, from any threads or replicas, run one after the other, each seeing the
        other's result. It must be quick and do no I/O (it runs inside the transaction); an exception
        from it leaves the task unchanged and propagates. It must not change task_id, owner or
        created_at. NotFound if there is no such task."""


class SqlTaskStore(TaskStore):
    """:class:`TaskStore` on SQLite or PostgreSQL (:class:`ftps.common.db.Database`)."""

    _meta = sa.MetaData()
    tasks = sa.Table(
        "registry_tasks", _meta,
        sa.Column("task_id", sa.String(64), primary_key=True),
        sa.Column("owner", sa.String(64), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("task", sa.LargeBinary(), nullable=False),
    )

    def __init__(self, db: Database) -> None:
        self.db = db

    def migrate(self) -> None:
        """Bring ``registry_tasks`` to the code's version (MigrationError with one line if it cannot)."""
        self.db.migrate(MIGRATIONS, version_table=VERSION_TABLE)

    def create(self, task: registry_pb2.Task) -> None:
        t = self.tasks
        # Naive UTC to the microsecond: SQLite has no time zones, and the order must not depend on one.
        created = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)
        try:
            with self.db.write() as conn:
                conn.execute(t.insert().values(task_id=task.task_id, owner=task.owner, name=task.name,
                                               created_at=created, task=task.SerializeToString()))
        except sa_exc.IntegrityError:
            raise AlreadyExists(f"task {task.task_id} already exists", reason="TASK_ALREADY_EXISTS") from None

    def get(self, task_id: str) -> registry_pb2.Task | None:
        with self.db.read() as conn:
            blob = conn.execute(sa.select(self.tasks.c.task).where(self.tasks.c.task_id == task_id)).scalar()
        return None if blob is None else registry_pb2.Task.FromString(blob)

    def list(self, *, owner: str | None = None, task_ids: Collection[str] | None = None,
             page_size: int = DEFAULT_PAGE_SIZE, page_token: str = "") -> tuple[list[registry_pb2.Task], str]:
        if not 1 <= page_size <= MAX_PAGE_SIZE:
            raise InvalidArgument(f"page_size must be in [1, {MAX_PAGE_SIZE}], got {page_size}", field="page_size")
        t = self.tasks
        q = sa.select(t.c.created_at, t.c.task_id, t.c.task)
        if owner is not None:
            q = q.where(t.c.owner == owner)
        if task_ids is not None:
            if not task_ids:
                return [], ""
            q = q.where(t.c.task_id.in_(sorted(set(task_ids))))
        if page_token:
            created, last = _decode_token(page_token)
            q = q.where(sa.tuple_(t.c.created_at, t.c.task_id) > sa.tuple_(sa.literal(created, sa.DateTime()),
                                                                          sa.literal(last)))
        # One more than asked: whether there is a next page, without a count.
        q = q.order_by(t.c.created_at, t.c.task_id).limit(page_size + 1)
        with self.db.read() as conn:
            rows = conn.execute(q).all()
        more = len(rows) > page_size
        rows = rows[:page_size]
        token = _encode_token(rows[-1].created_at, rows[-1].task_id) if more else ""
        return [registry_pb2.Task.FromString(r.task) for r in rows], token

    def update(self, task_id: str, mutate: Callable[[registry_pb2.Task], None]) -> registry_pb2.Task:
        t = self.tasks
        with self.db.write() as conn:
            blob = conn.execute(sa.select(t.c.task).where(t.c.task_id == task_id).with_for_update()).scalar()
            if blob is None:
                raise NotFound(f"task {task_id} not found", reason="TASK_NOT_FOUND", field="task_id")
            task = registry_pb2.Task.FromString(blob)
            mutate(task)
            if task.task_id != task_id:
                raise ValueError(f"an update of task {task_id} may not change its task_id")
            conn.execute(t.update().where(t.c.task_id == task_id).values(
                name=task.name, task=task.SerializeToString()))
        return task


def _encode_token(created: dt.datetime, task_id: str) -> str:
    return encode_token([created.isoformat(), task_id])


def _decode_token(token: str) -> tuple[dt.datetime, str]:
    created, task_id = decode_token(token, 2, rpc="ListTasks")
    try:
        return dt.datetime.fromisoformat(created), str(task_id)
    except (TypeError, ValueError):
        raise InvalidArgument("page_token is not one that ListTasks returned", reason="INVALID_PAGE_TOKEN",
                              field="page_token") from None
