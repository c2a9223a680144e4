"""The registry's TaskStore contract, on every backend (SQLite file and a real PostgreSQL server), and
the registry itself as two replicas on one database."""

from __future__ import annotations

import hashlib
import threading

import numpy as np
import pytest
from safetensors.numpy import save as save_safetensors

from ftps.common.auth import Principal
from ftps.common.db import Database, MigrationError
from ftps.common.errors import AlreadyExists, InvalidArgument, NotFound
from ftps.v1 import common_pb2, registry_pb2
from services.builder_registry.registry import Registry
from ftps.common.paging import MAX_PAGE_SIZE, page_size
from services.builder_registry.store import SqlTaskStore

ADMIN = Principal("root", "admin")


@pytest.fixture
def tasks(database_url):
    store = SqlTaskStore(Database(database_url, name="registry database"))
    store.migrate()
    yield store
    store.db.dispose()


def _task(i: int, owner: str = "acme") -> registry_pb2.Task:
    return registry_pb2.Task(task_id=f"t-{i:04d}", name=f"task {i}", owner=owner,
                             settings=common_pb2.TaskSettings(n_models=8, record_shape=[1, 8, 8]))


def _ids(tasks) -> list[str]:
    return [t.task_id for t in tasks]


def _all(store, **filters) -> list[str]:
    """Every page with ``filters`` -> the task ids in the order received."""
    got, token = store.list(**filters)
    seen = _ids(got)
    while token:
        got, token = store.list(page_token=token, **filters)
        seen += _ids(got)
    return seen


class TestTaskStoreContract:
    def test_create_then_get_round_trips(self, tasks):
        t = _task(1)
        t.base_model.CopyFrom(common_pb2.BlobRef(key="k", sha256="a" * 64, size=3, version=1))
        tasks.create(t)
        assert tasks.get("t-0001") == t
        assert tasks.get("t-nope") is None

    def test_create_twice_is_already_exists_and_keeps_the_first(self, tasks):
        tasks.create(_task(1))
        with pytest.raises(AlreadyExists):
            tasks.create(registry_pb2.Task(task_id="t-0001", name="other", owner="x"))
        assert tasks.get("t-0001").name == "task 1"

    def test_list_pages_in_created_order_with_filters(self, tasks):
        # Created out of id order: the list follows creation, not ids.
        order = [7, 3, 9, 1, 5, 2, 8, 4, 6, 0]
        for i in order:
            tasks.create(_task(i, owner="acme" if i % 2 else "zeta"))
        every = [f"t-{i:04d}" for i in order]
        page, token = tasks.list(page_size=4)
        assert _ids(page) == every[:4] and token
        page, token = tasks.list(page_size=4, page_token=token)
        assert _ids(page) == every[4:8] and token
        page, token = tasks.list(page_size=4, page_token=token)
        assert _ids(page) == every[8:] and token == ""
        # A page that ends exactly at the last task says so (no empty page after it).
        page, token = tasks.list(page_size=10)
        assert _ids(page) == every and token == ""
        assert _all(tasks, page_size=3) == every
        assert _all(tasks, owner="acme", page_size=2) == [t for t in every if int(t[2:]) % 2]
        assert _all(tasks, owner="nobody") == []
        assert _all(tasks, task_ids={"t-0002", "t-0009", "t-0404"}, page_size=1) == ["t-0009", "t-0002"]
        assert _all(tasks, task_ids=["t-0002", "t-0009"], owner="acme") == ["t-0009"]
        assert tasks.list(task_ids=()) == ([], "")

    def test_a_token_stays_valid_while_tasks_are_created(self, tasks):
        for i in range(3):
            tasks.create(_task(i))
        page, token = tasks.list(page_size=2)
        tasks.create(_task(10))
        rest, token = tasks.list(page_size=2, page_token=token)
        assert _ids(page) + _ids(rest) == ["t-0000", "t-0001", "t-0002", "t-0010"] and token == ""

    @pytest.mark.parametrize("token", ["garbage!", "W10", "WzEsMl0", "bm90IGpzb24"])
    def test_a_token_not_made_here_is_invalid_argument(self, tasks, token):
        with pytest.raises(InvalidArgument, match="page_token"):
            tasks.list(page_token=token)

    def test_page_sizes(self, tasks):
        assert page_size(0) == 100 and page_size(7) == 7 and page_size(10**6) == MAX_PAGE_SIZE
        with pytest.raises(InvalidArgument, match="page_size"):
            page_size(-1)
        with pytest.raises(InvalidArgument, match="page_size"):
            tasks.list(page_size=0)

    def test_update_applies_and_returns_the_change(self, tasks):
        tasks.create(_task(1))

        def rename(t):
            t.name = "renamed"
            t.strategy.version += 1

        got = tasks.update("t-0001", rename)
        assert got.name == "renamed" and got.strategy.version == 1
        assert tasks.get("t-0001") == got
        with pytest.raises(NotFound):
            tasks.update("t-nope", rename)

    def test_a_failing_update_changes_nothing(self, tasks):
        tasks.create(_task(1))

        def half_then_fail(t):
            t.name = "half"
            raise RuntimeError("no")

        with pytest.raises(RuntimeError):
            tasks.update("t-0001", half_then_fail)
        assert tasks.get("t-0001").name == "task 1"
        with pytest.raises(ValueError, match="task_id"):
            tasks.update("t-0001", lambda t: setattr(t, "task_id", "t-other"))
        assert tasks.get("t-0001") == _task(1)

    def test_concurrent_updates_lose_nothing(self, tasks, database_url):
        # Threads with a store each (separate engines, as replicas have): versions 1..N, each once.
        tasks.create(_task(1))
        n = 12
        stores = [SqlTaskStore(Database(database_url)) for _ in range(3)]
        got: list[int] = []
        errors: list[BaseException] = []
        start = threading.Barrier(n)

        def bump(store):
            def add(t):
                t.base_model.version += 1
            try:
                start.wait()
                got.append(store.update("t-0001", add).base_model.version)
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)

        threads = [threading.Thread(target=bump, args=(stores[i % 3],)) for i in range(n)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(60)
        for s in stores:
            s.db.dispose()
        assert not errors, errors
        assert sorted(got) == list(range(1, n + 1))
        assert tasks.get("t-0001").base_model.version == n

    def test_migrating_twice_is_a_no_op(self, tasks):
        tasks.create(_task(1))
        tasks.migrate()
        assert tasks.get("t-0001") == _task(1)


def test_a_schema_from_the_future_stops_with_one_line(tmp_path):
    store = SqlTaskStore(Database(f"sqlite:///{tmp_path}/meta.db", name="registry database"))
    store.migrate()
    with store.db.write() as conn:
        conn.exec_driver_sql("UPDATE alembic_version_registry SET version_num = '9999'")
    with pytest.raises(MigrationError, match="registry database") as e:
        store.migrate()
    assert "\n" not in str(e.value)


# -- two registry replicas on one database ----------------------------------------------------------

@pytest.fixture
def replicas(database_url, store):
    made = []

    def replica() -> Registry:
        tasks = SqlTaskStore(Database(database_url, name="registry database"))
        tasks.migrate()  # every replica migrates at start: the second finds nothing to do
        made.append(tasks)
        return Registry(store, tasks, max_bytes={k: 1 << 20 for k in (
            common_pb2.BLOB_KIND_BASE_MODEL, common_pb2.BLOB_KIND_STRATEGY, common_pb2.BLOB_KIND_BUILDER_DATA)})

    yield replica(), replica()
    for t in made:
        t.db.dispose()


def _upload(registry: Registry, task_id: str, kind: int, data: bytes, who=ADMIN) -> common_pb2.BlobRef:
    header = registry_pb2.UploadHeader(task_id=task_id, kind=kind, size=len(data),
                                       sha256=hashlib.sha256(data).hexdigest())
    return registry.upload(header, iter([data]), who)


def test_replicas_see_each_others_tasks_and_uploads(replicas, store):
    a, b = replicas
    acme = Principal("acme", "builder")
    t = a.create_task("digits", common_pb2.TaskSettings(record_shape=[1, 8, 8]), "", acme)
    assert b.get_task(t.task_id, acme) == t
    ref = _upload(b, t.task_id, common_pb2.BLOB_KIND_STRATEGY, b"x = 1\n", acme)
    assert ref.version == 1 and a.get_task(t.task_id, acme).strategy == ref
    assert store.get_ref(ref) == b"x = 1\n"
    ref = _upload(a, t.task_id, common_pb2.BLOB_KIND_STRATEGY, b"x = 2\n", acme)
    assert ref.version == 2 and b.get_task(t.task_id, acme).strategy == ref
    other = b.create_task("other", common_pb2.TaskSettings(record_shape=[1, 8, 8]), "zeta", ADMIN)
    assert _ids(a.list_tasks(acme)[0]) == [t.task_id]
    assert _ids(a.list_tasks(ADMIN)[0]) == [t.task_id, other.task_id]
    assert _ids(b.list_tasks(Principal("bob", "contributor", (other.task_id,)))[0]) == [other.task_id]


def test_concurrent_uploads_through_two_replicas_get_every_version_once(replicas, store):
    a, b = replicas
    t = a.create_task("digits", common_pb2.TaskSettings(record_shape=[1, 8, 8]), "", ADMIN)
    n = 10
    blobs = [save_safetensors({"w": np.full((2, 2), i, np.float32)}) for i in range(n)]
    refs: list[common_pb2.BlobRef] = []
    errors: list[BaseException] = []
    start = threading.Barrier(n)

    def upload(i):
        try:
            start.wait()
            refs.append(_upload((a, b)[i % 2], t.task_id, common_pb2.BLOB_KIND_BASE_MODEL, blobs[i]))
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=upload, args=(i,)) for i in range(n)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(120)
    assert not errors, errors
    assert sorted(r.version for r in refs) == list(range(1, n + 1))
    # Every version points at its own bytes, intact; the task holds the last one.
    assert {store.get_ref(r) for r in refs} == set(blobs)
    last = max(refs, key=lambda r: r.version)
    assert a.get_task(t.task_id, ADMIN).base_model == last == b.get_task(t.task_id, ADMIN).base_model
