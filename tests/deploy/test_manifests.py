"""Structural checks of deploy/: the Dockerfile, the Kubernetes manifests and the Envoy config.

Neither a container engine, a cluster nor Envoy is available here, so these tests read the files and check
what would otherwise only fail at deploy time: the fields Fabrica depends on, and that the files agree with
each other and with the code (ports from runtime/settings.py, RPCs from the generated descriptors).
"""

from __future__ import annotations

import importlib
import json
import re
import shlex
import shutil
import subprocess
import tomllib
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml
from fabrica.alarm.v1 import alarm_service_pb2
from fabrica.collector.v1 import collector_service_pb2
from fabrica.config.v1 import config_service_pb2
from fabrica.ingest.v1 import ingest_service_pb2
from fabrica.production.v1 import production_service_pb2
from fabrica_svc.runtime.settings import DEFAULT_METRICS_PORTS, DEFAULT_PORTS
from fabrica_svc.runtime.server import LIVENESS

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
ENVOY = DEPLOY / "envoy" / "envoy.yaml"
DOCKERFILE = DEPLOY / "docker" / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"

NAMESPACE = "fabrica"
UID = 10001
SERVICES = ("config", "ingest", "production", "collector", "alarm")
WITH_DATABASE = ("config", "ingest", "production", "alarm")
WORKLOAD_KIND = {"config": "Deployment", "ingest": "Deployment", "production": "Deployment", "collector": "StatefulSet",
                 "alarm": "Deployment"}
#: Stateless services run at least this many replicas.
MIN_REPLICAS = {"config": 2, "ingest": 2, "production": 2, "alarm": 2}
#: Services whose clients need per-request balancing: each has a `<name>-headless` Service.
HEADLESS = ("config", "ingest", "production", "alarm")
#: The services collectors and services call, on their mutual-TLS peer port (FABRICA_PEER_PORT).
PEER_PORTS = {"config": 50061, "ingest": 50062}
#: Who may call each peer port (NetworkPolicy), by app.kubernetes.io/name.
PEER_CALLERS = {"config": {"collector", "production", "alarm", "ingest"}, "ingest": {"collector", "production", "alarm"}}
#: Addresses each service is given, and the Service they must point at (its peer port).
ADDRESSES = {
    "production": {"FABRICA_INGEST_ADDR": "ingest", "FABRICA_CONFIG_ADDR": "config"},
    "collector": {"FABRICA_CONFIG_ADDR": "config", "FABRICA_INGEST_ADDR": "ingest"},
    "alarm": {"FABRICA_INGEST_ADDR": "ingest", "FABRICA_CONFIG_ADDR": "config"},
    "ingest": {"FABRICA_CONFIG_ADDR": "config"},  # the tenants' quotas and retention (ListTenants)
}

#: The gRPC services the UI reaches through Envoy (the collector: its admin API), and the Envoy cluster of each.
BROWSER_SERVICES = {
    "config": config_service_pb2.DESCRIPTOR.services_by_name["ConfigService"],
    "ingest": ingest_service_pb2.DESCRIPTOR.services_by_name["IngestService"],
    "production": production_service_pb2.DESCRIPTOR.services_by_name["ProductionService"],
    "collector": collector_service_pb2.DESCRIPTOR.services_by_name["CollectorService"],
    "alarm": alarm_service_pb2.DESCRIPTOR.services_by_name["AlarmService"],
}
FILTER_TYPES = {
    "envoy.filters.http.grpc_web": "type.googleapis.com/envoy.extensions.filters.http.grpc_web.v3.GrpcWeb",
    "envoy.filters.http.cors": "type.googleapis.com/envoy.extensions.filters.http.cors.v3.Cors",
    "envoy.filters.http.jwt_authn":
        "type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication",
    "envoy.filters.http.router": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router",
}
DOWNSTREAM_TLS = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext"
UPSTREAM_TLS = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"
HTTP_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
CORS_POLICY = "type.googleapis.com/envoy.extensions.filters.http.cors.v3.CorsPolicy"
GRPC_WEB_REQUEST_HEADERS = ("content-type", "x-grpc-web", "x-user-agent", "grpc-timeout",
                            "authorization", "x-fabrica-tenant")
GRPC_WEB_RESPONSE_HEADERS = ("grpc-status", "grpc-message", "grpc-status-details-bin")


# --------------------------------------------------------------------------------------------- loading


def _load_all(path: Path) -> list[Any]:
    with path.open(encoding="utf-8") as f:
        return [doc for doc in yaml.safe_load_all(f) if doc is not None]


def _yaml_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml"))


@cache
def _manifests(folder: Path) -> tuple[dict[str, Any], ...]:
    """The Kubernetes objects defined in `folder` (and below), kustomization files left out."""
    docs: list[dict[str, Any]] = []
    for path in sorted(folder.rglob("*.yaml")):
        if path.name != "kustomization.yaml":
            docs.extend(_load_all(path))
    return tuple(docs)


def _objects(folder: Path, kind: str) -> list[dict[str, Any]]:
    return [d for d in _manifests(folder) if d["kind"] == kind]


def _one(folder: Path, kind: str, name: str) -> dict[str, Any]:
    found = [d for d in _objects(folder, kind) if d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name!r} in {folder.relative_to(ROOT)}, found {len(found)}"
    return found[0]


def _workload(service: str) -> dict[str, Any]:
    return _one(K8S / service, WORKLOAD_KIND[service], service)


def _pod_spec(service: str) -> dict[str, Any]:
    return _workload(service)["spec"]["template"]["spec"]


def _container(service: str) -> dict[str, Any]:
    containers = _pod_spec(service)["containers"]
    named = [c for c in containers if c["name"] == service]
    assert len(named) == 1, f"{service}: expected one container named {service!r}"
    return named[0]


def _env(service: str) -> dict[str, dict[str, Any]]:
    entries = _container(service).get("env", [])
    names = [e["name"] for e in entries]
    assert len(names) == len(set(names)), f"{service}: duplicate env entries {names}"
    return {e["name"]: e for e in entries}


def _port(container: dict[str, Any], name: str) -> int:
    ports = [p for p in container.get("ports", []) if p.get("name") == name]
    assert len(ports) == 1, f"container {container['name']}: expected one port named {name!r}"
    return ports[0]["containerPort"]


def _seconds(duration: str) -> float:
    """A protobuf JSON Duration ("0s", "1.5s", "3600s") in seconds."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)s", str(duration))
    assert match, f"not a Duration: {duration!r}"
    return float(match.group(1))


# ---------------------------------------------------------------------------------------- every file


@pytest.mark.parametrize("path", _yaml_files(), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_yaml_parses(path: Path) -> None:
    docs = _load_all(path)
    assert docs, f"{path} has no YAML document"
    if K8S in path.parents and path.name != "kustomization.yaml":
        for doc in docs:
            assert {"apiVersion", "kind", "metadata"} <= doc.keys(), f"{path}: not a Kubernetes object: {doc}"
            assert doc["metadata"].get("name"), f"{path}: {doc['kind']} without a name"


def test_deploy_tree_has_what_is_documented() -> None:
    for path in (DOCKERFILE, DOCKERIGNORE, ENVOY, DEPLOY / "README.md", DEPLOY / "envoy" / "README.md",
                 K8S / "kustomization.yaml", K8S / "namespace.yaml"):
        assert path.is_file(), f"missing {path.relative_to(ROOT)}"
    for service in SERVICES:
        assert (K8S / service / "kustomization.yaml").is_file(), f"missing deploy/k8s/{service}/kustomization.yaml"


# ---------------------------------------------------------------------------------------- kustomize


def _kustomizations() -> list[Path]:
    return sorted(K8S.rglob("kustomization.yaml"))


@pytest.mark.parametrize("path", _kustomizations(), ids=lambda p: str(p.relative_to(K8S)))
def test_kustomization_resources_exist_and_cover_the_folder(path: Path) -> None:
    (kustomization,) = _load_all(path)
    assert kustomization["kind"] == "Kustomization"
    resources = kustomization.get("resources", [])
    assert resources, f"{path}: no resources"
    assert len(resources) == len(set(resources)), f"{path}: a resource is listed twice"
    for resource in resources:
        target = path.parent / resource
        assert target.exists(), f"{path}: resource {resource!r} does not exist"
        if target.is_dir():
            assert (target / "kustomization.yaml").is_file(), f"{path}: {resource}/ has no kustomization.yaml"
    listed = {(path.parent / r).resolve() for r in resources}
    for manifest in path.parent.glob("*.yaml"):
        if manifest.name != "kustomization.yaml":
            assert manifest.resolve() in listed, f"{manifest.relative_to(ROOT)} is not in {path.relative_to(ROOT)}"


def test_root_kustomization_ties_all_services() -> None:
    (kustomization,) = _load_all(K8S / "kustomization.yaml")
    assert kustomization["namespace"] == NAMESPACE
    assert "namespace.yaml" in kustomization["resources"]
    for service in SERVICES:
        assert service in [r.rstrip("/") for r in kustomization["resources"]], f"{service} is not applied"
    common = [entry["pairs"] for entry in kustomization.get("labels", [])] + [kustomization.get("commonLabels", {})]
    assert any(pairs for pairs in common), "no common labels"
    namespace = _one(K8S, "Namespace", NAMESPACE)
    assert namespace["apiVersion"] == "v1"


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (with its built-in kustomize) is not installed")
def test_kustomize_build() -> None:
    """What `kubectl apply -k deploy/k8s` would apply: everything lands in the namespace, labelled."""
    out = subprocess.run(["kubectl", "kustomize", str(K8S)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    docs = [d for d in yaml.safe_load_all(out.stdout) if d]
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    for service in SERVICES:
        assert (WORKLOAD_KIND[service], service) in kinds
        assert ("Service", service) in kinds
        assert ("ServiceAccount", service) in kinds
    (root,) = _load_all(K8S / "kustomization.yaml")
    common = {k: v for entry in root.get("labels", []) for k, v in entry["pairs"].items()}
    common |= root.get("commonLabels", {})
    (image,) = [i for i in root.get("images", [{"name": "fabrica"}]) if i["name"] == "fabrica"]
    expected_image = f"{image.get('newName', 'fabrica')}:{image.get('newTag', '0.1.0')}"
    for doc in docs:
        meta = doc["metadata"]
        if doc["kind"] != "Namespace":
            assert meta.get("namespace") == NAMESPACE, f"{doc['kind']}/{meta['name']} is not in {NAMESPACE}"
        assert common.items() <= meta.get("labels", {}).items(), f"{doc['kind']}/{meta['name']} lacks {common}"
        if doc["kind"] in ("Deployment", "StatefulSet"):
            labels = doc["spec"]["template"]["metadata"]["labels"]
            assert common.items() <= labels.items(), f"pods of {meta['name']} lack {common}"
            assert doc["spec"]["template"]["spec"]["containers"][0]["image"] == expected_image


# -------------------------------------------------------------------------------------- per service


@pytest.mark.parametrize("service", SERVICES)
def test_workload_kind_and_command(service: str) -> None:
    workload = _workload(service)
    assert workload["apiVersion"] == "apps/v1"
    selector = workload["spec"]["selector"]["matchLabels"]
    labels = workload["spec"]["template"]["metadata"]["labels"]
    assert selector and selector.items() <= labels.items(), "the selector must select the pod template"
    container = _container(service)
    assert container["args"] == ["serve", service]
    assert "command" not in container, "the image's ENTRYPOINT (fabrica) must run"
    assert container["image"].startswith("fabrica:"), container["image"]
    if service in MIN_REPLICAS:
        assert workload["spec"]["replicas"] >= MIN_REPLICAS[service]


@pytest.mark.parametrize("service", SERVICES)
def test_ports_and_service(service: str) -> None:
    container = _container(service)
    grpc_port, metrics_port = _port(container, "grpc"), _port(container, "metrics")
    assert grpc_port == DEFAULT_PORTS[service]
    assert metrics_port == DEFAULT_METRICS_PORTS[service]
    env = _env(service)
    assert env["FABRICA_PORT"]["value"] == str(grpc_port)
    assert env["FABRICA_METRICS_PORT"]["value"] == str(metrics_port)

    svc = _one(K8S / service, "Service", service)
    pod_labels = _workload(service)["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= pod_labels.items(), "the Service selects no pod"
    ports = {p["name"]: p for p in svc["spec"]["ports"]}
    assert ports["grpc"]["port"] == grpc_port
    assert ports["grpc"].get("appProtocol") == "grpc"
    assert ports["grpc"]["targetPort"] in ("grpc", grpc_port)
    assert ports["metrics"]["port"] == metrics_port
    assert ports["metrics"]["targetPort"] in ("metrics", metrics_port)

    annotations = _workload(service)["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(metrics_port)


@pytest.mark.parametrize("service", HEADLESS)
def test_headless_service_for_client_side_balancing(service: str) -> None:
    svc = _one(K8S / service, "Service", f"{service}-headless")
    assert svc["spec"]["clusterIP"] == "None"
    assert svc["spec"]["selector"] == _one(K8S / service, "Service", service)["spec"]["selector"]
    grpc = [p for p in svc["spec"]["ports"] if p["name"] == "grpc"]
    assert len(grpc) == 1 and grpc[0]["port"] == DEFAULT_PORTS[service]


@pytest.mark.parametrize("service", SERVICES)
def test_grpc_probes(service: str) -> None:
    container = _container(service)
    # kubelet's native gRPC probes speak no TLS: they probe the plaintext health-only port (FABRICA_HEALTH_PORT).
    grpc_port = _port(container, "health")
    assert _env(service)["FABRICA_HEALTH_PORT"]["value"] == str(grpc_port)
    assert grpc_port not in (_port(container, "grpc"), _port(container, "metrics"))
    for kind in ("readinessProbe", "livenessProbe"):
        probe = container[kind]
        assert "grpc" in probe, f"{kind} is not a native gRPC probe"
        assert probe["grpc"]["port"] == grpc_port, f"{kind} does not probe the health port"
    # Readiness follows the dependencies (the overall status, service ''); liveness asks only whether the
    # process answers (the runtime's always-SERVING "liveness" name), so a database outage takes pods out
    # of the Service without restarting them.
    assert container["readinessProbe"]["grpc"].get("service", "") == "", "readiness must check overall health"
    assert container["livenessProbe"]["grpc"].get("service") == LIVENESS, "liveness must not follow the database"
    if "startupProbe" in container:
        assert container["startupProbe"]["grpc"]["port"] == grpc_port

    def tolerance(probe: dict[str, Any]) -> int:
        return probe.get("periodSeconds", 10) * probe.get("failureThreshold", 3)

    readiness, liveness = container["readinessProbe"], container["livenessProbe"]
    assert tolerance(liveness) > tolerance(readiness), "liveness must be more lenient than readiness"
    assert liveness.get("timeoutSeconds", 1) >= readiness.get("timeoutSeconds", 1)


@pytest.mark.parametrize("service", SERVICES)
def test_security_context(service: str) -> None:
    pod = _pod_spec(service)
    container = _container(service)
    effective = {**pod.get("securityContext", {}), **container.get("securityContext", {})}
    assert effective.get("runAsNonRoot") is True
    assert effective.get("runAsUser") == UID
    assert container["securityContext"].get("readOnlyRootFilesystem") is True
    assert container["securityContext"].get("allowPrivilegeEscalation") is False
    assert container["securityContext"].get("capabilities", {}).get("drop") == ["ALL"]
    assert not container["securityContext"].get("capabilities", {}).get("add")
    assert container["securityContext"].get("privileged", False) is False
    assert effective.get("seccompProfile", {}).get("type") == "RuntimeDefault"
    assert pod.get("automountServiceAccountToken") is False
    account = _one(K8S / service, "ServiceAccount", pod["serviceAccountName"])
    assert account["automountServiceAccountToken"] is False


@pytest.mark.parametrize("service", SERVICES)
def test_writable_tmp(service: str) -> None:
    volumes = {v["name"]: v for v in _pod_spec(service).get("volumes", [])}
    mounts = {m["mountPath"]: m["name"] for m in _container(service).get("volumeMounts", [])}
    assert "/tmp" in mounts, "a read-only root filesystem needs a writable /tmp"
    assert "emptyDir" in volumes[mounts["/tmp"]]


@pytest.mark.parametrize("service", SERVICES)
def test_resources(service: str) -> None:
    resources = _container(service)["resources"]
    for part in ("requests", "limits"):
        assert {"cpu", "memory"} <= resources[part].keys(), f"{part} must set cpu and memory"


@pytest.mark.parametrize("service", SERVICES)
def test_environment(service: str) -> None:
    env = _env(service)
    assert env["FABRICA_HOST"]["value"] == "0.0.0.0", "a container must bind every interface"
    assert env["FABRICA_LOG_FORMAT"]["value"] == "json"
    if service in WITH_DATABASE:
        assert "value" not in env["DATABASE_URL"], "DATABASE_URL must not be written in the manifest"
        ref = env["DATABASE_URL"]["valueFrom"]["secretKeyRef"]
        assert (ref["name"], ref["key"]) == ("fabrica-db", "url")
        assert not ref.get("optional"), "without DATABASE_URL a service would start an embedded Postgres"
    else:
        assert "DATABASE_URL" not in env, f"{service} has no database"


@pytest.mark.parametrize("service", SERVICES)
def test_termination_grace_covers_shutdown_grace(service: str) -> None:
    grace = float(_env(service)["FABRICA_SHUTDOWN_GRACE"]["value"])
    assert _pod_spec(service)["terminationGracePeriodSeconds"] > grace


def _services_by_name() -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in _objects(K8S, "Service")}


def _resolve(address: str) -> tuple[dict[str, Any], int]:
    """The Service a `host:port` address names inside the namespace, and the port."""
    host, _, port = address.rpartition(":")
    name, _, rest = host.partition(".")
    assert rest in ("", NAMESPACE, f"{NAMESPACE}.svc", f"{NAMESPACE}.svc.cluster.local"), address
    services = _services_by_name()
    assert name in services, f"{address}: no Service {name!r} in deploy/k8s"
    return services[name], int(port)


@pytest.mark.parametrize(
    ("service", "variable"), [(s, v) for s, variables in ADDRESSES.items() for v in variables]
)
def test_service_addresses_point_at_services(service: str, variable: str) -> None:
    entry = _env(service)[variable]
    svc, port = _resolve(entry["value"])
    target = ADDRESSES[service][variable]
    assert svc["spec"]["selector"] == _one(K8S / target, "Service", target)["spec"]["selector"]
    # Services call each other on the peer port, with their client certificates (mutual TLS).
    assert port == PEER_PORTS[target] == int(_env(target)["FABRICA_PEER_PORT"]["value"])
    assert port in [p["port"] for p in svc["spec"]["ports"] if p["name"] == "grpc-peer"]


# ---------------------------------------------------------------------------------------- TLS, policies


@pytest.mark.parametrize("service", SERVICES)
def test_tls_certificates_come_from_a_secret_of_the_service(service: str) -> None:
    env = _env(service)
    assert "FABRICA_INSECURE" not in env, "plaintext is for development only"
    mounts = {m["name"]: m for m in _container(service)["volumeMounts"]}
    volumes = {v["name"]: v for v in _pod_spec(service)["volumes"]}
    secret_mounts = {m["mountPath"]: volumes[name]["secret"] for name, m in mounts.items()
                     if "secret" in volumes.get(name, {})}
    for variable in ("FABRICA_TLS_CERT", "FABRICA_TLS_KEY", "FABRICA_TLS_CA"):
        path = env[variable]["value"]
        folder = next((f for f in secret_mounts if path.startswith(f.rstrip("/") + "/")), None)
        assert folder, f"{service}: {variable}={path} is not in a mounted Secret"
        assert secret_mounts[folder]["secretName"] == f"{service}-tls"
        assert mounts[next(n for n, m in mounts.items() if m["mountPath"] == folder)].get("readOnly") is True
    if service == "collector":  # one certificate per collector id: the pod's name picks it
        assert "$(FABRICA_COLLECTOR_ID)" in env["FABRICA_TLS_CERT"]["value"]
        names = [e["name"] for e in _container(service)["env"]]
        assert names.index("FABRICA_COLLECTOR_ID") < names.index("FABRICA_TLS_CERT"), "$(...) needs it defined first"
    # The keys are never committed: no Secret is among the manifests (deploy/README.md says how to create them).
    assert not _objects(K8S, "Secret")


@pytest.mark.parametrize("service", SERVICES)
def test_a_deployed_service_verifies_tokens_as_the_gateway_does(service: str, tmp_path: Path) -> None:
    """Every workload names a token verifier (else it would stop at start, naming FABRICA_JWT_PUBLIC_KEY_FILE)
    with jwt_authn's issuer, audience and JWKS, and its manifest's settings, with the mounted files stood in
    for by real ones, build the service's authenticator: a deployed service starts."""
    from fabrica_svc.runtime import auth
    from fabrica_svc.runtime.settings import load_settings

    from tls_support import Pki

    env = _env(service)
    provider = _envoy_jwt_provider()
    assert env["FABRICA_JWKS_URL"]["value"] == provider["remote_jwks"]["http_uri"]["uri"]
    assert env["FABRICA_JWT_ISSUER"]["value"] == provider["issuer"]
    assert [env["FABRICA_JWT_AUDIENCE"]["value"]] == provider["audiences"]
    values = {name: e["value"] for name, e in env.items() if "value" in e}
    values.update({k: v for k, v in Pki(tmp_path / "pki").env(service).items() if k.startswith("FABRICA_TLS_")})
    settings = load_settings(service, values)
    assert not settings.insecure and settings.tls is not None
    authenticator = auth.authenticator_for(settings)
    assert authenticator is not None and authenticator.verifier is not None


def _envoy_jwt_provider() -> dict[str, Any]:
    def walk(node: Any) -> Iterator[Any]:
        if isinstance(node, dict):
            yield node
            for value in node.values():
                yield from walk(value)
        elif isinstance(node, list):
            for value in node:
                yield from walk(value)

    providers = [n["providers"] for n in walk(yaml.safe_load(ENVOY.read_text())) if "providers" in n]
    assert len(providers) == 1 and len(providers[0]) == 1, providers
    return next(iter(providers[0].values()))


@pytest.mark.parametrize("service", sorted(PEER_PORTS))
def test_peer_port(service: str) -> None:
    container = _container(service)
    assert _port(container, "grpc-peer") == PEER_PORTS[service] == int(_env(service)["FABRICA_PEER_PORT"]["value"])
    for name in (service, f"{service}-headless"):
        ports = {p["name"]: p for p in _one(K8S / service, "Service", name)["spec"]["ports"]}
        assert ports["grpc-peer"]["port"] == PEER_PORTS[service]
        assert ports["grpc-peer"]["targetPort"] in ("grpc-peer", PEER_PORTS[service])


def _peers(rule: dict[str, Any]) -> list[dict[str, Any]]:
    return rule.get("from", [])


@pytest.mark.parametrize("service", SERVICES)
def test_network_policy(service: str) -> None:
    """Only the callers that need a port reach it: collectors and production the peer ports of config and
    ingest; the gateway the gRPC ports; Prometheus the metrics ports; the health port is open (probes)."""
    policy = _one(K8S / service, "NetworkPolicy", service)
    assert policy["apiVersion"] == "networking.k8s.io/v1"
    spec = policy["spec"]
    pod_labels = _workload(service)["spec"]["template"]["metadata"]["labels"]
    assert spec["podSelector"]["matchLabels"].items() <= pod_labels.items()
    assert "Ingress" in spec["policyTypes"]
    container_ports = {p["name"] for p in _container(service)["ports"]}
    by_port: dict[str, list[dict[str, Any]]] = {}
    for rule in spec["ingress"]:
        for port in rule["ports"]:
            assert port["port"] in container_ports, f"{service}: the policy names no port of the pod: {port}"
            by_port.setdefault(port["port"], []).extend(_peers(rule) or [{"anyone": True}])
    assert set(by_port) == container_ports, f"{service}: every port has its rule"

    def names(peers: list[dict[str, Any]]) -> set[str]:
        assert all("podSelector" in p for p in peers), peers
        return {p["podSelector"]["matchLabels"]["app.kubernetes.io/name"] for p in peers}

    assert names(by_port["grpc"]) == {"envoy"}
    assert names(by_port["metrics"]) == {"prometheus"}
    assert all("namespaceSelector" in p for p in by_port["metrics"])
    assert by_port["health"] == [{"anyone": True}]
    if service in PEER_PORTS:
        assert names(by_port["grpc-peer"]) == PEER_CALLERS[service]


# ------------------------------------------------------------------------------------------ collector


def test_collector_is_a_statefulset_with_stable_id_and_volume() -> None:
    sts = _workload("collector")
    governing = _one(K8S / "collector", "Service", sts["spec"]["serviceName"])
    assert governing["spec"]["clusterIP"] == "None", "a StatefulSet's governing Service is headless"
    env = _env("collector")
    assert env["FABRICA_COLLECTOR_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    claims = {c["metadata"]["name"]: c for c in sts["spec"]["volumeClaimTemplates"]}
    mounts = {m["mountPath"]: m["name"] for m in _container("collector")["volumeMounts"]}
    data_dir = env["FABRICA_DATA_DIR"]["value"]
    assert mounts.get(data_dir) in claims, "the store-and-forward log must be on the claimed volume"
    claim = claims[mounts[data_dir]]
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert claim["spec"]["resources"]["requests"]["storage"]
    assert mounts[data_dir] not in {v["name"] for v in _pod_spec("collector").get("volumes", [])}, (
        "a pod volume of the same name would shadow the claim"
    )
    retention = sts["spec"].get("persistentVolumeClaimRetentionPolicy", {})
    assert retention.get("whenScaled", "Retain") == "Retain", "unsent readings must survive a scale-down"


# ---------------------------------------------------------------------------------------------- envoy


@cache
def _envoy() -> dict[str, Any]:
    (config,) = _load_all(ENVOY)
    return config


def _http_connection_manager() -> dict[str, Any]:
    listeners = _envoy()["static_resources"]["listeners"]
    assert len(listeners) == 1
    (chain,) = listeners[0]["filter_chains"]
    (hcm,) = [f for f in chain["filters"] if f["name"] == "envoy.filters.network.http_connection_manager"]
    config = hcm["typed_config"]
    assert config["@type"] == (
        "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
    )
    return config


def _virtual_host() -> dict[str, Any]:
    hosts = _http_connection_manager()["route_config"]["virtual_hosts"]
    (host,) = [h for h in hosts if "*" in h["domains"]]
    return host


def _clusters() -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in _envoy()["static_resources"]["clusters"]}


def _matching_route(path: str) -> dict[str, Any] | None:
    """The route Envoy picks for a POST (and its CORS preflight) to `path`: the first that matches."""
    for route in _virtual_host()["routes"]:
        match = dict(route["match"])
        match.pop("case_sensitive", None)
        # Header, query or grpc matchers could stop a preflight (OPTIONS, no gRPC headers) from matching
        # its route; the routes here match on the path alone.
        assert match.keys() <= {"path", "prefix", "safe_regex"}, f"unsupported match {match}"
        if "path" in match and path == match["path"]:
            return route
        if "prefix" in match and path.startswith(match["prefix"]):
            return route
        if "safe_regex" in match and re.fullmatch(match["safe_regex"]["regex"], path):
            return route
    return None


def test_envoy_listener() -> None:
    (listener,) = _envoy()["static_resources"]["listeners"]
    address = listener["address"]["socket_address"]
    assert (address["address"], address["port_value"]) == ("0.0.0.0", 8443)


def test_envoy_terminates_tls_from_browsers_with_mounted_certificates() -> None:
    (listener,) = _envoy()["static_resources"]["listeners"]
    (chain,) = listener["filter_chains"]
    socket = chain["transport_socket"]
    assert socket["typed_config"]["@type"] == DOWNSTREAM_TLS
    common = socket["typed_config"]["common_tls_context"]
    (cert,) = common["tls_certificates"]
    for key in ("certificate_chain", "private_key"):
        assert cert[key]["filename"].startswith("/etc/envoy/tls/"), "certificates come from a mounted Secret"
    assert "h2" in common["alpn_protocols"]


def _jwt_authn() -> dict[str, Any]:
    (f,) = [f for f in _http_connection_manager()["http_filters"] if f["name"] == "envoy.filters.http.jwt_authn"]
    return f["typed_config"]


def _jwt_rule(path: str) -> dict[str, Any]:
    """The first jwt_authn rule matching `path` (the filter uses the first that matches, as routes do)."""
    for rule in _jwt_authn()["rules"]:
        match = rule["match"]
        assert match.keys() <= {"path", "prefix"}, f"unsupported match {match}"
        if match.get("path") == path or ("prefix" in match and path.startswith(match["prefix"])):
            return rule
    raise AssertionError(f"no jwt_authn rule matches {path}")


def test_envoy_verifies_tokens_before_routing_and_forwards_them() -> None:
    config = _jwt_authn()
    assert config.get("bypass_cors_preflight") is True, "a CORS preflight carries no token"
    (provider,) = config["providers"].values()
    assert provider["issuer"] and provider["audiences"], "issuer and audience are checked"
    assert provider.get("forward") is True, "the services verify the token again: Envoy must pass it on"
    jwks = provider.get("remote_jwks") or provider.get("local_jwks")
    assert jwks, "a JWKS provider"
    if "remote_jwks" in provider:
        assert provider["remote_jwks"]["http_uri"]["cluster"] in _clusters()
        assert provider["remote_jwks"]["http_uri"]["uri"].startswith("https://")
    # Health and reflection open; every browser RPC needs the provider's token.
    for path in ("/grpc.health.v1.Health/Check", "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
                 "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"):
        assert "requires" not in _jwt_rule(path), path
    for _, method in _rpcs():
        rule = _jwt_rule(f"/{method.containing_service.full_name}/{method.name}")
        assert rule.get("requires") == {"provider_name": next(iter(config["providers"]))}, method.full_name


@pytest.mark.parametrize("cluster", sorted(BROWSER_SERVICES))
def test_envoy_calls_each_service_over_mtls(cluster: str) -> None:
    socket = _clusters()[cluster]["transport_socket"]
    assert socket["typed_config"]["@type"] == UPSTREAM_TLS
    common = socket["typed_config"]["common_tls_context"]
    assert common["tls_certificates"], "Envoy presents a client certificate"
    validation = common["validation_context"]
    assert validation["trusted_ca"]["filename"].startswith("/etc/envoy/")
    names = validation["match_typed_subject_alt_names"]
    # A collector serves with its own id's certificate (deploy/README.md: collector-tls), and requests are
    # balanced over all of them: any collector's identity, and only a collector's.
    expected = {"prefix": "urn:fabrica:collector:"} if cluster == "collector" else {"exact": f"urn:fabrica:service:{cluster}"}
    assert names == [{"san_type": "URI", "matcher": expected}]


def test_envoy_http_filter_order() -> None:
    filters = _http_connection_manager()["http_filters"]
    assert [f["name"] for f in filters] == list(FILTER_TYPES), "filters must be grpc_web, cors, jwt_authn, router"
    for f in filters:
        assert f["typed_config"]["@type"] == FILTER_TYPES[f["name"]], f["name"]


@pytest.mark.parametrize("cluster", sorted(BROWSER_SERVICES))
def test_envoy_cluster_speaks_http2_to_the_service(cluster: str) -> None:
    config = _clusters()[cluster]
    assert config["type"] == "STRICT_DNS"
    options = config["typed_extension_protocol_options"][HTTP_OPTIONS]
    assert options["@type"] == f"type.googleapis.com/{HTTP_OPTIONS}"
    assert isinstance(options["explicit_http_config"]["http2_protocol_options"], dict)
    assert any("grpc_health_check" in check for check in config.get("health_checks", [])), "no gRPC health check"
    assert config["load_assignment"]["cluster_name"] == cluster
    endpoints = [e["endpoint"]["address"]["socket_address"]
                 for group in config["load_assignment"]["endpoints"] for e in group["lb_endpoints"]]
    assert endpoints
    for address in endpoints:
        svc, port = _resolve(f"{address['address']}:{address['port_value']}")
        assert svc["spec"]["selector"] == _one(K8S / cluster, "Service", cluster)["spec"]["selector"]
        assert port == DEFAULT_PORTS[cluster]


def test_every_envoy_cluster_uses_http2() -> None:
    jwks = {p["remote_jwks"]["http_uri"]["cluster"] for p in _jwt_authn()["providers"].values() if "remote_jwks" in p}
    for name, config in _clusters().items():
        if name in jwks:  # the identity provider's JWKS endpoint (HTTPS), not a gRPC service
            continue
        options = config["typed_extension_protocol_options"][HTTP_OPTIONS]
        assert "http2_protocol_options" in options["explicit_http_config"], name


def test_envoy_routes_point_at_known_clusters() -> None:
    clusters = _clusters()
    for route in _virtual_host()["routes"]:
        if "route" in route:
            assert route["route"]["cluster"] in clusters, route


def _rpcs() -> Iterator[tuple[str, Any]]:
    for cluster, service in BROWSER_SERVICES.items():
        for method in service.methods:
            yield cluster, method


@pytest.mark.parametrize(("cluster", "method"), list(_rpcs()), ids=lambda v: getattr(v, "full_name", v))
def test_envoy_routes_every_browser_rpc(cluster: str, method: Any) -> None:
    path = f"/{method.containing_service.full_name}/{method.name}"
    route = _matching_route(path)
    if method.client_streaming:
        assert route is None or "route" not in route, f"{path} streams from the client: gRPC-Web cannot call it"
        return
    assert route is not None and "route" in route, f"{path} is not routed"
    action = route["route"]
    assert action["cluster"] == cluster
    timeout = _seconds(action.get("timeout", "15s"))  # Envoy's default route timeout is 15 s
    if method.server_streaming:
        assert timeout == 0, f"{path} is a stream: its route needs timeout: 0s"
        stream_idle = _seconds(_http_connection_manager().get("stream_idle_timeout", "300s"))
        assert "idle_timeout" in action, f"{path} needs a long idle_timeout"
        idle = _seconds(action["idle_timeout"])
        assert idle == 0 or idle > stream_idle, f"{path}: idle_timeout {idle}s is not longer than {stream_idle}s"
    else:
        assert timeout > 0, f"{path} is unary: it keeps a bounded timeout"


def _cors_policies() -> list[dict[str, Any]]:
    host = _virtual_host()
    policies = [host.get("typed_per_filter_config", {}).get("envoy.filters.http.cors")]
    policies += [r.get("typed_per_filter_config", {}).get("envoy.filters.http.cors") for r in host["routes"]]
    return [p for p in policies if p is not None]


def test_envoy_cors_policy() -> None:
    assert "cors" not in _virtual_host(), "use typed_per_filter_config, the vhost cors field is deprecated"
    host_policy = _virtual_host().get("typed_per_filter_config", {}).get("envoy.filters.http.cors")
    assert host_policy is not None, "the virtual host has no CORS policy"
    for policy in _cors_policies():
        assert policy["@type"] == CORS_POLICY
        origins = policy["allow_origin_string_match"]
        assert origins, "no allowed origin"
        for origin in origins:
            (kind, value), *rest = [(k, v) for k, v in origin.items() if k != "ignore_case"]
            assert not rest
            if kind == "safe_regex":
                value = value["regex"]
                assert not re.fullmatch(value, "https://evil.example.org"), f"origin pattern {value!r} is too wide"
            assert "*" not in str(value), f"wildcard origin {origin}"
            assert kind != "prefix" or value.count("/") >= 2, f"prefix origin {origin} is too wide"
        exposed = [h.strip() for h in policy["expose_headers"].split(",")]
        for header in GRPC_WEB_RESPONSE_HEADERS:
            assert header in exposed, f"{header} is not exposed to the browser"
        allowed = [h.strip() for h in policy["allow_headers"].split(",")]
        for header in GRPC_WEB_REQUEST_HEADERS:
            assert header in allowed, f"{header} is not an allowed request header"
        methods = [m.strip() for m in policy["allow_methods"].split(",")]
        assert {"POST", "OPTIONS"} <= set(methods)
        assert int(policy["max_age"]) > 0


def test_envoy_config_against_the_envoy_api() -> None:
    """Every field name, type and enum of envoy.yaml, checked by the Envoy API's own message types.

    Runs where the envoy-data-plane package (the Envoy API as Python classes) is installed.
    """
    edp = pytest.importorskip("envoy_data_plane")
    from envoy_data_plane.envoy.config.bootstrap.v3 import Bootstrap

    type_urls = set(re.findall(r"type\.googleapis\.com/([\w.]+)", json.dumps(_envoy())))
    for url in type_urls:
        package, _, _message = url.rpartition(".")
        importlib.import_module(f"{edp.__name__}.{package}")  # registers the type for "@type"
    Bootstrap.from_dict(json.loads(json.dumps(_envoy())))  # raises on an unknown field or a bad value


# ------------------------------------------------------------------------------------------ Dockerfile


def _dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined and comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        if line.strip():
            keyword, _, args = line.strip().partition(" ")
            instructions.append((keyword.upper(), args.strip()))
    assert not pending, "the Dockerfile ends in a continuation line"
    return instructions


def _final_stage() -> list[tuple[str, str]]:
    instructions = _dockerfile()
    last_from = max(i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM")
    return instructions[last_from:]


def _exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), f"not exec form: {args}"
    return value


def _dockerignore_excludes(path: str) -> bool:
    """Docker's rule: the last pattern that matches the path or one of its parent folders decides."""
    patterns = []
    for raw in DOCKERIGNORE.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            negate = line.startswith("!")
            patterns.append((negate, line.lstrip("!").strip().strip("/")))

    def regex(pattern: str) -> re.Pattern[str]:
        out, i = "", 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                out, i = out + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                out, i = out + ".*", i + 2
            elif pattern[i] == "*":
                out, i = out + "[^/]*", i + 1
            elif pattern[i] == "?":
                out, i = out + "[^/]", i + 1
            else:
                out, i = out + re.escape(pattern[i]), i + 1
        return re.compile(out)

    parts = path.strip("/").split("/")
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    excluded = False
    for negate, pattern in patterns:
        if any(regex(pattern).fullmatch(c) for c in candidates):
            excluded = not negate
    return excluded


def test_dockerfile_base_user_and_entrypoint() -> None:
    instructions = _dockerfile()
    froms = [args for keyword, args in instructions if keyword == "FROM"]
    assert froms and all(f.split()[0] == "python:3.11-slim" for f in froms), froms
    stage = _final_stage()
    users = [args for keyword, args in stage if keyword == "USER"]
    assert users, "the image must not run as root"
    user, _, group = users[-1].partition(":")
    assert user.isdigit(), "USER must be numeric so that runAsNonRoot can verify it"
    assert int(user) == UID and int(user) != 0
    assert not group or (group.isdigit() and int(group) != 0)
    last_user = max(i for i, (keyword, _) in enumerate(stage) if keyword == "USER")
    assert all(keyword != "RUN" for keyword, _ in stage[last_user:]), "nothing may run after switching user"
    (entrypoint,) = [args for keyword, args in stage if keyword == "ENTRYPOINT"]
    assert _exec_form(entrypoint) == ["fabrica"]
    (cmd,) = [args for keyword, args in stage if keyword == "CMD"]
    assert _exec_form(cmd) == ["serve", "config"]


def _runs() -> list[list[str]]:
    """Each shell command of each RUN, split into words."""
    commands = []
    for keyword, args in _dockerfile():
        if keyword == "RUN":
            for command in re.split(r"&&|;", args):
                commands.append(shlex.split(command))
    return commands


def test_dockerfile_installs_pinned_requirements_then_the_project() -> None:
    runs = _runs()

    def index(predicate: Any) -> int:
        found = [i for i, words in enumerate(runs) if predicate(words)]
        assert found, "missing install step"
        return found[0]

    def pip_install(words: list[str]) -> bool:
        return "pip" in [Path(w).name for w in words] and "install" in words

    requirements = index(lambda w: pip_install(w) and "-r" in w and w[w.index("-r") + 1] == "requirements.txt")
    project = index(lambda w: pip_install(w) and "--no-deps" in w and "." in w)
    assert requirements < project


def test_dockerfile_copies_what_exists_and_is_not_ignored() -> None:
    copies = [args.split() for keyword, args in _dockerfile() if keyword == "COPY"]
    sources = [src for args in copies if not any(a.startswith("--from") for a in args) for src in args[:-1]
               if not src.startswith("--")]
    for needed in ("requirements.txt", "pyproject.toml", "gen/", "services/"):
        assert needed in sources, f"the Dockerfile does not copy {needed}"
    readme = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"].get("readme")
    if isinstance(readme, str):
        assert readme in sources, f"pyproject.toml names {readme}: `pip install .` needs it"
    for source in sources:
        path = ROOT / source
        assert path.exists(), f"COPY {source}: no such file in the build context"
        files = [path] if path.is_file() else [p for p in path.rglob("*.py") if "__pycache__" not in p.parts]
        assert files, f"COPY {source}: nothing to copy"
        for file in files:
            relative = file.relative_to(ROOT).as_posix()
            assert not _dockerignore_excludes(relative), f".dockerignore leaves out {relative}"


def test_dockerignore_keeps_local_state_out_of_the_context() -> None:
    for path in (".git/HEAD", ".venv/bin/python", ".fabrica/postgres/PG_VERSION", "tests/conftest.py",
                 "services/fabrica_svc/__pycache__/cli.cpython-311.pyc"):
        assert _dockerignore_excludes(path), f"{path} would be sent to the docker build"
