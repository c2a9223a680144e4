"""Offline checks of the deployment: deploy/k8s and deploy/docker.

Every overlay (cpu, gpu), with and without the network-policies component, renders with kustomize
(``kubectl kustomize``, or a standalone ``kustomize build``) and validates against the Kubernetes
API schemas with ``kubernetes-validate --strict``. On the rendered objects: the env vars are the
services' settings and every setting without a safe default in a pod is set; addresses name the
right Services and ports; every pod is locked down and probed over gRPC; workers scale on their
own; registry, gateway and scorer run 2 replicas, each reading its own database from a Secret after
a migrate initContainer; the bundled PostgreSQL's init script gives each service its database (run
against a real server); the NetworkPolicies allow exactly the data flow.
"""

from __future__ import annotations

import base64
import importlib
import importlib.util
import inspect
import ipaddress
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = ("cpu", "gpu")
VARIANTS = [(o, p) for o in OVERLAYS for p in (True, False)]
# The oldest Kubernetes we claim (native gRPC probes are GA since 1.27), and the newest schemas.
OLDEST_K8S = "1.29"
# FTPS_* variables read outside the Settings classes, and who reads them.
ENGINE_ENV = {"FTPS_TORCH_THREADS": ROOT / "ftps" / "ml" / "engine.py"}
SERVICE_PORTS = {"contributor-gateway": 50051, "builder-registry": 50052, "lira-scorer": 50053,
                 "finetune-worker": 50054}
WORKLOADS = ("Deployment", "StatefulSet", "Job")
# The services that keep metadata in a database, and their key in the Secret ftps-database.
STATEFUL = {"builder-registry": "registry-url", "contributor-gateway": "gateway-url", "lira-scorer": "scorer-url"}


def _renderer() -> list[str] | None:
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    return None


RENDER = _renderer()
needs_renderer = pytest.mark.skipif(
    RENDER is None, reason="no kustomize renderer: install kubectl (it embeds kustomize) or kustomize")


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> dict[tuple[str, bool], list[dict]]:
    """(overlay, with network policies) -> the rendered objects. The overlays include the
    component; the variants without it are rendered from a copy with the component removed."""
    copy = tmp_path_factory.mktemp("k8s") / "k8s"
    shutil.copytree(K8S, copy)
    out = {}
    for overlay, policies in VARIANTS:
        root = K8S
        if not policies:
            root = copy
            path = copy / "overlays" / overlay / "kustomization.yaml"
            kustomization = yaml.safe_load(path.read_text())
            components = kustomization.pop("components")
            assert components == ["../../components/network-policies", "../../components/autoscale-on-pending"]
            kustomization["components"] = components[1:]
            path.write_text(yaml.safe_dump(kustomization))
        proc = subprocess.run([*RENDER, str(root / "overlays" / overlay)], capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 0, f"{' '.join(RENDER)} overlays/{overlay} failed:\n{proc.stderr}"
        out[(overlay, policies)] = [d for d in yaml.safe_load_all(proc.stdout) if d]
    return out


def _one(docs, kind, name):
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def _pods(docs):
    """(workload, pod template spec, pod labels) of every Deployment, StatefulSet and Job."""
    for d in docs:
        if d["kind"] in WORKLOADS:
            t = d["spec"]["template"]
            yield d, t["spec"], t["metadata"].get("labels", {})


def _service_containers(docs):
    """(workload name, container, settings class) of every container running ``python -m services.X``."""
    for d, spec, _ in _pods(docs):
        for c in spec["containers"]:
            cmd = c.get("command", [])
            if cmd[:2] == ["python", "-m"] and cmd[2].startswith("services."):
                yield d["metadata"]["name"], c, _settings_class(cmd[2])


def _migrate_containers(docs):
    """(workload name, init container, settings class) of every initContainer running ``python -m services.X``."""
    for d, spec, _ in _pods(docs):
        for c in spec.get("initContainers", []):
            cmd = c.get("command", [])
            if cmd[:2] == ["python", "-m"] and cmd[2].startswith("services."):
                yield d["metadata"]["name"], c, _settings_class(cmd[2])


def _secret_value(docs, secret_key_ref: dict) -> str:
    secret = _one(docs, "Secret", secret_key_ref["name"])
    return base64.b64decode(secret["data"][secret_key_ref["key"]]).decode()


def _env_ref(container, name: str) -> dict:
    """The valueFrom of the container's env var ``name``."""
    found = [e["valueFrom"] for e in container.get("env", []) if e["name"] == name and "valueFrom" in e]
    assert len(found) == 1, f"{container['name']}: {name} is not set once from a reference"
    return found[0]


def _settings_class(module: str):
    from ftps.common.settings import CommonSettings

    config = importlib.import_module(f"{module}.config")
    classes = [c for _, c in inspect.getmembers(config, inspect.isclass)
               if issubclass(c, CommonSettings) and c.__module__ == config.__name__]
    assert len(classes) == 1, f"{module}.config should define one Settings class, found {classes}"
    return classes[0]


def _env(docs, container) -> dict[str, object]:
    """Every env var the container gets -> its literal value, or ("secret"|"field", ref)."""
    env: dict[str, object] = {}
    for src in container.get("envFrom", []):
        assert set(src) <= {"configMapRef", "secretRef"}, src
        if "configMapRef" in src:
            data = _one(docs, "ConfigMap", src["configMapRef"]["name"]).get("data", {})
        else:
            data = {k: ("secret", src["secretRef"]["name"]) for k in
                    _one(docs, "Secret", src["secretRef"]["name"]).get("data", {})}
        env.update(data)
    for e in container.get("env", []):
        if "value" in e:
            env[e["name"]] = e["value"]
            continue
        ref = e["valueFrom"]
        if "secretKeyRef" in ref:
            secret = _one(docs, "Secret", ref["secretKeyRef"]["name"])
            assert ref["secretKeyRef"]["key"] in secret.get("data", {}), ref
            env[e["name"]] = ("secret", ref["secretKeyRef"]["name"])
        elif "configMapKeyRef" in ref:
            env[e["name"]] = _one(docs, "ConfigMap", ref["configMapKeyRef"]["name"])["data"][
                ref["configMapKeyRef"]["key"]]
        else:
            env[e["name"]] = ("field", ref)
    return env


def _grpc_port(container) -> int:
    ports = [p["containerPort"] for p in container.get("ports", []) if p.get("name") == "grpc"]
    assert len(ports) == 1, f"container {container['name']} needs one port named grpc"
    return ports[0]


# -- rendering and schema validation -----------------------------------------------------------

@needs_renderer
@pytest.mark.parametrize("overlay,policies", VARIANTS,
                         ids=[f"{o}-{'policies' if p else 'no-policies'}" for o, p in VARIANTS])
def test_overlay_renders_and_validates_strictly(rendered, tmp_path, overlay, policies):
    pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")
    from kubernetes_validate.utils import latest_version

    docs = rendered[(overlay, policies)]
    path = tmp_path / f"{overlay}.yaml"
    path.write_text(yaml.safe_dump_all(docs))
    proc = subprocess.run([sys.executable, "-m", "kubernetes_validate", "--strict", "--quiet",
                           "-k", OLDEST_K8S, "-k", latest_version(), str(path)],
                          capture_output=True, text=True, timeout=300)
    # WARN is how it reports a kind it has no schema for (a typo'd kind or apiVersion): fail too.
    assert proc.returncode == 0 and not proc.stdout.strip(), proc.stdout + proc.stderr
    kinds = {d["kind"] for d in docs}
    assert {"Namespace", "ServiceAccount", "ConfigMap", "Secret", "Service", "Deployment", "StatefulSet",
            "Job", "HorizontalPodAutoscaler", "PodDisruptionBudget"} <= kinds
    assert ("NetworkPolicy" in kinds) == policies
    assert {d["metadata"].get("namespace") for d in docs if d["kind"] != "Namespace"} == {"ftps"}


# -- settings ------------------------------------------------------------------------------------

@needs_renderer
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_manifest_env_is_the_services_settings_and_sets_every_required_one(rendered, overlay):
    docs = rendered[(overlay, True)]
    seen = set()
    for workload, container, settings in _service_containers(docs):
        seen.add(workload)
        fields = settings.model_fields
        env = _env(docs, container)
        known = {"FTPS_" + name.upper() for name in fields} | set(ENGINE_ENV)
        unknown = sorted(set(env) - known)
        assert not unknown, f"{workload}: {unknown} are not settings of {settings.__name__}"

        # Defaults that are wrong in a pod: loopback addresses, and the development credentials.
        required = {name for name, f in fields.items()
                    if isinstance(f.default, str) and ("127.0.0.1" in f.default or "localhost" in f.default)}
        required |= {"s3_access_key", "s3_secret_key"}
        assert {"listen", "s3_endpoint"} <= required
        missing = sorted("FTPS_" + name.upper() for name in required if "FTPS_" + name.upper() not in env)
        assert not missing, f"{workload}: {missing} must be set in a pod"
        assert isinstance(env["FTPS_S3_ACCESS_KEY"], tuple) and isinstance(env["FTPS_S3_SECRET_KEY"], tuple), \
            f"{workload}: S3 credentials must come from a Secret"
        if "auth_key_file" in fields:  # with neither key set, the service refuses to start
            assert "FTPS_AUTH_KEY_FILE" in env or "FTPS_AUTH_KEY" in env, f"{workload}: no auth key"
            assert "FTPS_AUTH_DISABLED" not in env, f"{workload}: auth switched off in a manifest"
            assert not isinstance(env.get("FTPS_AUTH_KEY"), str), f"{workload}: the auth key must come from a Secret"
            if "FTPS_AUTH_KEY_FILE" in env:
                mount = Path(env["FTPS_AUTH_KEY_FILE"]).parent.as_posix()
                assert any(m["mountPath"] == mount for m in container.get("volumeMounts", [])), \
                    f"{workload}: nothing mounted at {mount}"
                spec = next(s for d, s, _ in _pods(docs) if d["metadata"]["name"] == workload)
                volume = next(m["name"] for m in container["volumeMounts"] if m["mountPath"] == mount)
                assert any(v["name"] == volume and "secret" in v for v in spec.get("volumes", [])), \
                    f"{workload}: the auth key at {mount} is not from a Secret"
        # Every value parses as the setting's type (what the service does at start).
        literal = {name: env["FTPS_" + name.upper()] for name in fields
                   if isinstance(env.get("FTPS_" + name.upper()), str)}
        settings(**literal)

        assert env["FTPS_LISTEN"] == f"0.0.0.0:{_grpc_port(container)}", workload
    assert seen == set(SERVICE_PORTS)
    for workload, container, settings in _migrate_containers(docs):
        env = _env(docs, container)
        known = {"FTPS_" + name.upper() for name in settings.model_fields}
        unknown = sorted(set(env) - known)
        assert not unknown, f"{workload}/{container['name']}: {unknown} are not settings of {settings.__name__}"
        settings(**{k.removeprefix("FTPS_").lower(): v for k, v in env.items() if isinstance(v, str)})
    for name, path in ENGINE_ENV.items():
        assert name in path.read_text(), f"{name} is no longer read by {path}: drop it from ENGINE_ENV"


@needs_renderer
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_addresses_name_the_services_that_serve_them(rendered, overlay):
    docs = rendered[(overlay, True)]
    pods = {d["metadata"]["name"]: (spec, labels) for d, spec, labels in _pods(docs)}

    def serves(address: str, workload: str, *, headless: bool = False) -> None:
        host, _, port = address.removeprefix("dns:///").rpartition(":")
        name = host.split(".")[0]
        if "." in host:
            assert host == f"{name}.ftps.svc.cluster.local", address
        svc = _one(docs, "Service", name)
        assert (svc["spec"].get("clusterIP") == "None") == headless, f"{name}: headless={headless}"
        spec, labels = pods[workload]
        assert svc["spec"]["selector"].items() <= labels.items(), f"Service {name} does not select {workload}"
        ports = [p for p in svc["spec"]["ports"] if p["port"] == int(port)]
        assert ports, f"Service {name} has no port {port}"
        container_ports = {p["containerPort"] for c in spec["containers"] for p in c.get("ports", [])}
        assert ports[0]["targetPort"] in container_ports

    for workload, container, _ in _service_containers(docs):
        env = _env(docs, container)
        serves(env["FTPS_S3_ENDPOINT"], "minio")
        if "FTPS_REGISTRY_ADDR" in env:
            serves(env["FTPS_REGISTRY_ADDR"], "builder-registry")
        if "FTPS_SCORER_ADDR" in env:
            serves(env["FTPS_SCORER_ADDR"], "lira-scorer")
        if "FTPS_WORKER_ADDRS" in env:
            # One dns:/// target over the headless Service: the client balances over every pod.
            assert env["FTPS_WORKER_ADDRS"].startswith("dns:///") and "," not in env["FTPS_WORKER_ADDRS"]
            serves(env["FTPS_WORKER_ADDRS"], "finetune-worker", headless=True)
        svc = _one(docs, "Service", workload)
        assert [p["name"] for p in svc["spec"]["ports"]] == ["grpc"]
        assert svc["spec"]["ports"][0]["port"] == SERVICE_PORTS[workload]


# -- pods ----------------------------------------------------------------------------------------

@needs_renderer
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_pod_is_locked_down(rendered, overlay):
    docs = rendered[(overlay, True)]
    accounts = {d["metadata"]["name"] for d in docs if d["kind"] == "ServiceAccount"}
    for d, spec, labels in _pods(docs):
        name = d["metadata"]["name"]
        assert labels.get("app.kubernetes.io/part-of") == "ft-privacyscore", name
        assert spec["serviceAccountName"] in accounts and spec["automountServiceAccountToken"] is False, name
        pod_sc = spec.get("securityContext", {})
        assert pod_sc.get("runAsNonRoot") is True and pod_sc.get("runAsUser", 0) > 0, name
        tmp_volumes = {v["name"] for v in spec.get("volumes", []) if "emptyDir" in v}
        for c in spec["containers"] + spec.get("initContainers", []):
            sc = c.get("securityContext", {})
            seccomp = sc.get("seccompProfile") or pod_sc.get("seccompProfile")
            assert seccomp == {"type": "RuntimeDefault"}, f"{name}/{c['name']}: seccomp {seccomp}"
            assert sc.get("allowPrivilegeEscalation") is False, f"{name}/{c['name']}"
            assert sc.get("readOnlyRootFilesystem") is True, f"{name}/{c['name']}"
            assert "ALL" in sc.get("capabilities", {}).get("drop", []), f"{name}/{c['name']}"
            assert not sc.get("privileged") and not sc.get("capabilities", {}).get("add"), f"{name}/{c['name']}"
            res = c.get("resources", {})
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(res.get(kind, {})), f"{name}/{c['name']}: {kind}"
            assert any(m["mountPath"] == "/tmp" and m["name"] in tmp_volumes
                       for m in c.get("volumeMounts", [])), f"{name}/{c['name']}: no emptyDir at /tmp"


@needs_renderer
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_services_have_native_grpc_probes_on_their_port(rendered, overlay):
    docs = rendered[(overlay, True)]
    for workload, container, settings in _service_containers(docs):
        port = _grpc_port(container)
        assert port == SERVICE_PORTS[workload]
        service = {"builder-registry": "ftps.v1.BuilderRegistryService", "contributor-gateway": "ftps.v1.ContributorGatewayService",
                   "lira-scorer": "ftps.v1.LiraScorerService", "finetune-worker": "ftps.v1.FinetuneWorkerService"}[workload]
        assert container["readinessProbe"]["grpc"] == {"port": port, "service": service}, workload
        assert container["livenessProbe"]["grpc"]["port"] == port, workload
        assert container["startupProbe"]["grpc"]["port"] == port, workload


@needs_renderer
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_workers_scale_on_their_own(rendered, overlay):
    docs = rendered[(overlay, True)]
    worker = _one(docs, "Deployment", "finetune-worker")
    assert "replicas" not in worker["spec"], "the HPA owns the worker count"
    pod_labels = worker["spec"]["template"]["metadata"]["labels"]
    hpa = _one(docs, "HorizontalPodAutoscaler", "finetune-worker")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": "finetune-worker"}
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    pdb = _one(docs, "PodDisruptionBudget", "finetune-worker")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    # With one dns:/// target the scorer keeps FTPS_JOBS_PER_WORKER jobs in flight in all: fewer
    # than the pods the HPA may start would leave some idle.
    scorer = next(c for w, c, _ in _service_containers(docs) if w == "lira-scorer")
    assert int(_env(docs, scorer)["FTPS_JOBS_PER_WORKER"]) >= hpa["spec"]["maxReplicas"]
    # torch's threads follow the worker's CPU limit.
    env = _env(docs, worker["spec"]["template"]["spec"]["containers"][0])
    assert env["FTPS_TORCH_THREADS"] == ("field", {"resourceFieldRef": {
        "containerName": "server", "resource": "limits.cpu", "divisor": "1"}})


@needs_renderer
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_stateful_services_replicate_and_migrate_their_own_database_first(rendered, overlay):
    from ftps.common.settings import DatabaseSettings

    docs = rendered[(overlay, True)]
    servers = {w: (c, s) for w, c, s in _service_containers(docs)}
    migrates = {w: (c, s) for w, c, s in _migrate_containers(docs)}
    assert set(migrates) == set(STATEFUL), "only the registry, gateway and scorer have a database"
    urls = {}
    for name, key in STATEFUL.items():
        d = _one(docs, "Deployment", name)
        pod_labels = d["spec"]["template"]["metadata"]["labels"]
        # Replicated, and a deploy never takes the last ready replica away.
        assert d["spec"]["replicas"] == 2, name
        assert d["spec"]["strategy"] == {"type": "RollingUpdate",
                                         "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}}, name
        pdbs = [p for p in docs if p["kind"] == "PodDisruptionBudget"
                and p["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()]
        assert len(pdbs) == 1 and pdbs[0]["spec"] == {
            "minAvailable": 1, "selector": {"matchLabels": {"app.kubernetes.io/name": name}}}, name

        server, settings = servers[name]
        assert issubclass(settings, DatabaseSettings), f"{settings.__name__} does not read FTPS_DATABASE_URL"
        ref = _env_ref(server, "FTPS_DATABASE_URL")
        assert set(ref) == {"secretKeyRef"} and ref["secretKeyRef"]["key"] == key, f"{name}: {ref}"
        assert ref["secretKeyRef"]["name"].startswith("ftps-database"), name
        env = _env(docs, server)
        assert env["FTPS_DB_MIGRATE"] == "false", f"{name}: the initContainer migrates, not each replica"
        assert "FTPS_MIGRATE_ONLY" not in env, name

        # The initContainer: the same image and module, the same database, migrations only.
        migrate, _ = migrates[name]
        assert migrate["image"] == server["image"], name
        assert migrate["command"] == [*server["command"], "--migrate-only"], name
        assert _env_ref(migrate, "FTPS_DATABASE_URL") == ref, name
        assert _env(docs, migrate).get("FTPS_DB_MIGRATE") != "false", name
        urls[name] = _secret_value(docs, ref["secretKeyRef"])

    # The scorer's replicas lease rounds, each under its pod's name.
    scorer, settings = servers["lira-scorer"]
    assert _env_ref(scorer, "FTPS_REPLICA_ID") == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert float(_env(docs, scorer)["FTPS_ROUND_LEASE_S"]) > 0
    for name in set(servers) - {"lira-scorer"}:
        assert "FTPS_REPLICA_ID" not in _env(docs, servers[name][0]), name

    # The base's URLs: a database and a role per service, on the bundled PostgreSQL.
    from sqlalchemy.engine import make_url

    parsed = {name: make_url(url) for name, url in urls.items()}
    for name, url in parsed.items():
        assert url.drivername == "postgresql+psycopg" and (url.host, url.port) == ("postgres", 5432), name
    assert len({u.database for u in parsed.values()}) == len({u.username for u in parsed.values()}) == 3
    pg = _one(docs, "StatefulSet", "postgres")
    svc = _one(docs, "Service", "postgres")
    assert svc["spec"]["selector"].items() <= pg["spec"]["template"]["metadata"]["labels"].items()
    assert [p["targetPort"] for p in svc["spec"]["ports"] if p["port"] == 5432] == [5432]


@needs_renderer
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_bundled_postgres_is_pinned_persistent_and_probed(rendered, overlay):
    docs = rendered[(overlay, True)]
    pg = _one(docs, "StatefulSet", "postgres")
    assert pg["spec"]["replicas"] == 1
    spec = pg["spec"]["template"]["spec"]
    [c] = spec["containers"]
    image, _, tag = c["image"].partition(":")
    assert image == "postgres" and tag.startswith("16.") and tag[3:4].isdigit(), c["image"]
    [claim] = pg["spec"]["volumeClaimTemplates"]
    data = next(m for m in c["volumeMounts"] if m["name"] == claim["metadata"]["name"])
    env = {e["name"]: e for e in c["env"]}
    assert env["PGDATA"]["value"].startswith(data["mountPath"] + "/"), "PGDATA: a subdirectory of the volume"
    assert set(env["POSTGRES_PASSWORD"]["valueFrom"]) == {"secretKeyRef"}
    # The init script comes from a ConfigMap, executable, and reads the services' own URLs.
    init = next(m for m in c["volumeMounts"] if m["mountPath"] == "/docker-entrypoint-initdb.d")
    volume = next(v for v in spec["volumes"] if v["name"] == init["name"])
    assert volume["configMap"]["defaultMode"] & 0o111
    for key in STATEFUL.values():
        assert any(e.get("valueFrom", {}).get("secretKeyRef", {}).get("key") == key for e in env.values()), key
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert "pg_isready" in c[probe]["exec"]["command"], probe


@needs_renderer
def test_postgres_init_script_gives_each_service_its_own_database(rendered, pg_server, tmp_path):
    """The init script, run against a real server as the image's entrypoint runs it: a role and a
    database per URL of ftps-database; each role can create tables in its database and cannot
    connect to another service's; each migrate initContainer's command, as that role, applies its
    service's migrations."""
    import psycopg

    docs = rendered[("cpu", True)]
    pg = _one(docs, "StatefulSet", "postgres")
    c = pg["spec"]["template"]["spec"]["containers"][0]
    volume = next(v for v in pg["spec"]["template"]["spec"]["volumes"] if v["name"] == "init")
    scripts = _one(docs, "ConfigMap", volume["configMap"]["name"])["data"]
    env = {"PATH": "/usr/bin:/bin", "PGHOST": "127.0.0.1", "PGPORT": str(pg_server.port),
           "POSTGRES_USER": "ftps"}  # the test server's superuser (trust)
    for e in c["env"]:
        if e["name"].endswith("_DATABASE_URL"):
            env[e["name"]] = _secret_value(docs, e["valueFrom"]["secretKeyRef"])
    assert len(env) == 4 + 3
    for name, text in sorted(scripts.items()):
        (tmp_path / name).write_text(text)
        proc = subprocess.run(["bash", str(tmp_path / name)], env=env, capture_output=True, text=True,
                              timeout=60)
        assert proc.returncode == 0, proc.stdout + proc.stderr

    from sqlalchemy.engine import make_url

    urls = [make_url(v) for k, v in env.items() if k.endswith("_DATABASE_URL")]
    superuser = f"host=127.0.0.1 port={pg_server.port} user=ftps dbname=postgres"
    with psycopg.connect(superuser) as conn:
        for url in urls:
            owner, has_password = conn.execute(
                "SELECT pg_get_userbyid(d.datdba), a.rolpassword IS NOT NULL FROM pg_database d "
                "JOIN pg_authid a ON a.rolname = %s WHERE d.datname = %s", (url.username, url.database)).fetchone()
            assert owner == url.username and has_password, url.database
    for url in urls:
        with psycopg.connect(f"host=127.0.0.1 port={pg_server.port} user={url.username} dbname={url.database}",
                             autocommit=True) as conn:
            conn.execute("CREATE TABLE probe (id integer PRIMARY KEY)")
        for other in urls:
            if other.database != url.database:
                with pytest.raises(psycopg.OperationalError, match="permission denied"):
                    psycopg.connect(f"host=127.0.0.1 port={pg_server.port} user={url.username} "
                                    f"dbname={other.database}").close()

    # The initContainers, as the pods run them (their ConfigMap env too), against this server.
    by_key = {e["valueFrom"]["secretKeyRef"]["key"]: make_url(env[e["name"]]) for e in c["env"]
              if e["name"].endswith("_DATABASE_URL")}
    for workload, container, _ in _migrate_containers(docs):
        url = by_key[_env_ref(container, "FTPS_DATABASE_URL")["secretKeyRef"]["key"]]
        run_env = {k: v for k, v in _env(docs, container).items() if isinstance(v, str)}
        run_env["FTPS_DATABASE_URL"] = url.set(host="127.0.0.1", port=pg_server.port).render_as_string(
            hide_password=False)
        run_env["PATH"] = "/usr/bin:/bin"
        cmd = [sys.executable, *container["command"][1:]]
        proc = subprocess.run(cmd, env=run_env, cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, f"{workload}: {proc.stderr[-2000:]}"
        with psycopg.connect(f"host=127.0.0.1 port={pg_server.port} user={url.username} dbname={url.database}") as conn:
            tables = {r[0] for r in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}
        assert any(t.startswith("alembic_version_") for t in tables), f"{workload}: {sorted(tables)}"


@needs_renderer
def test_external_database_component_drops_the_bundled_one(tmp_path):
    """The documented site overlay for a managed PostgreSQL renders and validates: no bundled database,
    the services read the replaced URLs, and egress-to-database admits the database's address."""
    pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")
    site = tmp_path / "site"
    shutil.copytree(K8S, tmp_path / "deploy" / "k8s")
    site.mkdir()
    (site / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization", "namespace": "ftps",
        "resources": ["../deploy/k8s/overlays/cpu"],
        "components": ["../deploy/k8s/components/external-database"],
        "secretGenerator": [{"name": "ftps-database", "behavior": "replace", "literals": [
            f"{key}=postgresql+psycopg://{key[:-4]}:pw@db.example.com:5432/{key[:-4]}?sslmode=require"
            for key in STATEFUL.values()]}],
        "patches": [{"target": {"kind": "NetworkPolicy", "name": "egress-to-database"},
                     "patch": yaml.safe_dump([{"op": "replace", "path": "/spec/egress/0/to",
                                               "value": [{"ipBlock": {"cidr": "10.20.0.0/24"}}]}])}],
    }))
    proc = subprocess.run([*RENDER, str(site)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    docs = [d for d in yaml.safe_load_all(proc.stdout) if d]
    assert not [d for d in docs if d["kind"] != "NetworkPolicy" and "postgres" in d["metadata"]["name"]]
    for workload, container, _ in [*_service_containers(docs), *_migrate_containers(docs)]:
        if workload in STATEFUL:
            url = _secret_value(docs, _env_ref(container, "FTPS_DATABASE_URL")["secretKeyRef"])
            assert "@db.example.com:5432/" in url, workload
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
    db = {"ip": "10.20.0.7"}
    for name in STATEFUL:
        labels = _one(docs, "Deployment", name)["spec"]["template"]["metadata"]["labels"]
        assert _allowed(policies, {"labels": labels}, "Egress", db, 5432, "TCP"), name
    labels = _one(docs, "Deployment", "finetune-worker")["spec"]["template"]["metadata"]["labels"]
    assert not _allowed(policies, {"labels": labels}, "Egress", db, 5432, "TCP")
    path = tmp_path / "site.yaml"
    path.write_text(proc.stdout)
    check = subprocess.run([sys.executable, "-m", "kubernetes_validate", "--strict", "--quiet", "-k", OLDEST_K8S,
                            str(path)], capture_output=True, text=True, timeout=300)
    assert check.returncode == 0 and not check.stdout.strip(), check.stdout + check.stderr


@needs_renderer
def test_gpu_overlay_runs_workers_on_gpus_and_cpu_overlay_does_not(rendered):
    for overlay in OVERLAYS:
        docs = rendered[(overlay, True)]
        spec = _one(docs, "Deployment", "finetune-worker")["spec"]["template"]["spec"]
        c = spec["containers"][0]
        env = _env(docs, c)
        gpu = overlay == "gpu"
        assert env["FTPS_DEVICE"] == ("cuda" if gpu else "cpu")
        assert ("nvidia.com/gpu" in c["resources"]["limits"]) == gpu
        assert ("cuda" in c["image"]) == gpu
        if gpu:
            assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
            assert spec["nodeSelector"] and any(t["key"] == "nvidia.com/gpu" for t in spec["tolerations"])
            # The overlay and the CUDA image run the engine with the same settings (issue 18).
            image_env = _dockerfile_env(ROOT / "deploy" / "docker" / "Dockerfile.cuda")
            for key in ("FTPS_DEVICE", "FTPS_ENGINE", "FTPS_PRECISION"):
                assert env[key] == image_env[key], key
        # Only the worker image differs between the overlays.
        for w, other, _ in _service_containers(docs):
            if w != "finetune-worker":
                assert other["image"].split(":")[0].endswith("ft-privacyscore")


# -- network policies ----------------------------------------------------------------------------

def _selects(selector: dict | None, labels: dict) -> bool:
    if selector is None:
        return True
    assert set(selector) <= {"matchLabels", "matchExpressions"}, selector
    if not selector.get("matchLabels", {}).items() <= labels.items():
        return False
    for e in selector.get("matchExpressions", []):
        op, key, values = e["operator"], e["key"], e.get("values", [])
        ok = {"In": key in labels and labels[key] in values,
              "NotIn": key not in labels or labels[key] not in values,
              "Exists": key in labels, "DoesNotExist": key not in labels}[op]
        if not ok:
            return False
    return True


def _peer_matches(rule_peer: dict, peer: dict, policy_ns: str) -> bool:
    if "ipBlock" in rule_peer:
        if peer.get("ip") is None:
            return False
        block = rule_peer["ipBlock"]
        ip = ipaddress.ip_address(peer["ip"])
        return ip in ipaddress.ip_network(block["cidr"]) and not any(
            ip in ipaddress.ip_network(x) for x in block.get("except", []))
    if peer.get("ip") is not None:
        return False
    if "namespaceSelector" in rule_peer:
        ns_ok = _selects(rule_peer["namespaceSelector"], peer["ns_labels"])
    else:
        ns_ok = peer["ns"] == policy_ns
    return ns_ok and _selects(rule_peer.get("podSelector", {}), peer["labels"])


def _allowed(policies: list[dict], pod: dict, direction: str, peer: dict, port: int, protocol: str) -> bool:
    """Kubernetes NetworkPolicy semantics for ``pod`` (in namespace ftps) and one peer."""
    key, peers_key = ("ingress", "from") if direction == "Ingress" else ("egress", "to")
    applicable = [p for p in policies if direction in p["spec"]["policyTypes"]
                  and _selects(p["spec"]["podSelector"], pod["labels"])]
    if not applicable:
        return True
    for p in applicable:
        for rule in p["spec"].get(key) or []:
            peers = rule.get(peers_key) or []
            if peers and not any(_peer_matches(rp, peer, p["metadata"]["namespace"]) for rp in peers):
                continue
            ports = rule.get("ports") or []
            if not ports or any(rp.get("port") in (None, port) and rp.get("protocol", "TCP") == protocol
                                for rp in ports):
                return True
    return False


@needs_renderer
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policies_allow_exactly_the_data_flow(rendered, overlay):
    docs = rendered[(overlay, True)]
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
    ns_labels = {"kubernetes.io/metadata.name": "ftps"}
    pods = {d["metadata"]["name"]: {"ns": "ftps", "ns_labels": ns_labels, "labels": labels,
                                    "ports": {p["containerPort"] for c in spec["containers"]
                                              for p in c.get("ports", [])}}
            for d, spec, labels in _pods(docs)}
    assert set(pods) == {"builder-registry", "contributor-gateway", "lira-scorer", "finetune-worker",
                         "minio", "minio-setup", "postgres"}

    def ours(p: dict) -> bool:  # policies bind pods of this namespace only
        return p.get("ip") is None and p["ns"] == "ftps"

    def connects(src: dict, dst: dict, port: int, protocol: str = "TCP") -> bool:
        return ((not ours(src) or _allowed(policies, src, "Egress", dst, port, protocol))
                and (not ours(dst) or _allowed(policies, dst, "Ingress", src, port, protocol)))

    flows = {(s, d, port) for s in pods for d in pods for port in pods[d]["ports"]
             if connects(pods[s], pods[d], port)}
    expected = {("contributor-gateway", "builder-registry", 50052), ("contributor-gateway", "lira-scorer", 50053),
                ("lira-scorer", "builder-registry", 50052), ("lira-scorer", "finetune-worker", 50054),
                ("builder-registry", "finetune-worker", 50054)}  # upload checks
    expected |= {(s, "minio", 9000) for s in pods if s != "postgres"}  # the database keeps no blobs
    expected |= {(s, "postgres", 5432) for s in STATEFUL}  # each reaches its own database there
    assert flows == expected, f"unexpected: {sorted(flows - expected)}; missing: {sorted(expected - flows)}"

    dns = {"ns": "kube-system", "ns_labels": {"kubernetes.io/metadata.name": "kube-system"},
           "labels": {"k8s-app": "kube-dns"}}
    internet = {"ip": "93.184.216.34"}
    for name, pod in pods.items():
        assert connects(pod, dns, 53, "UDP") and connects(pod, dns, 53, "TCP"), f"{name} cannot resolve names"
        for port in (80, 443, 53):
            assert not connects(pod, internet, port), f"{name} reaches the internet on {port}"
    # Workers (untrusted strategy code) reach nothing but MinIO and DNS.
    worker = pods["finetune-worker"]
    assert not any(connects(worker, pods[d], p) for d in pods if d != "minio" for p in pods[d]["ports"])

    client = {"ns": "ftps", "ns_labels": ns_labels, "labels": {"ftps.io/client": "true"}}
    ingress_ns = {"ns": "ingress", "ns_labels": {"ftps.io/clients": "true"}, "labels": {}}
    stranger = {"ns": "other", "ns_labels": {}, "labels": {}}
    for name in ("contributor-gateway", "builder-registry", "lira-scorer"):
        port = SERVICE_PORTS[name]
        assert connects(client, pods[name], port) and connects(ingress_ns, pods[name], port), name
        assert not connects(stranger, pods[name], port) and not connects(internet, pods[name], port), name
    for name, port in (("finetune-worker", 50054), ("minio", 9000), ("postgres", 5432)):
        assert not any(connects(p, pods[name], port) for p in (client, ingress_ns, stranger, internet)), name


# -- metrics, autoscaling on pending work, dashboard and alerts --------------------------------

OBSERVABILITY = ROOT / "deploy" / "observability"
AUTOSCALE = K8S / "components" / "autoscale-on-pending"
METRICS_PORT = 9464
# The services' metric names (ftps/common/metrics.py) -> their labels; histograms also have
# _bucket/_sum/_count series. `up` is Prometheus' own.
METRICS = {
    "ftps_rpc_requests_total": {"service", "method", "code"}, "ftps_rpc_duration_seconds": {"service", "method"},
    "ftps_gateway_pending_records": {"task"}, "ftps_gateway_pending_submissions": {"task"},
    "ftps_gateway_submits_total": {"result"}, "ftps_scorer_rounds": {"state"},
    "ftps_scorer_rounds_finished_total": {"state"}, "ftps_scorer_round_duration_seconds": set(),
    "ftps_scorer_jobs_pending": set(), "ftps_scorer_jobs_in_flight": set(),
    "ftps_scorer_jobs_pending_per_worker": set(), "ftps_scorer_jobs_retried_total": set(),
    "ftps_scorer_jobs_failed_total": set(), "ftps_scorer_job_duration_seconds": set(),
    "ftps_scorer_models_finetuned_total": set(), "ftps_scorer_preparations_total": {"result"},
    "ftps_worker_jobs_in_flight": set(), "ftps_worker_sandbox_children": set(),
    "ftps_worker_models_finetuned_total": set(), "ftps_worker_gpu_memory_used_bytes": set(),
    "ftps_worker_gpu_utilization_ratio": set(),
}
HISTOGRAMS = {"ftps_rpc_duration_seconds", "ftps_scorer_round_duration_seconds", "ftps_scorer_job_duration_seconds"}
# Labels Prometheus' pod discovery adds, and a histogram's bucket bound.
TARGET_LABELS = {"namespace", "pod", "job", "instance", "le"}
PROMQL_WORDS = {
    "sum", "avg", "min", "max", "count", "by", "without", "on", "ignoring", "group_left", "group_right",
    "and", "or", "unless", "rate", "irate", "increase", "delta", "histogram_quantile", "absent",
    "avg_over_time", "max_over_time", "min_over_time", "clamp_min", "topk", "bool", "offset", "time",
    "vector", "scalar", "label_values"}


def _promql_names(expr: str) -> tuple[set[str], set[str]]:
    """(metric names, label names) an expression uses: strings, durations and Grafana variables
    dropped; label names from matchers and by/without/on/ignoring lists."""
    import re

    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\$\{?\w+\}?", "", text)
    text = re.sub(r"\[[^\]]*\]", "", text)
    assert text.count("(") == text.count(")") and text.count("{") == text.count("}"), expr
    labels = set()
    for group in re.findall(r"\{([^}]*)\}", text):
        labels |= set(re.findall(r"([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=)", group))
    for group in re.findall(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)", text):
        labels |= {x.strip() for x in group.split(",") if x.strip()}
    text = re.sub(r"\{[^}]*\}", "", text)
    text = re.sub(r"\b(?:by|without|on|ignoring)\s*\([^)]*\)", "", text)
    words = set(re.findall(r"(?<![\w.])([a-zA-Z_:][\w:]*)", text))
    return {w for w in words if w not in PROMQL_WORDS}, labels


def _check_promql(expr: str, where: str) -> set[str]:
    """Every metric an expression names is one the services export (or `up`); its labels exist."""
    allowed = set(METRICS) | {f"{h}_{s}" for h in HISTOGRAMS for s in ("bucket", "sum", "count")} | {"up"}
    allowed -= HISTOGRAMS  # a histogram is queried by its series
    names, labels = _promql_names(expr)
    assert names, f"{where}: no metric in {expr!r}"
    assert names <= allowed, f"{where}: unknown metric(s) {sorted(names - allowed)} in {expr!r}"
    known = set().union(*(METRICS.get(n.rsplit("_", 1)[0] if n.rsplit("_", 1)[0] in HISTOGRAMS else n, set())
                          for n in names)) | TARGET_LABELS
    assert labels <= known, f"{where}: unknown label(s) {sorted(labels - known)} in {expr!r}"
    return names


def test_metric_names_are_the_services_own():
    """Every metric named here is registered by ftps/common/metrics.py, where that module exists."""
    path = ROOT / "ftps" / "common" / "metrics.py"
    if not path.exists():
        pytest.skip("ftps/common/metrics.py not there yet")
    text = path.read_text()
    for name in METRICS:
        base = name.removesuffix("_total")
        assert f'"{base}"' in text, f"{base} is not registered in {path}"


def test_grafana_dashboard_uses_only_the_services_metrics():
    dash = json.loads((OBSERVABILITY / "grafana-dashboard.json").read_text())
    assert dash["uid"] and dash["title"]
    panels = [p for p in dash["panels"] if p["type"] != "row"]
    seen = set()
    for p in panels:
        assert p["targets"], p["title"]
        for t in p["targets"]:
            seen |= _check_promql(t["expr"], f"panel {p['title']!r}")
    for v in dash["templating"]["list"]:
        if v["type"] == "query":  # label_values(<series>, <label>)
            series, _, label = v["query"]["query"].removeprefix("label_values(").removesuffix(")").rpartition(",")
            names = _check_promql(series, f"variable {v['name']}")
            assert label.strip() in TARGET_LABELS | set().union(*(METRICS[n] for n in names)), v
    # The panels cover what operators need: every metric but the adapter's own is on a panel.
    covered = {n.removesuffix("_bucket").removesuffix("_sum").removesuffix("_count") for n in seen}
    assert set(METRICS) <= covered, sorted(set(METRICS) - covered)
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))


def test_alert_rules_parse_and_cover_the_obvious_failures():
    rules = yaml.safe_load((OBSERVABILITY / "alert-rules.yaml").read_text())
    alerts = {}
    for group in rules["groups"]:
        assert group["name"] and group["rules"]
        for rule in group["rules"]:
            assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule
            assert rule["labels"]["severity"] in ("warning", "critical") and rule["annotations"]["summary"]
            alerts[rule["alert"]] = (rule["expr"], _check_promql(rule["expr"], rule["alert"]), rule.get("for", "0s"))
    assert len(alerts) == sum(len(g["rules"]) for g in rules["groups"]), "alert names are unique"
    uses = {name: names for name, (_, names, _) in alerts.items()}

    def alert_on(*metrics):
        return [a for a, names in uses.items() if set(metrics) <= names]

    assert alert_on("ftps_scorer_rounds_finished_total"), "a task's rounds failing"
    pending = alert_on("ftps_scorer_jobs_pending", "ftps_scorer_jobs_in_flight")
    assert pending and alerts[pending[0]][2] == "10m", "jobs pending with no worker for 10 min"
    assert any("== 0" in alerts[a][0] for a in alert_on("up")), "a service down"
    assert any("/" in alerts[a][0] for a in alert_on("ftps_rpc_requests_total")), "RPC error ratio"


def _adapter_rules() -> list[dict]:
    """The external rules of the adapter's ConfigMap and of its Helm values, which must agree."""
    cm = yaml.safe_load((AUTOSCALE / "prometheus-adapter-rules.yaml").read_text())
    assert cm["kind"] == "ConfigMap"
    config = yaml.safe_load(cm["data"]["config.yaml"])
    values = yaml.safe_load((AUTOSCALE / "prometheus-adapter-values.yaml").read_text())
    assert config["externalRules"] == values["rules"]["external"]
    return config["externalRules"]


def test_prometheus_adapter_serves_the_pending_jobs_metric(tmp_path):
    rules = _adapter_rules()
    served = {}
    for rule in rules:
        _check_promql(rule["seriesQuery"], "seriesQuery")
        query = rule["metricsQuery"].replace("<<.Series>>", rule["name"]["as"]).replace("<<.LabelMatchers>>", "")
        _check_promql(query, "metricsQuery")
        assert rule["resources"]["overrides"]["namespace"] == {"resource": "namespace"}, "per namespace"
        assert "by (namespace)" in rule["metricsQuery"]
        served[rule["name"]["as"]] = rule
    assert set(served) == {"ftps_scorer_jobs_pending_per_worker"}
    # The ConfigMap is a valid object (applied in the adapter's namespace, not rendered with ftps).
    pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")
    proc = subprocess.run([sys.executable, "-m", "kubernetes_validate", "--strict", "--quiet", "-k", OLDEST_K8S,
                           str(AUTOSCALE / "prometheus-adapter-rules.yaml")], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and not proc.stdout.strip(), proc.stdout + proc.stderr


@needs_renderer
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_worker_hpa_scales_on_pending_jobs(rendered, overlay):
    """The worker HPA's first metric is the adapter's pending jobs; CPU stays as the fallback in
    the cpu overlay only; scale-down is slow. (Schema: test_overlay_renders_and_validates_strictly.)"""
    docs = rendered[(overlay, True)]
    hpa = _one(docs, "HorizontalPodAutoscaler", "finetune-worker")
    assert hpa["apiVersion"] == "autoscaling/v2"
    metrics = hpa["spec"]["metrics"]
    assert metrics[0] == {"type": "External", "external": {
        "metric": {"name": "ftps_scorer_jobs_pending_per_worker"},
        "target": {"type": "AverageValue", "averageValue": "1"}}}
    assert {r["name"]["as"] for r in _adapter_rules()} == {metrics[0]["external"]["metric"]["name"]}
    rest = [(m["type"], m.get("resource", {}).get("name")) for m in metrics[1:]]
    assert rest == ([("Resource", "cpu")] if overlay == "cpu" else [])
    down = hpa["spec"]["behavior"]["scaleDown"]
    assert down["stabilizationWindowSeconds"] >= 300
    assert all(p["type"] == "Pods" and p["value"] == 1 for p in down["policies"])


@needs_renderer
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_worker_scale_down_never_cuts_a_job(rendered, overlay):
    """terminationGracePeriodSeconds outlasts the longest job plus the time a terminating pod may
    still be sent one (the connection age), and the preStop hook is the drain script, mounted."""
    docs = rendered[(overlay, True)]
    worker = _one(docs, "Deployment", "finetune-worker")
    spec = worker["spec"]["template"]["spec"]
    [c] = spec["containers"]
    env = _env(docs, c)
    settings = _settings_class("services.finetune_worker")
    fields = settings.model_fields
    timeout = float(env.get("FTPS_JOB_TIMEOUT_S", fields["job_timeout_s"].default))
    age = float(env.get("FTPS_MAX_CONNECTION_AGE_S", fields["max_connection_age_s"].default))
    assert spec["terminationGracePeriodSeconds"] > timeout + age, (spec["terminationGracePeriodSeconds"], timeout)
    command = c["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "python"
    mount = next(m for m in c["volumeMounts"] if command[1].startswith(m["mountPath"] + "/"))
    volume = next(v for v in spec["volumes"] if v["name"] == mount["name"])
    script = _one(docs, "ConfigMap", volume["configMap"]["name"])["data"][Path(command[1]).name]
    assert script == (K8S / "base" / "worker-drain.py").read_text()


def test_worker_drain_waits_for_the_job_in_flight():
    """The preStop script returns once ftps_worker_jobs_in_flight reads 0 twice, not before; with no
    metrics to read it does not wait."""
    import http.server
    import threading

    spec = importlib.util.spec_from_file_location("worker_drain", K8S / "base" / "worker-drain.py")
    drain = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(drain)
    readings = [1, 1, 0, 1, 0, 0, 0]
    served = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            value = readings[min(len(served), len(readings) - 1)]
            served.append(value)
            body = (f"# TYPE ftps_worker_jobs_in_flight gauge\nftps_worker_jobs_in_flight {value}.0\n"
                    "ftps_worker_sandbox_children 1.0\n").encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/metrics"
        assert drain.in_flight(url) == 1
        served.clear()
        assert drain.drain(url, poll_s=0.01) == 0
        assert served == [1, 1, 0, 1, 0, 0], served
    finally:
        server.shutdown()
    assert drain.drain("http://127.0.0.1:9/metrics", poll_s=0.01) == 0  # nothing listening
    assert drain.in_flight("http://127.0.0.1:9/metrics") is None


@needs_renderer
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_services_serve_metrics_to_prometheus_only(rendered, overlay):
    docs = rendered[(overlay, True)]
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
    ns_labels = {"kubernetes.io/metadata.name": "ftps"}
    monitoring = {"ns": "monitoring", "ns_labels": {"ftps.io/monitoring": "true"}, "labels": {}}
    others = [{"ns": "ftps", "ns_labels": ns_labels, "labels": {"ftps.io/client": "true"}},
              {"ns": "ingress", "ns_labels": {"ftps.io/clients": "true"}, "labels": {}},
              {"ns": "other", "ns_labels": {}, "labels": {}}]
    seen = set()
    for workload, container, _ in _service_containers(docs):
        seen.add(workload)
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports["metrics"] == METRICS_PORT, workload
        assert _env(docs, container)["FTPS_METRICS_LISTEN"] == f"0.0.0.0:{METRICS_PORT}", workload
        d = _one(docs, "Deployment", workload)
        annotations = d["spec"]["template"]["metadata"]["annotations"]
        assert annotations == {"prometheus.io/scrape": "true", "prometheus.io/port": str(METRICS_PORT),
                               "prometheus.io/path": "/metrics"}, workload
        pod = {"labels": d["spec"]["template"]["metadata"]["labels"]}
        assert _allowed(policies, pod, "Ingress", monitoring, METRICS_PORT, "TCP"), workload
        assert not any(_allowed(policies, pod, "Ingress", o, METRICS_PORT, "TCP") for o in others), workload
        assert not _allowed(policies, pod, "Ingress", monitoring, ports["grpc"], "TCP"), workload
    assert seen == set(SERVICE_PORTS)


# -- images --------------------------------------------------------------------------------------

def _dockerfile_env(path) -> dict[str, str]:
    """The ENV of a Dockerfile's final stage (KEY=value pairs, line continuations joined)."""
    text = path.read_text()
    final = text[text.rindex("\nFROM "):].replace("\\\n", " ")
    env = {}
    for line in final.splitlines():
        if line.strip().startswith("ENV "):
            for pair in line.split()[1:]:
                key, _, value = pair.partition("=")
                env[key] = value
    return env


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.cuda"])
def test_dockerfiles_install_the_project_once_and_run_as_non_root(name):
    text = (ROOT / "deploy" / "docker" / name).read_text()
    lines = [line.strip() for line in text.replace("\\\n", " ").splitlines()
             if line.strip() and not line.strip().startswith("#")]
    copies = [line for line in lines if line.startswith("COPY") and "--from" not in line]
    for pkg in ("ftps", "services", "clients"):
        assert sum(f" {pkg} " in f"{line} " for line in copies) == 1, f"{name}: copy {pkg}/ once"
    installs = [line for line in lines if "pip install ." in line]
    assert len(installs) == 1 and "[dev]" not in installs[0] and " -e " not in installs[0], installs
    assert "torch==2.14.1 torchvision==0.29.1" in text
    final = text[text.rindex("\nFROM "):]
    user = [line for line in final.splitlines() if line.startswith("USER ")]
    assert user and user[-1].split()[1].split(":")[0].isdigit() and not user[-1].startswith("USER 0"), user
    if name == "Dockerfile":
        assert "FROM ${PYTHON_IMAGE}" in text and "ARG PYTHON_IMAGE=python:3.11-slim" in text
        assert "--index-url https://download.pytorch.org/whl/cpu" in text
    # Every module a manifest starts exists.
    for module in ("builder_registry", "contributor_gateway", "lira_scorer", "finetune_worker"):
        assert (ROOT / "services" / module / "__main__.py").exists()
    ignore = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
              if line.strip() and not line.startswith("#")]
    assert ignore[0] == "*" and {"!pyproject.toml", "!ftps", "!services", "!clients"} <= set(ignore), ignore
