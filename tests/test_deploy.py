"""deploy/ renders into valid Kubernetes manifests that keep the promises of DESIGN.md, section 4.

Every kustomization (the base, each overlay, and the base with the mtls component) is rendered
offline by tests/kustomize_render.py, compared with `kubectl kustomize` where kubectl is
installed, validated against the Kubernetes 1.31 schemas in strict mode (an unknown field
fails), and checked for what the project promises: one image, gRPC probes on the port named
`grpc`, non-root read-only pods with requests and limits, a PodDisruptionBudget and an
autoscaler per service, NetworkPolicies that let through exactly the calls the code makes, and
settings that are all real.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from concurrent import futures
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

import grpc
import kubernetes_validate
import pytest
import yaml
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from opentelemetry.sdk import environment_variables as otel_variables
from pydantic import BaseModel, TypeAdapter

from profilemesh.services.activation.app import SOURCES as ACTIVATION_LOG_SOURCES
from profilemesh.services.cli import main as cli_main
from profilemesh.shared.settings import SERVICE_NAMES, Settings
from tests.conftest import free_port
from tests.kustomize_render import (
    Manifest,
    containers,
    load_documents,
    load_kustomization,
    render,
    split_image,
)

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
BASE = DEPLOY / "base"
KUBERNETES_VERSION = "1.31"
APP = {"app.kubernetes.io/name": "profilemesh"}
CLIENT_LABEL = "profilemesh.io/client"
GRPC_PORT = 50051
MTLS_PROBE = ["profilemesh", "status", "--target", f"127.0.0.1:{GRPC_PORT}", "--timeout", "2"]
RENDERINGS = ("base", "dev", "production", "mtls")


# --- rendering ---------------------------------------------------------------------------


def _kustomization_dirs(tmp: Path) -> dict[str, Path]:
    # No overlay turns mtls on: a throwaway kustomization adds the component to the base.
    mtls = tmp / "mtls"
    mtls.mkdir()
    relative = Path(os.path.relpath(DEPLOY, mtls))
    (mtls / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "resources": [str(relative / "base")],
                "components": [str(relative / "components" / "mtls")],
            }
        )
    )
    return {
        "base": BASE,
        "dev": DEPLOY / "overlays" / "dev",
        "production": DEPLOY / "overlays" / "production",
        "mtls": mtls,
    }


@pytest.fixture(scope="module")
def kustomizations(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return _kustomization_dirs(tmp_path_factory.mktemp("kustomizations"))


@pytest.fixture(scope="module")
def rendered(kustomizations: dict[str, Path]) -> dict[str, list[Manifest]]:
    return {name: render(path) for name, path in kustomizations.items()}


def _key(manifest: Manifest) -> tuple[str, str, str]:
    metadata = manifest["metadata"]
    return manifest["kind"], metadata.get("namespace", ""), metadata["name"]


def _of_kind(manifests: list[Manifest], kind: str) -> list[Manifest]:
    return [m for m in manifests if m["kind"] == kind]


def _named(manifests: list[Manifest], kind: str, name: str) -> Manifest:
    [manifest] = [m for m in _of_kind(manifests, kind) if m["metadata"]["name"] == name]
    return manifest


def _app_deployments(manifests: list[Manifest]) -> list[Manifest]:
    deployments = [
        m
        for m in _of_kind(manifests, "Deployment")
        if m["metadata"]["labels"].get("app.kubernetes.io/name") == "profilemesh"
    ]
    assert len(deployments) == len(SERVICE_NAMES)
    return deployments


def _container(deployment: Manifest) -> Manifest:
    [container] = containers(deployment)
    return container


def _grpc_port(container: Manifest) -> int:
    [port] = [p for p in container["ports"] if p["name"] == "grpc"]
    number: int = port["containerPort"]
    return number


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
@pytest.mark.parametrize("name", RENDERINGS)
def test_the_renderer_agrees_with_kubectl_kustomize(
    name: str, kustomizations: dict[str, Path], rendered: dict[str, list[Manifest]]
) -> None:
    output = subprocess.run(
        ["kubectl", "kustomize", str(kustomizations[name])],
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    expected = sorted((doc for doc in yaml.safe_load_all(output) if doc), key=_key)
    assert sorted(rendered[name], key=_key) == expected


@pytest.mark.parametrize("name", RENDERINGS)
def test_every_manifest_is_valid_for_kubernetes_in_strict_mode(
    name: str, rendered: dict[str, list[Manifest]]
) -> None:
    for manifest in rendered[name]:
        try:
            kubernetes_validate.validate(manifest, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as error:
            path = ".".join(str(part) for part in error.path)
            pytest.fail(f"{name}: {_key(manifest)} at {path}: {error.message}")


def test_the_secret_example_is_valid_but_never_rendered(
    rendered: dict[str, list[Manifest]],
) -> None:
    [secret] = load_documents(BASE / "secret.example.yaml")
    kubernetes_validate.validate(secret, KUBERNETES_VERSION, strict=True)
    assert secret["metadata"]["name"] == "profilemesh-secrets"
    for manifests in rendered.values():
        assert not _of_kind(manifests, "Secret")


def test_the_base_lists_every_resource_file_except_the_secret_example() -> None:
    listed = set(load_kustomization(BASE)["resources"])
    files = {p.name for p in BASE.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == files - {"secret.example.yaml"}
    assert "namespace" not in load_kustomization(BASE)
    for manifest in render(BASE):
        assert "namespace" not in manifest["metadata"], _key(manifest)


# --- services ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", RENDERINGS)
def test_every_service_has_a_deployment_service_budget_and_autoscaler(
    name: str, rendered: dict[str, list[Manifest]]
) -> None:
    manifests = rendered[name]
    for service in SERVICE_NAMES:
        full = f"profilemesh-{service}"
        labels = {**APP, "app.kubernetes.io/component": service}
        deployment = _named(manifests, "Deployment", full)
        assert deployment["spec"]["selector"]["matchLabels"] == labels
        assert deployment["spec"]["template"]["metadata"]["labels"] == labels
        # The autoscaler owns the replica count.
        assert "replicas" not in deployment["spec"]
        assert _container(deployment)["args"] == ["serve", service]

        kube_service = _named(manifests, "Service", full)
        assert kube_service["spec"]["selector"] == labels
        [port] = kube_service["spec"]["ports"]
        assert port["name"] == "grpc" and port["appProtocol"] == "grpc"
        assert port["targetPort"] == "grpc"

        budget = _named(manifests, "PodDisruptionBudget", full)
        assert budget["spec"] == {"maxUnavailable": 1, "selector": {"matchLabels": labels}}

        autoscaler = _named(manifests, "HorizontalPodAutoscaler", full)
        assert autoscaler["apiVersion"] == "autoscaling/v2"
        assert autoscaler["spec"]["scaleTargetRef"] == {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "name": full,
        }
        [metric] = autoscaler["spec"]["metrics"]
        assert metric["resource"]["name"] == "cpu"
        assert metric["resource"]["target"] == {"type": "Utilization", "averageUtilization": 70}


SINGLE_REPLICA = ("identity", "activation")
"""Services whose state is held whole in memory: they do not split by partition."""


def test_the_base_scales_the_partitioned_services_and_keeps_the_others_at_one() -> None:
    manifests = render(BASE)
    for service in SERVICE_NAMES:
        spec = _named(manifests, "HorizontalPodAutoscaler", f"profilemesh-{service}")["spec"]
        expected = (1, 1) if service in SINGLE_REPLICA else (2, 10 if service == "ingestion" else 6)
        assert (spec["minReplicas"], spec["maxReplicas"]) == expected


@pytest.mark.parametrize("name", RENDERINGS)
def test_pods_run_as_a_non_root_user_on_a_read_only_root(
    name: str, rendered: dict[str, list[Manifest]]
) -> None:
    manifests = rendered[name]
    config = _named(manifests, "ConfigMap", "profilemesh-config")
    data_dir = config["data"]["PROFILEMESH_DATA_DIR"]
    [account] = _of_kind(manifests, "ServiceAccount")
    assert account["automountServiceAccountToken"] is False
    for deployment in _app_deployments(manifests):
        pod = deployment["spec"]["template"]["spec"]
        assert pod["serviceAccountName"] == account["metadata"]["name"]
        assert pod["automountServiceAccountToken"] is False
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] == 10001
        container = _container(deployment)
        security = container["securityContext"]
        assert security["runAsNonRoot"] is True
        assert security["runAsUser"] == 10001
        assert security["readOnlyRootFilesystem"] is True
        assert security["allowPrivilegeEscalation"] is False
        assert security["capabilities"] == {"drop": ["ALL"]}
        assert security["seccompProfile"] == {"type": "RuntimeDefault"}
        # The only writable places are emptyDir volumes at /tmp and the data directory.
        volumes = {volume["name"]: volume for volume in pod["volumes"]}
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        for path in ("/tmp", data_dir):
            assert "emptyDir" in volumes[mounts[path]], path
        for kind in ("requests", "limits"):
            assert set(container["resources"][kind]) == {"cpu", "memory"}, kind


@pytest.mark.parametrize("name", ["base", "dev", "production"])
def test_probes_are_native_grpc_on_the_port_named_grpc(
    name: str, rendered: dict[str, list[Manifest]]
) -> None:
    for deployment in _app_deployments(rendered[name]):
        container = _container(deployment)
        port = _grpc_port(container)
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert container[probe]["grpc"] == {"port": port}, probe


def test_with_mtls_the_probes_run_profilemesh_status_with_the_pods_certificate(
    rendered: dict[str, list[Manifest]],
) -> None:
    manifests = rendered["mtls"]
    config = _named(manifests, "ConfigMap", "profilemesh-config")["data"]
    assert config["PROFILEMESH_TLS__ENABLED"] == "true"
    for deployment in _app_deployments(manifests):
        container = _container(deployment)
        assert MTLS_PROBE[3] == f"127.0.0.1:{_grpc_port(container)}"
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert "grpc" not in container[probe]
            assert container[probe]["exec"]["command"] == MTLS_PROBE
        [mount] = [m for m in container["volumeMounts"] if m["name"] == "tls"]
        for setting in ("CA_FILE", "CERT_FILE", "KEY_FILE"):
            assert Path(config[f"PROFILEMESH_TLS__{setting}"]).parent == Path(mount["mountPath"])
        [volume] = [
            v for v in deployment["spec"]["template"]["spec"]["volumes"] if v["name"] == "tls"
        ]
        assert volume["secret"]["secretName"] == "profilemesh-tls"


class _Health:
    """A real gRPC server answering grpc.health.v1 with a chosen status."""

    def __init__(self, status: int) -> None:
        self.port = free_port()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        servicer = health.HealthServicer()
        servicer.set("", status)
        health_pb2_grpc.add_HealthServicer_to_server(servicer, self.server)
        self.server.add_insecure_port(f"127.0.0.1:{self.port}")

    def __enter__(self) -> _Health:
        self.server.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.stop(None)


def _status_of(target: str, monkeypatch: pytest.MonkeyPatch) -> tuple[int, str]:
    """Run the mtls probe's own command line, aimed at ``target``, without TLS."""
    monkeypatch.setenv("PROFILEMESH_TLS__ENABLED", "false")
    arguments = MTLS_PROBE[1:]
    arguments[arguments.index("--target") + 1] = target
    out = io.StringIO()
    with redirect_stdout(out):
        code = cli_main(arguments)
    return code, out.getvalue()


@pytest.mark.parametrize(
    ("status", "exit_code"),
    [(health_pb2.HealthCheckResponse.SERVING, 0), (health_pb2.HealthCheckResponse.NOT_SERVING, 1)],
)
def test_the_mtls_probe_command_exits_zero_only_for_a_serving_server(
    status: int, exit_code: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    with _Health(status) as server:
        code, output = _status_of(f"127.0.0.1:{server.port}", monkeypatch)
    assert code == exit_code
    assert output.split() == [
        "server",
        f"127.0.0.1:{server.port}",
        health_pb2.HealthCheckResponse.ServingStatus.Name(status),
    ]


def test_the_mtls_probe_command_fails_when_nothing_listens(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    code, output = _status_of(f"127.0.0.1:{free_port()}", monkeypatch)
    assert code == 1 and output.split()[-1] == "UNREACHABLE"


# --- images ------------------------------------------------------------------------------


def test_every_service_runs_the_same_image(rendered: dict[str, list[Manifest]]) -> None:
    images = {
        name: {_container(d)["image"] for d in _app_deployments(manifests)}
        for name, manifests in rendered.items()
    }
    assert all(len(found) == 1 for found in images.values()), images
    assert images["base"] == {"profilemesh"}
    assert images["dev"] == {"profilemesh:dev"}
    [production] = images["production"]
    _, tag, digest = split_image(production)
    assert (tag or digest) and tag != "latest", production


# --- overlays ----------------------------------------------------------------------------


def test_dev_runs_one_small_pod_per_service_and_a_collector(
    rendered: dict[str, list[Manifest]],
) -> None:
    manifests = rendered["dev"]
    base = render(BASE)
    for autoscaler in _of_kind(manifests, "HorizontalPodAutoscaler"):
        assert (autoscaler["spec"]["minReplicas"], autoscaler["spec"]["maxReplicas"]) == (1, 1)
    for deployment in _app_deployments(manifests):
        small = _container(deployment)["resources"]["requests"]
        original = _named(base, "Deployment", deployment["metadata"]["name"])
        assert small != _container(original)["resources"]["requests"]
    _named(manifests, "Deployment", "profilemesh-otel-collector")
    _named(manifests, "Service", "profilemesh-otel-collector")
    config = _named(manifests, "ConfigMap", "profilemesh-config")["data"]
    assert config["OTEL_TRACES_EXPORTER"] == "otlp"
    assert config["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://profilemesh-otel-collector:4317"


def test_the_collector_pipeline_names_only_components_it_configures(
    rendered: dict[str, list[Manifest]],
) -> None:
    config_map = _named(rendered["dev"], "ConfigMap", "profilemesh-otel-collector")
    config = yaml.safe_load(config_map["data"]["config.yaml"])
    [pipeline] = config["service"]["pipelines"].values()
    assert pipeline["receivers"] == ["otlp"]
    assert "grpc" in config["receivers"]["otlp"]["protocols"]
    for section in ("receivers", "processors", "exporters"):
        assert set(pipeline[section]) <= set(config[section]), section
    deployment = _named(rendered["dev"], "Deployment", "profilemesh-otel-collector")
    assert _container(deployment)["args"] == ["--config=/etc/otelcol/config.yaml"]


def test_production_runs_three_replicas_of_features_at_least(
    rendered: dict[str, list[Manifest]],
) -> None:
    manifests = rendered["production"]
    for service in SERVICE_NAMES:
        spec = _named(manifests, "HorizontalPodAutoscaler", f"profilemesh-{service}")["spec"]
        floor = 1 if service in SINGLE_REPLICA else 3 if service == "features" else 2
        assert spec["minReplicas"] == floor
        assert spec["maxReplicas"] >= spec["minReplicas"]
    assert {m["metadata"]["namespace"] for m in manifests} == {"profilemesh"}


# --- network policies --------------------------------------------------------------------


def _calls_in_the_code() -> dict[str, set[str]]:
    """callee -> the services whose code calls it, read from each service's package."""
    patterns = [
        r'channel_to\(\s*"(\w+)"',
        r'remote_log\(\s*settings,\s*"(\w+)"',
        r"clients\.(\w+)\(\)",
        r'open_channel\(\s*"(\w+)"',
    ]
    callers: dict[str, set[str]] = {service: set() for service in SERVICE_NAMES}
    for caller in SERVICE_NAMES:
        for path in (ROOT / "services" / caller).rglob("*.py"):
            text = path.read_text()
            for pattern in patterns:
                for callee in re.findall(pattern, text):
                    if callee in SERVICE_NAMES and callee != caller:
                        callers[callee].add(caller)
    # Activation follows logs listed in a table rather than named in a call.
    for callee in ACTIVATION_LOG_SOURCES:
        callers[callee].add("activation")
    # Every service but identity asks identity to verify its callers' tokens.
    assert 'channel_to("identity"' in (ROOT / "shared" / "auth" / "hosting.py").read_text()
    callers["identity"] |= set(SERVICE_NAMES) - {"identity"}
    return callers


def _selects_app(selector: dict[str, Any], component: str | None = None) -> bool:
    labels = selector.get("matchLabels", {})
    if labels.get("app.kubernetes.io/name") != "profilemesh":
        return False
    return component is None or labels.get("app.kubernetes.io/component") in (None, component)


def test_the_code_calls_what_the_design_says() -> None:
    # A guard on the derivation itself: if this fails, the scan above missed a call.
    calls = _calls_in_the_code()
    assert calls["ingestion"] == {"identity"}
    assert calls["identity"] == {"ingestion", "features", "scoring", "activation"}
    assert calls["features"] == {"scoring", "activation"}
    assert calls["scoring"] == {"activation"}
    assert calls["activation"] == set()


@pytest.mark.parametrize("name", RENDERINGS)
def test_all_traffic_is_denied_by_default(name: str, rendered: dict[str, list[Manifest]]) -> None:
    policies = _of_kind(rendered[name], "NetworkPolicy")
    deny = [
        p
        for p in policies
        if p["spec"]["podSelector"] == {"matchLabels": APP}
        and set(p["spec"]["policyTypes"]) == {"Ingress", "Egress"}
        and not p["spec"].get("ingress")
        and not p["spec"].get("egress")
    ]
    assert len(deny) == 1


METRICS_LABEL = "profilemesh.io/metrics-scraper"


@pytest.mark.parametrize("name", RENDERINGS)
def test_each_service_accepts_exactly_the_calls_the_code_makes_and_clients(
    name: str, rendered: dict[str, list[Manifest]]
) -> None:
    policies = _of_kind(rendered[name], "NetworkPolicy")
    expected = _calls_in_the_code()
    for service in SERVICE_NAMES:
        rules = [
            rule
            for p in policies
            if _selects_app(p["spec"]["podSelector"], service)
            for rule in p["spec"].get("ingress", [])
        ]
        assert rules, f"{service} accepts nothing"
        allowed: set[str] = set()
        clients = False
        for rule in rules:
            if rule["ports"] == [{"port": "metrics", "protocol": "TCP"}]:
                # Prometheus scrapes the metrics port only, from labelled scrapers.
                [scraper] = rule["from"]
                assert scraper["podSelector"] == {"matchLabels": {METRICS_LABEL: "true"}}
                continue
            assert rule["ports"] == [{"port": "grpc", "protocol": "TCP"}]
            for peer in rule["from"]:
                assert set(peer) == {"podSelector"}, peer  # nothing from other namespaces
                selector = peer["podSelector"]
                if selector == {"matchLabels": {CLIENT_LABEL: "true"}}:
                    clients = True
                    continue
                assert selector["matchLabels"] == APP, selector
                [expression] = selector["matchExpressions"]
                assert expression["key"] == "app.kubernetes.io/component"
                assert expression["operator"] == "In"
                allowed |= set(expression["values"])
        assert clients, service
        assert allowed == expected[service], service


@pytest.mark.parametrize("name", RENDERINGS)
def test_pods_may_reach_dns_the_backends_the_collector_and_the_mesh(
    name: str, rendered: dict[str, list[Manifest]]
) -> None:
    rules = [
        rule
        for p in _of_kind(rendered[name], "NetworkPolicy")
        if p["spec"]["podSelector"] == {"matchLabels": APP}
        for rule in p["spec"].get("egress", [])
    ]
    anywhere = {
        (port["port"], port["protocol"])
        for rule in rules
        if "to" not in rule
        for port in rule["ports"]
    }
    # DNS, PostgreSQL, NATS, OTLP.
    assert {(53, "UDP"), (53, "TCP"), (5432, "TCP"), (4222, "TCP"), (4317, "TCP")} <= anywhere
    mesh = [rule for rule in rules if rule.get("to") == [{"podSelector": {"matchLabels": APP}}]]
    assert [rule["ports"] for rule in mesh] == [[{"port": "grpc", "protocol": "TCP"}]]


# --- settings ----------------------------------------------------------------------------


def _environment(manifests: list[Manifest]) -> dict[str, str]:
    """Every variable the pods get: the ConfigMap, the Secret example's keys (which the
    Deployments reference one by one) and literal values."""
    [secret] = load_documents(BASE / "secret.example.yaml")
    config = _named(manifests, "ConfigMap", "profilemesh-config")["data"]
    env = {**config, **secret["stringData"]}
    for deployment in _app_deployments(manifests):
        container = _container(deployment)
        assert container["envFrom"] == [{"configMapRef": {"name": "profilemesh-config"}}]
        for variable in container.get("env", []):
            if "value" in variable:
                env[variable["name"]] = variable["value"]
                continue
            reference = variable["valueFrom"]["secretKeyRef"]
            assert reference["name"] == secret["metadata"]["name"]
            assert reference["key"] == variable["name"]
            assert reference["key"] in secret["stringData"]
    return env


def _field(path: list[str]) -> tuple[Any, str] | None:
    """The model class and field name that a ``PROFILEMESH_A__B`` variable sets, if any."""
    model: type[BaseModel] = Settings
    for index, part in enumerate(path):
        field = model.model_fields.get(part)
        if field is None or field.validation_alias is not None:
            return None
        if index == len(path) - 1:
            return model, part
        if not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return None
        model = field.annotation
    return None


def _attribute(settings: BaseModel, path: list[str]) -> Any:
    value: Any = settings
    for part in path:
        value = getattr(value, part)
    return value


OTEL_ALIASES = {
    choice: name
    for name, field in Settings.model_fields.items()
    if field.validation_alias is not None
    for choice in getattr(field.validation_alias, "choices", [])
    if isinstance(choice, str) and choice.startswith("OTEL_")
}


@pytest.mark.parametrize("name", RENDERINGS)
def test_every_variable_the_pods_get_is_a_setting_that_takes_effect(
    name: str,
    rendered: dict[str, list[Manifest]],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    env = _environment(rendered[name])
    for variable in list(os.environ):
        if variable.startswith(("PROFILEMESH_", "OTEL_")):
            monkeypatch.delenv(variable)
    # The TLS settings insist that their files exist: give them stand-ins with the same names.
    for variable in (
        "PROFILEMESH_TLS__CA_FILE",
        "PROFILEMESH_TLS__CERT_FILE",
        "PROFILEMESH_TLS__KEY_FILE",
    ):
        if variable in env:
            stand_in = tmp_path / Path(env[variable]).name
            stand_in.write_text("pem")
            env[variable] = str(stand_in)
    for variable, value in env.items():
        monkeypatch.setenv(variable, value)
    settings = Settings()

    for variable, value in env.items():
        if variable.startswith("PROFILEMESH_"):
            path = variable.removeprefix("PROFILEMESH_").lower().split("__")
            found = _field(path)
            assert found is not None, f"{variable} is not a setting: it would be ignored"
            model, field = found
            expected = TypeAdapter(model.model_fields[field].annotation).validate_python(value)
            assert _attribute(settings, path) == expected, variable
        elif variable in OTEL_ALIASES:
            assert str(getattr(settings, OTEL_ALIASES[variable])) == value, variable
        else:
            # A standard variable read by the OpenTelemetry SDK or its OTLP exporter.
            assert variable.startswith("OTEL_") and hasattr(otel_variables, variable), variable


def test_no_service_is_told_another_services_trace_name(
    rendered: dict[str, list[Manifest]],
) -> None:
    # One ConfigMap serves every service; each names its own spans profilemesh-<service>.
    for manifests in rendered.values():
        assert "OTEL_SERVICE_NAME" not in _environment(manifests)


# --- image build -------------------------------------------------------------------------


def _dockerfile() -> list[str]:
    """The Dockerfile's instructions, continuation lines joined and comments dropped."""
    text = (DEPLOY / "Dockerfile").read_text()
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    return [i.strip() for i in re.sub(r"\\\n", " ", "\n".join(lines)).splitlines() if i.strip()]


def _stages(instructions: list[str]) -> Iterator[list[str]]:
    stage: list[str] = []
    for instruction in instructions:
        if instruction.upper().startswith("FROM ") and stage:
            yield stage
            stage = []
        stage.append(instruction)
    yield stage


def test_the_image_is_built_in_stages_and_runs_as_a_fixed_non_root_user() -> None:
    instructions = _dockerfile()
    stages = [stage for stage in _stages(instructions) if stage[0].upper().startswith("FROM")]
    assert len(stages) >= 2
    builder, runtime = stages[0], stages[-1]
    assert re.fullmatch(r"FROM \S+ AS builder", builder[0], re.IGNORECASE)
    assert any(re.search(r"pip install '\.\[otlp\]'", i) for i in builder)
    defaults = {m[1]: m[2] for i in instructions if (m := re.fullmatch(r"ARG (\w+)=(\S+)", i))}
    assert runtime[0] == "FROM ${PYTHON_IMAGE}" and defaults["PYTHON_IMAGE"] == "python:3.11-slim"
    assert "COPY --from=builder /opt/profilemesh /opt/profilemesh" in runtime
    # LightGBM's library needs the system's OpenMP runtime.
    assert any("libgomp1" in i for i in runtime if i.startswith("RUN"))
    [user] = [i for i in runtime if i.startswith("USER ")]
    assert user == "USER 10001:10001"
    env = " ".join(i for i in runtime if i.startswith("ENV "))
    assert "PYTHONDONTWRITEBYTECODE=1" in env
    assert "PROFILEMESH_DATA_DIR=/var/lib/profilemesh" in env
    assert runtime[-2:] == ['ENTRYPOINT ["profilemesh"]', 'CMD ["serve", "ingestion"]']
    assert f"EXPOSE {GRPC_PORT}" in runtime


def test_the_image_copies_every_folder_the_package_links_to() -> None:
    copied = {
        i.split()[1].rstrip("/")
        for i in _dockerfile()
        if i.startswith("COPY ") and "--from" not in i
    }
    package = ROOT / "protos" / "profilemesh"
    linked = {Path(os.readlink(path)).name for path in package.iterdir() if path.is_symlink()}
    assert linked == {"shared", "services", "plugins"}
    assert linked | {"protos", "pyproject.toml"} <= copied
    # README.md is the package's readme (pyproject.toml), so the build needs it.
    assert any(i.startswith("COPY pyproject.toml README.md") for i in _dockerfile())


def test_the_build_context_leaves_out_environments_data_and_build_outputs() -> None:
    ignored = set((ROOT / ".dockerignore").read_text().split())
    assert {
        ".venv",
        ".git",
        "build",
        "dist",
        "*.egg-info",
        ".profilemesh",
        "profilemesh-data",
    } <= ignored
    assert not {"README.md", "protos", "shared", "services", "plugins"} & ignored
