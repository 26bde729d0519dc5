"""deploy/kubernetes: every manifest and every render validates, and the render is safe.

Schemas come from kubernetes-validate (strict: unknown fields fail), for the oldest
Kubernetes these manifests support and the newest the package ships. Rendering uses
``kubectl kustomize``. The rendered example is then held to the sidecar contract:
native sidecar, gRPC probes on the probe port, loopback-only API, bearer tokens from a
Secret for memsvc and the agent, hardened pods, and a configuration memsvc itself
accepts; the example with components/tls adds mutual TLS from Secrets.
"""

from __future__ import annotations

import base64
import ipaddress
import re
import subprocess
import tomllib
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import kubernetes_validate  # type: ignore[import-untyped]
import kubernetes_validate.utils  # type: ignore[import-untyped]
import pytest
import yaml  # type: ignore[import-untyped]

from memsvc import config as memsvc_config
from memsvc.auth import parse_tokens
from tests.deploy.support import KUBERNETES, ROOT, parsed_dockerfile, require_tool

Doc = dict[str, Any]

# Native sidecars (initContainers with restartPolicy: Always) are on by default from
# Kubernetes 1.29 (beta) and GA in 1.33; gRPC probes are GA since 1.27.
OLDEST = "1.30.0"
KUBERNETES_VERSIONS = sorted({OLDEST, kubernetes_validate.utils.latest_version()})


def _is_component(directory: Path) -> bool:
    """A kustomize Component: it is rendered as part of an overlay, never alone."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    return bool(kustomization.get("kind") == "Component")


_DIRECTORIES = sorted(p.parent for p in KUBERNETES.rglob("kustomization.yaml"))
KUSTOMIZATIONS = [d for d in _DIRECTORIES if not _is_component(d)]
COMPONENTS = [d for d in _DIRECTORIES if _is_component(d)]
MANIFESTS = sorted(p for p in KUBERNETES.rglob("*.yaml") if p.name not in ("kustomization.yaml",))
EXAMPLE = KUBERNETES / "overlays" / "example"
EXAMPLE_TLS = KUBERNETES / "overlays" / "example-tls"
PROBE_PORT = 8081
METRICS_PORT = 9464
WORKLOADS = {"Deployment", "StatefulSet", "DaemonSet", "Job"}


def _name(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def _load_all(text: str) -> list[Doc]:
    return [doc for doc in yaml.safe_load_all(text) if doc]


@cache
def render(directory: Path) -> tuple[Doc, ...]:
    kubectl = require_tool("kubectl")
    result = subprocess.run(
        [kubectl, "kustomize", str(directory)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, f"kubectl kustomize {_name(directory)}:\n{result.stderr}"
    return tuple(_load_all(result.stdout))


def _validate(doc: Doc, version: str, where: str) -> None:
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as error:
        path = ".".join(str(p) for p in error.path)
        resource = f"{doc['kind']}/{doc['metadata']['name']}"
        pytest.fail(f"{where}: {resource} on {version}: {path}: {error.message}")
    except kubernetes_validate.SchemaNotFoundError as error:
        pytest.fail(f"{where}: no schema: {error.message}")


def _one(docs: tuple[Doc, ...], kind: str, name: str | None = None) -> Doc:
    found = [
        d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)
    ]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def _generated(docs: tuple[Doc, ...], kind: str, prefix: str) -> Doc:
    """A generated ConfigMap/Secret, whose name carries a content hash suffix."""
    found = [
        d
        for d in docs
        if d["kind"] == kind and re.fullmatch(rf"{prefix}-[a-z0-9]{{10}}", d["metadata"]["name"])
    ]
    assert len(found) == 1, f"expected one generated {kind} {prefix}-<hash>"
    return found[0]


def _pod_specs(docs: tuple[Doc, ...]) -> Iterator[tuple[str, Doc]]:
    for doc in docs:
        if doc["kind"] in WORKLOADS:
            yield f"{doc['kind']}/{doc['metadata']['name']}", doc["spec"]["template"]["spec"]


def _containers(pod: Doc) -> list[Doc]:
    return [*pod.get("initContainers", []), *pod["containers"]]


def _agent_pod(docs: tuple[Doc, ...]) -> Doc:
    spec: Doc = _one(docs, "Deployment", "agent")["spec"]["template"]["spec"]
    return spec


def _sidecar(docs: tuple[Doc, ...]) -> Doc:
    pod = _agent_pod(docs)
    found: list[Doc] = [c for c in pod.get("initContainers", []) if c["name"] == "memsvc"]
    assert len(found) == 1, "memsvc must be an init container (a native sidecar)"
    assert all(c["name"] != "memsvc" for c in pod["containers"])
    return found[0]


def _secret_data(secret: Doc) -> dict[str, str]:
    if "stringData" in secret:
        return dict(secret["stringData"])
    return {k: base64.b64decode(v).decode() for k, v in secret.get("data", {}).items()}


def _host_port(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    return host.strip("[]"), int(port)


def _service_link_env(services: list[Doc]) -> dict[str, str]:
    """What enableServiceLinks: true would inject for these Services (kubelet's rules)."""
    env: dict[str, str] = {}
    for service in services:
        prefix = service["metadata"]["name"].upper().replace("-", "_")
        for port in service["spec"]["ports"]:
            protocol = port.get("protocol", "TCP")
            env[f"{prefix}_SERVICE_HOST"] = "10.0.0.1"
            env[f"{prefix}_SERVICE_PORT"] = str(port["port"])
            if "name" in port:
                env[f"{prefix}_SERVICE_PORT_{port['name'].upper().replace('-', '_')}"] = str(
                    port["port"]
                )
            base = f"{prefix}_PORT_{port['port']}_{protocol}"
            env[f"{prefix}_PORT"] = f"{protocol.lower()}://10.0.0.1:{port['port']}"
            env[base] = env[f"{prefix}_PORT"]
            env[f"{base}_PROTO"] = protocol.lower()
            env[f"{base}_PORT"] = str(port["port"])
            env[f"{base}_ADDR"] = "10.0.0.1"
    return env


# ---- validation -------------------------------------------------------------------


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("manifest", MANIFESTS, ids=_name)
def test_every_manifest_validates(manifest: Path, version: str):
    docs = _load_all(manifest.read_text())
    assert docs, f"{_name(manifest)} holds no resource"
    for doc in docs:
        _validate(doc, version, _name(manifest))


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=_name)
def test_every_kustomization_renders_and_the_render_validates(directory: Path, version: str):
    docs = render(directory)
    assert docs
    for doc in docs:
        _validate(doc, version, f"kubectl kustomize {_name(directory)}")


def test_the_native_sidecar_needs_kubernetes_1_28_or_newer():
    """The schemas know the field: an older one must refuse it (so validation means something)."""
    pod_with_sidecar = _one(render(EXAMPLE), "Deployment", "agent")
    with pytest.raises(kubernetes_validate.ValidationError, match="restartPolicy"):
        kubernetes_validate.validate(pod_with_sidecar, "1.27.0", strict=True)


def test_every_manifest_file_is_part_of_a_kustomization():
    listed: set[Path] = set()
    components: set[Path] = set()
    for directory in KUSTOMIZATIONS:
        kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
        for entry in kustomization.get("resources", []):
            listed.add((directory / entry).resolve())
        for entry in kustomization.get("components", []):
            components.add((directory / entry).resolve())
    orphans = [_name(m) for m in MANIFESTS if m.resolve() not in listed]
    assert not orphans, f"manifests no kustomization uses: {orphans}"
    unused = [_name(c) for c in COMPONENTS if c.resolve() not in components]
    assert not unused, f"components no kustomization uses: {unused}"
    assert EXAMPLE in KUSTOMIZATIONS and EXAMPLE_TLS in KUSTOMIZATIONS


# ---- the sidecar contract, on the rendered example --------------------------------


def test_memsvc_is_a_native_sidecar_with_grpc_probes_on_the_probe_port():
    for directory in (KUBERNETES / "base", EXAMPLE):
        sidecar = _sidecar(render(directory))
        assert sidecar["restartPolicy"] == "Always"
        expected = {
            "startupProbe": "liveness",
            "livenessProbe": "liveness",
            "readinessProbe": "readiness",
        }
        for probe, service in expected.items():
            assert sidecar[probe]["grpc"] == {"port": PROBE_PORT, "service": service}, probe
            assert set(sidecar[probe]) & {"grpc", "httpGet", "tcpSocket", "exec"} == {"grpc"}
        ports = {p["containerPort"]: p["name"] for p in sidecar["ports"]}
        assert ports == {PROBE_PORT: "grpc-health", METRICS_PORT: "metrics"}


def test_memsvc_reads_its_settings_from_the_configmap_and_the_secret():
    docs = render(EXAMPLE)
    sidecar = _sidecar(docs)
    config_map = _generated(docs, "ConfigMap", "memsvc-config")
    secret = _generated(docs, "Secret", "memsvc-database")
    sources = [next(iter(source.values()))["name"] for source in sidecar["envFrom"]]
    assert sources == [config_map["metadata"]["name"], secret["metadata"]["name"]]
    assert "env" not in sidecar, "settings belong in the ConfigMap or the Secret"
    assert "MEMSVC_DATABASE_URL" not in config_map["data"], "the password stays in the Secret"
    assert set(_secret_data(secret)) == {"MEMSVC_DATABASE_URL"}


@pytest.mark.parametrize("overlay", [EXAMPLE, EXAMPLE_TLS], ids=_name)
def test_memsvc_accepts_the_pods_environment_even_with_service_links(overlay: Path):
    docs = render(overlay)
    env = dict(_generated(docs, "ConfigMap", "memsvc-config")["data"])
    env.update(_secret_data(_generated(docs, "Secret", "memsvc-database")))
    services = [d for d in docs if d["kind"] == "Service"]
    # enableServiceLinks is false, but were it on, memsvc must still start.
    env.update(_service_link_env(services))
    loaded = memsvc_config.load({}, env)

    host, port = _host_port(loaded.listen)
    assert host == "localhost" or ipaddress.ip_address(host).is_loopback, loaded.listen
    assert _host_port(loaded.health_listen) == ("0.0.0.0", PROBE_PORT)
    assert _host_port(loaded.metrics_listen) == ("0.0.0.0", METRICS_PORT)
    assert loaded.working_memory_url.startswith("redis://")
    assert loaded.database_url.startswith("postgresql://")
    # The API port is on no container port and behind no Service.
    assert port not in {
        p["containerPort"] for c in _containers(_agent_pod(docs)) for p in c.get("ports", [])
    }
    for service in services:
        for service_port in service["spec"]["ports"]:
            assert port not in (service_port["port"], service_port.get("targetPort"))


def test_the_backends_urls_point_at_the_example_services_and_credentials():
    docs = render(EXAMPLE)
    env = _generated(docs, "ConfigMap", "memsvc-config")["data"]
    database = urlsplit(
        _secret_data(_generated(docs, "Secret", "memsvc-database"))["MEMSVC_DATABASE_URL"]
    )
    postgres = _secret_data(_generated(docs, "Secret", "postgres-credentials"))
    assert database.username == postgres["POSTGRES_USER"]
    assert unquote(database.password or "") == postgres["POSTGRES_PASSWORD"]
    assert database.path.lstrip("/") == postgres["POSTGRES_DB"]
    redis = urlsplit(env["MEMSVC_WORKING_MEMORY_URL"])
    for url, name in ((database, "postgres"), (redis, "redis")):
        service = _one(docs, "Service", name)
        assert url.hostname == name
        assert url.port in {p["port"] for p in service["spec"]["ports"]}
    postgres_pod = _one(docs, "StatefulSet", "postgres")["spec"]["template"]["spec"]
    credentials = _generated(docs, "Secret", "postgres-credentials")["metadata"]["name"]
    assert postgres_pod["containers"][0]["envFrom"] == [{"secretRef": {"name": credentials}}]
    redis_args = _one(docs, "StatefulSet", "redis")["spec"]["template"]["spec"]["containers"][0][
        "args"
    ]
    assert redis_args[redis_args.index("--maxmemory-policy") + 1] == "noeviction"


def test_the_agent_reaches_memsvc_through_the_shared_socket_volume():
    docs = render(EXAMPLE)
    pod = _agent_pod(docs)
    env = _generated(docs, "ConfigMap", "memsvc-config")["data"]
    socket_dir = str(Path(env["MEMSVC_UNIX_SOCKET"]).parent)
    sidecar, agent = _sidecar(docs), _one_container(pod, "agent")
    volumes = {v["name"]: v for v in pod["volumes"]}

    def mounted(container: Doc, path: str) -> Doc:
        found: list[Doc] = [m for m in container["volumeMounts"] if m["mountPath"] == path]
        assert len(found) == 1, f"{container['name']} mounts nothing at {path}"
        return found[0]

    shared = mounted(sidecar, socket_dir)["name"]
    assert mounted(agent, socket_dir)["name"] == shared
    assert "emptyDir" in volumes[shared]
    # The root filesystem is read-only: the data dir and /tmp are emptyDirs too.
    for path in (env["MEMSVC_DATA_DIR"], "/tmp"):
        assert "emptyDir" in volumes[mounted(sidecar, path)["name"]]
    targets = {e["value"] for e in agent["env"]}
    assert f"unix://{env['MEMSVC_UNIX_SOCKET']}" in targets
    assert env["MEMSVC_LISTEN"] in targets
    assert not [e["name"] for e in agent["env"] if e["name"].startswith("MEMSVC_")]


def _one_container(pod: Doc, name: str) -> Doc:
    found = [c for c in _containers(pod) if c["name"] == name]
    assert len(found) == 1
    return found[0]


def test_every_pod_is_hardened_to_the_restricted_pod_security_standard():
    docs = render(EXAMPLE)
    namespace = _one(docs, "Namespace")
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    allowed_volumes = {"emptyDir", "configMap", "secret", "persistentVolumeClaim", "projected",
                       "downwardAPI", "ephemeral", "csi"}  # fmt: skip
    pods = list(_pod_specs(docs))
    assert {name for name, _ in pods} == {
        "Deployment/agent",
        "StatefulSet/redis",
        "StatefulSet/postgres",
    }
    for name, pod in pods:
        assert pod["enableServiceLinks"] is False, name
        assert pod["automountServiceAccountToken"] is False, name
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["securityContext"].get("runAsUser", 1) != 0, name
        for volume in pod.get("volumes", []):
            assert set(volume) - {"name"} <= allowed_volumes, (name, volume)
        for container in _containers(pod):
            where = f"{name}/{container['name']}"
            security = container["securityContext"]
            assert security["allowPrivilegeEscalation"] is False, where
            assert security["readOnlyRootFilesystem"] is True, where
            assert security["capabilities"]["drop"] == ["ALL"], where
            assert "add" not in security["capabilities"], where
            assert security.get("privileged", False) is False, where
            seccomp = security.get("seccompProfile") or pod["securityContext"].get("seccompProfile")
            assert seccomp == {"type": "RuntimeDefault"}, where
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(container["resources"][kind]), (where, kind)
            assert not any(p.get("hostPort") for p in container.get("ports", [])), where


def test_memsvc_runs_as_the_images_user_and_is_given_time_to_shut_down():
    docs = render(EXAMPLE)
    pod, sidecar = _agent_pod(docs), _sidecar(docs)
    user = parsed_dockerfile().final.last("USER")
    assert user is not None
    uid, _, gid = user.text.partition(":")
    assert sidecar["securityContext"]["runAsUser"] == int(uid)
    assert sidecar["securityContext"]["runAsGroup"] == int(gid)
    # The agent runs as a UID of its own and reaches the socket (mode 0660) through its
    # group: the pod's fsGroup, a supplementary group of every container of the pod.
    agent = _one_container(pod, "agent")
    assert agent["securityContext"]["runAsUser"] != int(uid)
    env = _generated(docs, "ConfigMap", "memsvc-config")["data"]
    assert env["MEMSVC_UNIX_SOCKET_GROUP"] == str(pod["securityContext"]["fsGroup"])
    grace = float(
        _generated(docs, "ConfigMap", "memsvc-config")["data"]["MEMSVC_SHUTDOWN_GRACE_SECONDS"]
    )
    assert pod["terminationGracePeriodSeconds"] >= grace + 10


def test_the_metrics_service_selects_the_agent_pods_on_the_metrics_port():
    docs = render(EXAMPLE)
    service = _one(docs, "Service", "agent-memsvc-metrics")
    deployment = _one(docs, "Deployment", "agent")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    annotations = service["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(METRICS_PORT)
    assert annotations["prometheus.io/path"] == "/metrics"
    # By number: Kubernetes before 1.33 resolves no named port of a native sidecar
    # for EndpointSlices (kubernetes/kubernetes#127958), and the manifests say 1.29+.
    assert [(p["port"], p["targetPort"]) for p in service["spec"]["ports"]] == [
        (METRICS_PORT, METRICS_PORT)
    ]
    # No Service may be named memsvc-*: with service links on it would inject MEMSVC_* names.
    assert not [
        d for d in docs if d["kind"] == "Service" and d["metadata"]["name"].startswith("memsvc")
    ]


def test_the_example_deploys_this_release_from_tagged_images():
    docs = render(EXAMPLE)
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    images = {c["name"]: c["image"] for _, pod in _pod_specs(docs) for c in _containers(pod)}
    for name, image in images.items():
        repository, _, tag = image.rpartition(":")
        assert repository and "/" not in tag and tag not in ("", "latest"), (name, image)
    assert images["memsvc"].endswith(f"/memsvc:{version}"), (images["memsvc"], version)
    assert (
        _one(docs, "Deployment", "agent")["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"]
        == 0
    )


def _mount_of(container: Doc, pod: Doc, path: str) -> Doc:
    """The volume ``path`` lies in, for ``container`` (its mount must not use subPath,
    which would freeze a Secret's file at the pod's start)."""
    volumes = {v["name"]: v for v in pod["volumes"]}
    found = [m for m in container["volumeMounts"] if Path(path).is_relative_to(m["mountPath"])]
    assert len(found) == 1, f"{container['name']} mounts nothing holding {path}"
    assert "subPath" not in found[0], "a subPath mount never sees the Secret's updates"
    assert found[0].get("readOnly") is True
    volume: Doc = volumes[found[0]["name"]]
    return volume


def test_memsvc_and_the_agent_take_their_tokens_from_one_secret():
    docs = render(EXAMPLE)
    pod = _agent_pod(docs)
    sidecar, agent = _sidecar(docs), _one_container(pod, "agent")
    env = _generated(docs, "ConfigMap", "memsvc-config")["data"]
    tokens_path = env["MEMSVC_AUTH_TOKENS_FILE"]
    served = _mount_of(sidecar, pod, tokens_path)["secret"]
    # Not generated with a hash suffix: updated in place, reloaded without a rollout.
    secret = _one(docs, "Secret", served["secretName"])
    items = {i["path"]: i["key"] for i in served["items"]}
    assert items == {Path(tokens_path).name: "tokens"}
    agent_env = {e["name"]: e["value"] for e in agent["env"]}
    agent_token_path = agent_env["MEMORY_SIDECAR_TOKEN_FILE"]
    own = _mount_of(agent, pod, agent_token_path)["secret"]
    assert own["secretName"] == served["secretName"]
    # The agent sees its own token only, not memsvc's tokens file.
    assert {i["path"]: i["key"] for i in own["items"]} == {
        Path(agent_token_path).name: "agent-token"
    }
    assert all(not Path(tokens_path).is_relative_to(m["mountPath"]) for m in agent["volumeMounts"])
    # Readable by the pod's group (memsvc and the agent), nobody else.
    assert served["defaultMode"] == own["defaultMode"] == 0o440
    data = _secret_data(secret)
    table = parse_tokens(data["tokens"], "the memsvc-auth Secret")
    grant = table.lookup(data["agent-token"].strip())
    assert grant is not None, "memsvc would refuse the agent"
    # A placeholder anyone can read: bound to one project, never to every one (a review).
    assert grant.projects is not None and len(grant.projects) == 1


def test_the_tls_example_gives_memsvc_and_the_agent_their_certificates():
    docs = render(EXAMPLE_TLS)
    pod = _agent_pod(docs)
    sidecar, agent = _sidecar(docs), _one_container(pod, "agent")
    config = memsvc_config.load({}, _generated(docs, "ConfigMap", "memsvc-config")["data"])
    assert config.tls_cert_file and config.tls_key_file and config.tls_client_ca_file
    assert config.auth_tokens_file, "TLS comes on top of the tokens"
    host, _ = _host_port(config.listen)
    assert ipaddress.ip_address(host).is_loopback
    for path in (config.tls_cert_file, config.tls_key_file, config.tls_client_ca_file):
        assert _mount_of(sidecar, pod, path)["secret"]["secretName"] == "memsvc-tls"
    agent_env = {e["name"]: e["value"] for e in agent["env"]}
    for name in ("MEMORY_SIDECAR_TLS_CA", "MEMORY_SIDECAR_TLS_CERT", "MEMORY_SIDECAR_TLS_KEY"):
        assert _mount_of(agent, pod, agent_env[name])["secret"]["secretName"] == "agent-tls"
    # Everything else is the example's.
    assert _sidecar(render(EXAMPLE))["args"] == sidecar["args"]
