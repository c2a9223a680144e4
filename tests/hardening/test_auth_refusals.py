"""Fail-closed auth and identical refusals, through real servers on 127.0.0.1:0: no key, no service
(unless auth is switched off by ``auth_disabled``, then every caller is the explicit principal);
``current()`` never falls back to admin; one spelling per token; ids matched whole; INTERNAL says
only "internal error, incident <id>"; object store failures are UNAVAILABLE; messages name no
internal service; control characters escaped in log lines."""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import re
import secrets
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from ftps.common import auth, grpcutil
from ftps.common.auth import AUTH_DISABLED, AuthNotConfigured, NoPrincipal, TokenSigner, current
from ftps.common.db import Database
from ftps.common.errors import InvalidArgument, NotFound, Unauthenticated, Unavailable
from ftps.common.rpc_status import from_rpc_error
from ftps.common.log import _FORMAT, EscapingFormatter
from ftps.common.settings import load_settings
from ftps.common.storage import STORE_FAILING, STORE_UNREACHABLE, ObjectStore, check_id
from ftps.v1 import (common_pb2, gateway_pb2, gateway_pb2_grpc, registry_pb2, registry_pb2_grpc, scorer_pb2,
                     scorer_pb2_grpc)
from services.builder_registry.__main__ import create_server as registry_server
from services.builder_registry.config import RegistrySettings
from services.builder_registry.registry import Registry
from services.builder_registry.servicer import BuilderRegistryServicer
from services.builder_registry.store import SqlTaskStore
from services.contributor_gateway.__main__ import create_server as gateway_server
from services.contributor_gateway.config import GatewaySettings
from services.finetune_worker.config import WorkerSettings
from services.lira_scorer.__main__ import create_server as scorer_server
from services.lira_scorer.config import ScorerSettings
from tests.hardening.proxy import CuttableProxy

ROOT = Path(__file__).resolve().parents[2]
KEY = secrets.token_hex(32)
SERVICES = {"services.builder_registry": RegistrySettings, "services.contributor_gateway": GatewaySettings,
            "services.lira_scorer": ScorerSettings, "services.finetune_worker": WorkerSettings}
INCIDENT = re.compile(r"internal error, incident ([0-9a-f]{12})")


def _status(fn) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as e:
        fn()
    return e.value.code(), e.value.details()


def _create_server(module: str):
    return __import__(f"{module}.__main__", fromlist=["create_server"]).create_server


def _child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FTPS_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
    return env | extra


# -- fail closed ------------------------------------------------------------------------------------

@pytest.mark.parametrize("module", SERVICES)
def test_a_service_without_a_signing_key_refuses_to_start(storage_kwargs, module):
    kw = dict(storage_kwargs, auth_disabled=False)
    with pytest.raises(AuthNotConfigured, match=r"set FTPS_AUTH_KEY_FILE .* FTPS_AUTH_DISABLED=true"):
        _create_server(module)(SERVICES[module](**kw))


def test_every_service_process_refuses_in_one_line_naming_what_to_set():
    procs = {m: subprocess.Popen([sys.executable, "-m", m, "--listen", "127.0.0.1:0"], env=_child_env(),
                                 cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for m in SERVICES}
    for module, proc in procs.items():
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 2, (module, out, err)
        assert err.count("\n") == 1, err  # one line, no traceback
        assert err.startswith(f"python -m {module}: refusing to start: no token signing key: set "
                              "FTPS_AUTH_KEY_FILE (--auth-key-file) or FTPS_AUTH_KEY (--auth-key)"), err
        assert "FTPS_AUTH_DISABLED=true (--auth-disabled)" in err


def test_half_or_contradictory_auth_settings_refuse_to_start(storage_kwargs, tmp_path):
    kw = dict(storage_kwargs, auth_disabled=False)
    empty = tmp_path / "empty.key"
    empty.write_text("\n")
    for extra, message in ((dict(auth_key=KEY, auth_disabled=True), "both set"),
                           (dict(auth_key_file=str(empty)), "is empty"),
                           (dict(auth_key_file=str(tmp_path / "missing.key")), "cannot read auth key file"),
                           (dict(auth_key="short"), "at least 32 bytes")):
        with pytest.raises(AuthNotConfigured, match=message):
            registry_server(RegistrySettings(**(kw | extra)))
    with pytest.raises(AuthNotConfigured):
        grpcutil.Security()  # no signer and nothing said: refused at construction too


def test_the_switch_is_a_flag_and_an_env_var(monkeypatch):
    assert load_settings(RegistrySettings, ["--auth-disabled"]).auth_disabled is True
    assert load_settings(RegistrySettings, []).auth_disabled is False
    monkeypatch.setenv("FTPS_AUTH_DISABLED", "true")
    assert load_settings(RegistrySettings, []).auth_disabled is True


def test_auth_disabled_starts_loudly_and_every_caller_is_the_explicit_principal(storage_kwargs, serve,
                                                                               monkeypatch, caplog):
    from services.builder_registry import servicer

    seen = []
    monkeypatch.setattr(servicer, "current", lambda: seen.append(current()) or seen[-1])
    caplog.set_level(logging.WARNING, logger="ftps.common.grpcutil")
    addr = serve(registry_server(RegistrySettings(**storage_kwargs)))  # the fixture says auth_disabled
    assert "AUTHENTICATION IS DISABLED" in caplog.text and "'auth-disabled'" in caplog.text
    forged = TokenSigner(b"z" * 32).issue("mallory", "contributor")
    for token in (None, forged):  # with auth off a token is not even read
        stub = registry_pb2_grpc.BuilderRegistryServiceStub(grpcutil.make_channel(addr, token=token))
        stub.ListTasks(registry_pb2.ListTasksRequest(), timeout=10)
    assert seen == [AUTH_DISABLED, AUTH_DISABLED] and AUTH_DISABLED == auth.Principal("auth-disabled", "admin")


def test_a_process_with_auth_disabled_serves_and_says_so(s3_endpoint, tmp_path):
    env = _child_env(FTPS_AUTH_DISABLED="true", FTPS_S3_ENDPOINT=s3_endpoint, FTPS_S3_BUCKET="auth-off",
                     FTPS_S3_ACCESS_KEY="test", FTPS_S3_SECRET_KEY="test-secret",
                     FTPS_DATABASE_URL=f"sqlite:///{tmp_path}/meta.db")
    proc = subprocess.Popen([sys.executable, "-m", "services.builder_registry", "--listen", "127.0.0.1:0"],
                            env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            lines.append(line)
            if m := re.search(r"listening on .* \(port (\d+)\)", line):
                break
        else:
            m = None
        assert m, "".join(lines)
        assert any("AUTHENTICATION IS DISABLED" in line for line in lines), "".join(lines)
        stub = registry_pb2_grpc.BuilderRegistryServiceStub(grpcutil.make_channel(f"127.0.0.1:{m.group(1)}"))
        assert stub.ListTasks(registry_pb2.ListTasksRequest(), timeout=10).tasks == []
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_current_outside_an_authenticated_call_raises_and_is_never_admin(storage_kwargs, store, serve):
    with pytest.raises(NoPrincipal):
        current()
    # A server wired without any auth interceptor: its handlers get no principal, so every call is
    # an incident, never an admin call.
    server = grpcutil.Server()
    server.add(registry_pb2_grpc.add_BuilderRegistryServiceServicer_to_server,
               BuilderRegistryServicer(Registry(store, SqlTaskStore(Database("sqlite://")), max_bytes={})),
               "ftps.v1.BuilderRegistryService")
    stub = registry_pb2_grpc.BuilderRegistryServiceStub(grpcutil.make_channel(serve(server)))
    code, details = _status(lambda: stub.ListTasks(registry_pb2.ListTasksRequest(), timeout=10))
    assert code == grpc.StatusCode.INTERNAL and INCIDENT.fullmatch(details), details


# -- one spelling per token ----------------------------------------------------------------------------

def _non_canonical(signer: TokenSigner) -> dict[str, str]:
    """Spellings of valid tokens that Python's base64url decoder accepts as the same bytes."""
    token = next(t for t in (signer.issue(f"root{i}", "admin") for i in range(200))
                 if re.search(r"[-_]", t))
    body, sig = token.split(".")
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    # 32 signature bytes in 43 characters: the last one carries 2 bits that must be zero.
    last = alphabet[alphabet.index(sig[-1]) | 1]
    out = {
        "canonical": token,
        "padding": f"{body}.{sig}=",
        "standard alphabet": token.replace("-", "+").replace("_", "/"),
        "trailing bits": f"{body}.{sig[:-1]}{last}",
        "space": f"{body[:10]} {body[10:]}.{sig}",
    }
    unb64 = lambda s: base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))  # noqa: E731 - the lax decoder
    for name, spelling in out.items():
        b, s = spelling.split(".")
        assert (unb64(b), unb64(s)) == (unb64(body), unb64(sig)), name  # the same bytes, another spelling
    return out


def test_only_the_canonical_spelling_of_a_token_is_accepted(storage_kwargs, serve):
    signer = TokenSigner(bytes.fromhex(KEY))
    spellings = _non_canonical(signer)
    kw = dict(storage_kwargs, auth_disabled=False, auth_key=KEY)
    addr = serve(registry_server(RegistrySettings(**kw)))
    for name, token in spellings.items():
        stub = registry_pb2_grpc.BuilderRegistryServiceStub(grpcutil.make_channel(addr, token=token))
        if name == "canonical":
            stub.ListTasks(registry_pb2.ListTasksRequest(), timeout=10)
        else:
            assert _status(lambda s=stub: s.ListTasks(registry_pb2.ListTasksRequest(), timeout=10)) == (
                grpc.StatusCode.UNAUTHENTICATED, "malformed token"), name
    body, sig = spellings["canonical"].split(".")
    for spelling in (f"{body}\n.{sig}", f"{body}.{sig}\n", f"\t{body}.{sig}"):  # not sendable as metadata
        with pytest.raises(Unauthenticated, match="malformed"):
            signer.verify(spelling)


# -- ids matched whole -------------------------------------------------------------------------------

def test_check_id_matches_the_whole_id():
    assert check_id("t-0123.ab_c", "task_id") == "t-0123.ab_c"
    for bad in ("t-1\n", "t-1\r\n", "\nt-1", "t-1 ", "a" * 65, "../x"):
        with pytest.raises(InvalidArgument):
            check_id(bad, "task_id")


@pytest.fixture
def keyed(storage_kwargs, serve):
    """Registry, scorer and gateway checking tokens with KEY, and an admin's stubs to them."""
    kw = dict(storage_kwargs, auth_disabled=False, auth_key=KEY)
    reg = serve(registry_server(RegistrySettings(**kw)))
    sc = serve(scorer_server(ScorerSettings(**kw, registry_addr=reg, worker_addrs="127.0.0.1:9")))
    gw = serve(gateway_server(GatewaySettings(**kw, registry_addr=reg, scorer_addr=sc)))
    token = TokenSigner(bytes.fromhex(KEY)).issue("root", "admin")
    ch = lambda a: grpcutil.make_channel(a, token=token)  # noqa: E731
    return (registry_pb2_grpc.BuilderRegistryServiceStub(ch(reg)), gateway_pb2_grpc.ContributorGatewayServiceStub(ch(gw)),
            scorer_pb2_grpc.LiraScorerServiceStub(ch(sc)))


def test_an_id_with_a_trailing_newline_is_invalid_on_every_service(keyed):
    reg, gw, sc = keyed
    task = reg.CreateTask(registry_pb2.CreateTaskRequest(name="ids", settings=common_pb2.TaskSettings(
        record_shape=[1, 4, 4])), timeout=10).task_id
    calls = {
        "registry GetTask": lambda: reg.GetTask(registry_pb2.GetTaskRequest(task_id=task + "\n"), timeout=10),
        "registry CreateTask owner": lambda: reg.CreateTask(registry_pb2.CreateTaskRequest(
            name="x", owner="acme\n", settings=common_pb2.TaskSettings(record_shape=[1, 4, 4])), timeout=10),
        "gateway GetScores": lambda: gw.GetScores(gateway_pb2.GetScoresRequest(task_id=task + "\n"), timeout=10),
        "gateway GetSubmission": lambda: gw.GetSubmission(gateway_pb2.GetSubmissionRequest(
            submission_id="s-1\n"), timeout=10),
        "gateway StartRound": lambda: gw.StartRound(gateway_pb2.StartRoundRequest(task_id=task + "\n", force=True),
                                                    timeout=10),
        "gateway GetRound": lambda: gw.GetRound(gateway_pb2.GetRoundRequest(round_id="r-1\n"), timeout=10),
        "scorer GetPreparation": lambda: sc.GetPreparation(scorer_pb2.GetPreparationRequest(task_id=task + "\n"),
                                                           timeout=10),
        "scorer StartPreparation": lambda: sc.StartPreparation(scorer_pb2.StartPreparationRequest(
            task_id=task + "\n"), timeout=10),
        "scorer GetScoringResult": lambda: sc.GetScoringResult(scorer_pb2.GetScoringResultRequest(round_id="r-1\n"), timeout=10),
    }
    for name, call in calls.items():
        code, details = _status(call)
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "not a valid id" in details, (name, code, details)


# -- INTERNAL is an incident id, nothing more ---------------------------------------------------------

def _unmapped_rpc_error(*_args, **_kw):
    # Another service's answer nobody mapped with rpc_status.from_rpc_error: its text names an address.
    stub = registry_pb2_grpc.BuilderRegistryServiceStub(grpcutil.make_channel("127.0.0.1:9"))
    stub.ListTasks(registry_pb2.ListTasksRequest(), timeout=0.5)


def _unexpected(*_args, **_kw):
    raise RuntimeError("disk /srv/ftps/secret-path exploded")


@pytest.mark.parametrize("boom", [_unexpected, _unmapped_rpc_error], ids=["exception", "unmapped-rpc-error"])
def test_an_unexpected_error_is_an_incident_id_and_the_log_holds_the_rest(storage_kwargs, serve, monkeypatch,
                                                                          caplog, boom):
    monkeypatch.setattr(Registry, "list_tasks", boom)
    caplog.set_level(logging.ERROR, logger="ftps.common.grpcutil")
    stub = registry_pb2_grpc.BuilderRegistryServiceStub(grpcutil.make_channel(
        serve(registry_server(RegistrySettings(**storage_kwargs)))))
    code, details = _status(lambda: stub.ListTasks(registry_pb2.ListTasksRequest(), timeout=10))
    m = INCIDENT.fullmatch(details)
    assert code == grpc.StatusCode.INTERNAL and m, details
    records = [r for r in caplog.records if m.group(1) in r.getMessage()]
    assert len(records) == 1 and records[0].exc_info, caplog.text
    line = EscapingFormatter(_FORMAT).format(records[0])
    assert f"incident {m.group(1)}: unexpected error in BuilderRegistryServicer.ListTasks" in line
    assert "Traceback (most recent call last):\n" in line  # the traceback keeps its own line breaks
    assert ("secret-path" if boom is _unexpected else "_InactiveRpcError") in line


# -- object store failures ---------------------------------------------------------------------------

def test_object_store_failures_are_unavailable_with_a_fixed_message(s3_endpoint, storage_kwargs, serve):
    host, port = s3_endpoint.split(":")
    proxy = CuttableProxy(host, int(port))
    try:
        kw = dict(storage_kwargs, s3_endpoint=proxy.endpoint)
        # A channel without the clients' retry policy (which would retry each UNAVAILABLE 5 times).
        stub = registry_pb2_grpc.BuilderRegistryServiceStub(grpc.insecure_channel(serve(registry_server(
            RegistrySettings(**kw)))))
        # A task is a database row; what reaches the object store is an upload.
        task = stub.CreateTask(registry_pb2.CreateTaskRequest(
            name="x", settings=common_pb2.TaskSettings(record_shape=[1])), timeout=60)
        blob = b"x = 1\n"
        upload = lambda: stub.UploadBlob(iter([  # noqa: E731
            registry_pb2.UploadBlobRequest(header=registry_pb2.UploadHeader(
                task_id=task.task_id, kind=common_pb2.BLOB_KIND_STRATEGY, size=len(blob),
                sha256=hashlib.sha256(blob).hexdigest())),
            registry_pb2.UploadBlobRequest(chunk=blob)]), timeout=60)
        # The store answers, with an error (its bucket is gone): not INTERNAL with the store's text.
        store = ObjectStore(RegistrySettings(**storage_kwargs))
        store.client.remove_bucket(store.bucket)
        assert _status(upload) == (grpc.StatusCode.UNAVAILABLE, STORE_FAILING)
        store.ensure_bucket()
        assert upload().version == 1
        # The store does not answer at all (after the retries): the endpoint is not in the message.
        proxy.cut()
        assert _status(upload) == (grpc.StatusCode.UNAVAILABLE, STORE_UNREACHABLE)
    finally:
        proxy.close()


# -- messages name no internal service -----------------------------------------------------------------

def test_relayed_answers_do_not_name_the_service_that_gave_them(keyed, caplog):
    _, gw, sc = keyed
    caplog.set_level(logging.DEBUG, logger="ftps.common.rpc_status")
    # The gateway and scorer ask the registry about a task that does not exist; its answer is relayed.
    for call in (lambda: gw.StartRound(gateway_pb2.StartRoundRequest(task_id="t-doesnotexist", force=True),
                                       timeout=10),
                 lambda: sc.StartPreparation(scorer_pb2.StartPreparationRequest(task_id="t-doesnotexist"),
                                             timeout=10)):
        code, details = _status(call)
        assert code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.PERMISSION_DENIED), (code, details)
        assert "registry" not in details.lower(), details
    assert "registry answered" in caplog.text  # the log line keeps the name
    # A dead peer: gRPC's own text names its address; the caller gets a fixed message.
    dead = registry_pb2_grpc.BuilderRegistryServiceStub(grpcutil.make_channel("127.0.0.1:9"))
    with pytest.raises(grpc.RpcError) as e:
        dead.ListTasks(registry_pb2.ListTasksRequest(), timeout=0.5)
    err = from_rpc_error(e.value, context="registry")
    assert isinstance(err, Unavailable) and str(err) == "temporarily unavailable, retry"


def test_not_found_from_another_service_is_relayed_as_its_domain_error():
    class Answer(grpc.RpcError):
        def code(self):
            return grpc.StatusCode.NOT_FOUND

        def details(self):
            return "task t-x not found"

    err = from_rpc_error(Answer(), context="registry")
    assert isinstance(err, NotFound) and str(err) == "task t-x not found"


# -- control characters in log lines ---------------------------------------------------------------

def test_control_characters_from_callers_are_escaped_in_log_lines(storage_kwargs, serve, caplog):
    caplog.set_level(logging.INFO, logger="services.builder_registry.registry")
    stub = registry_pb2_grpc.BuilderRegistryServiceStub(grpcutil.make_channel(
        serve(registry_server(RegistrySettings(**storage_kwargs)))))
    name = "evil\n12:00:00 INFO    ftps.auth: forged line\x1b[31m red\x1b[0m\r\u2028"
    task = stub.CreateTask(registry_pb2.CreateTaskRequest(name=name, settings=common_pb2.TaskSettings(
        record_shape=[1])), timeout=10)
    record = next(r for r in caplog.records if task.task_id in r.getMessage())
    line = EscapingFormatter(_FORMAT).format(record)
    assert "\n" not in line and "\x1b" not in line and "\r" not in line and "\u2028" not in line
    assert "evil\\n12:00:00 INFO    ftps.auth: forged line\\x1b[31m red\\x1b[0m\\r\\u2028" in line


def test_tracebacks_stay_readable_but_carry_no_terminal_escapes():
    try:
        raise ValueError("bad name \x1b[2J")
    except ValueError:
        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed on %s", ("a\nb",), sys.exc_info())
    text = EscapingFormatter(_FORMAT).format(record)
    first, _, rest = text.partition("\n")
    assert first.endswith("failed on a\\nb")
    assert rest.startswith("Traceback (most recent call last):\n") and "\x1b" not in text
    assert "ValueError: bad name \\x1b[2J" in text


def test_the_services_log_through_the_escaping_formatter():
    from ftps.common.log import setup_logging

    root = logging.getLogger()
    before = list(root.handlers)
    level = root.level
    try:
        setup_logging("INFO")
        ours = [h for h in root.handlers if getattr(h, "_ftps", False)]
        assert ours and all(isinstance(h.formatter, EscapingFormatter) for h in ours)
    finally:
        for h in root.handlers[:]:
            if h not in before:
                root.removeHandler(h)
        root.setLevel(level)
