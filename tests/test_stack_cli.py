"""`ftps-stack up` as a user runs it: a separate process, addresses printed, healthy, and a clean
stop on SIGTERM; `ftps-stack token` mints tokens the stack accepts."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import grpc
import pytest

from ftps.common import grpcutil
from ftps.v1 import registry_pb2, registry_pb2_grpc


def test_up_serves_until_sigterm(tmp_path):
    env = dict(os.environ, FTPS_DATA_DIR=str(tmp_path))
    proc = subprocess.Popen([sys.executable, "-m", "stack.cli", "up", "--ephemeral-ports"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        lines = []
        deadline = time.time() + 60
        while time.time() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "Ctrl-C" in line:
                break
        text = "".join(lines)
        addrs = dict(re.findall(r"^\s+(contributor gateway|builder registry|LiRA scorer|fine-tune worker)\s+(\S+)$",
                                text, re.M))
        assert len(addrs) == 4, text
        # Every service's Prometheus /metrics, on a free port, printed with its address.
        metrics = dict(re.findall(r"^\s+(contributor gateway|builder registry|LiRA scorer|fine-tune worker) metrics"
                                  r"\s+(http://\S+/metrics)$", text, re.M))
        assert len(metrics) == 4, text
        # `up` keeps its data in the data dir: SQLite metadata and blob files, no store server.
        assert re.search(rf"metadata \(SQLite\)\s+{re.escape(str(tmp_path))}/metadata.db$", text, re.M), text
        assert re.search(rf"blobs \(files\)\s+{re.escape(str(tmp_path))}/blobs$", text, re.M), text
        assert (tmp_path / "metadata.db").is_file()
        for addr in addrs.values():
            grpcutil.wait_healthy(grpcutil.make_channel(addr), timeout=10)
        web = re.search(r"web client\s+(http://\S+)", text)
        assert web, text
        import urllib.request

        with urllib.request.urlopen(web.group(1), timeout=10) as page:
            assert page.status == 200 and b"FT-PrivacyScore" in page.read()
        for url in metrics.values():
            with urllib.request.urlopen(url, timeout=10) as page:
                assert page.status == 200 and b"ftps_rpc_requests_total" in page.read()
        token = subprocess.run([sys.executable, "-m", "stack.cli", "token", "--role", "builder",
                                "--subject", "acme", "--data-dir", str(tmp_path)],
                               check=True, capture_output=True, text=True).stdout.strip()
        reg = registry_pb2_grpc.BuilderRegistryServiceStub(grpcutil.make_channel(addrs["builder registry"], token=token))
        assert reg.ListTasks(registry_pb2.ListTasksRequest(), timeout=5).tasks == []
        anonymous = registry_pb2_grpc.BuilderRegistryServiceStub(grpcutil.make_channel(addrs["builder registry"]))
        with pytest.raises(grpc.RpcError) as e:
            anonymous.ListTasks(registry_pb2.ListTasksRequest(), timeout=5)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_each_service_has_help():
    for mod in ("services.builder_registry", "services.contributor_gateway", "services.lira_scorer",
                "services.finetune_worker"):
        out = subprocess.run([sys.executable, "-m", mod, "--help"], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and "--listen" in out.stdout and "FTPS_LISTEN" in out.stdout, mod


def test_token_refuses_bad_subject(tmp_path):
    out = subprocess.run([sys.executable, "-m", "stack.cli", "token", "--role", "builder", "--subject", "../x",
                          "--data-dir", str(tmp_path)], capture_output=True, text=True)
    assert out.returncode == 1 and out.stderr.strip().startswith("ftps-stack: error:")
