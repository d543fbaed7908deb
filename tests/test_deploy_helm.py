"""The Helm chart, with the real helm (v4) binary and the Kubernetes 1.33 schemas.

Every ci/ values file is linted (--strict) and rendered; every rendered object of a
built-in kind is validated against the 1.33 OpenAPI schemas (kubernetes-validate,
strict: unknown fields fail). Custom resources (ServiceMonitor, PrometheusRule,
PyTorchJob) have no schema there: they are checked structurally, and the pod templates
inside a PyTorchJob are validated as Pods.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.test_deploy_tools import (
    CHART,
    DASHBOARD_JSON,
    RULES,
    require_module,
    require_tool,
    run,
)

K8S_VERSION = "1.33.0"
NAMESPACE = "ml"
RELEASE = "demo"
CI_VALUES = sorted(p.name for p in (CHART / "ci").glob("*.yaml"))
CUSTOM_KINDS = {"ServiceMonitor", "PrometheusRule", "PyTorchJob"}
PET_VARS = (
    "PET_NNODES",
    "PET_NPROC_PER_NODE",
    "PET_NODE_RANK",
    "PET_MASTER_ADDR",
    "PET_MASTER_PORT",
    "PET_RDZV_ENDPOINT",
    "PET_RDZV_BACKEND",
    "PET_RDZV_ID",
    "PET_MAX_RESTARTS",
)
COMPLETION_INDEX = "metadata.annotations['batch.kubernetes.io/job-completion-index']"


def test_ci_values_files_are_the_five_expected() -> None:
    assert (
        sorted(
            [
                "default-values.yaml",
                "pytorchjob-values.yaml",
                "tls-token-values.yaml",
                "monitoring-off-values.yaml",
                "gpu-values.yaml",
            ]
        )
        == CI_VALUES
    )


def helm_template(*args: str, release: str = RELEASE) -> tuple[int, str, str]:
    result = run([require_tool("helm"), "template", release, str(CHART), "-n", NAMESPACE, *args])
    return result.returncode, result.stdout, result.stderr


@functools.cache
def _render_cached(values_file: str) -> tuple[dict[str, Any], ...]:
    code, out, err = helm_template("-f", str(CHART / "ci" / values_file))
    assert code == 0, f"helm template -f ci/{values_file} failed:\n{err}"
    return tuple(doc for doc in yaml.safe_load_all(out) if doc)


def render(values_file: str = "default-values.yaml") -> list[dict[str, Any]]:
    return list(_render_cached(values_file))


def render_set(*sets: str) -> list[dict[str, Any]]:
    args = [a for s in sets for a in ("--set", s)]
    code, out, err = helm_template(*args)
    assert code == 0, err
    return [doc for doc in yaml.safe_load_all(out) if doc]


def values(values_file: str) -> dict[str, Any]:
    """Chart defaults merged with a ci/ values file (maps merged, other values replaced)."""

    def merge(base: Any, top: Any) -> Any:
        if isinstance(base, dict) and isinstance(top, dict):
            return {k: merge(base.get(k), top[k]) if k in base else top[k] for k in top} | {
                k: v for k, v in base.items() if k not in top
            }
        return top

    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    override = yaml.safe_load((CHART / "ci" / values_file).read_text()) or {}
    return merge(defaults, override)


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in by_kind(docs, kind) if name is None or d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def arg_after(command: list[str], flag: str) -> str:
    assert flag in command, f"{flag} missing from {command}"
    return command[command.index(flag) + 1]


# --- lint and schema validation --------------------------------------------------------------


@pytest.mark.parametrize("values_file", CI_VALUES)
def test_helm_lint_strict(values_file: str) -> None:
    result = run(
        [
            require_tool("helm"),
            "lint",
            "--strict",
            str(CHART),
            "-f",
            str(CHART / "ci" / values_file),
        ]
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 chart(s) failed" in result.stdout


@pytest.mark.parametrize("values_file", CI_VALUES)
def test_rendered_manifests_validate_against_kubernetes_1_33(values_file: str) -> None:
    kubernetes_validate = require_module("kubernetes_validate")
    docs = render(values_file)
    assert docs
    for doc in docs:
        name = f"{doc['kind']}/{doc['metadata']['name']}"
        assert doc["metadata"].get("namespace", NAMESPACE) == NAMESPACE, name
        if doc["kind"] in CUSTOM_KINDS:
            continue
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as error:
            path = ".".join(str(p) for p in error.path)
            pytest.fail(f"ci/{values_file}: {name} invalid at {path}: {error.message}")
    # Pod templates of a custom resource are validated as Pods.
    for job in by_kind(docs, "PyTorchJob"):
        for role, spec in job["spec"]["pytorchReplicaSpecs"].items():
            pod = {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {
                    "name": f"{job['metadata']['name']}-{role.lower()}",
                    **spec["template"]["metadata"],
                },
                "spec": spec["template"]["spec"],
            }
            kubernetes_validate.validate(pod, K8S_VERSION, strict=True)


@pytest.mark.parametrize("values_file", CI_VALUES)
def test_every_object_carries_the_standard_labels(values_file: str) -> None:
    for doc in render(values_file):
        labels = doc["metadata"]["labels"]
        assert labels["app.kubernetes.io/name"] == "ncserve"
        assert labels["app.kubernetes.io/instance"] == RELEASE
        assert labels["app.kubernetes.io/managed-by"] == "Helm"
        assert labels["helm.sh/chart"] == "ncserve-0.1.0"


def test_chart_metadata() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2"
    assert chart["kubeVersion"] == ">=1.29.0-0"
    code, _, err = helm_template("--kube-version", "1.28.0")
    assert code != 0 and "kubeVersion" in err, err
    assert helm_template("--kube-version", "1.29.0")[0] == 0
    helpers = (CHART / "templates" / "_helpers.tpl").read_text()
    for helper in (
        "ncserve.name",
        "ncserve.fullname",
        "ncserve.chart",
        "ncserve.labels",
        "ncserve.selectorLabels",
    ):
        assert f'define "{helper}"' in helpers
    assert (CHART / "templates" / "NOTES.txt").exists()


def test_values_schema_rejects_mistakes_and_allows_global() -> None:
    assert helm_template("--set", "global.imageRegistry=registry.example")[0] == 0
    for bad in (
        "trainer.kind=deployment",
        "trainer.nodes=0",
        "trainerr.nodes=2",
        "alerts.onset.for=soon",
    ):
        code, _, err = helm_template("--set", bad)
        assert code != 0, f"--set {bad} was accepted"
        assert "schema" in err.lower() or "values don't meet" in err.lower(), err


def test_secrets_must_be_named_when_enabled() -> None:
    code, _, err = helm_template("--set", "auth.token.enabled=true")
    assert code != 0 and "auth.token.existingSecret" in err
    code, _, err = helm_template("--set", "auth.tls.enabled=true")
    assert code != 0 and "auth.tls.existingSecret" in err


# --- ncserve: Deployment, Service, PVC --------------------------------------------------------


def server_container(docs: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    deployment = one(docs, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    return pod, container


def test_server_deployment_service_and_pvc() -> None:
    docs = render()
    deployment = one(docs, "Deployment")
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"]["type"] == "Recreate"
    pod, container = server_container(docs)
    command = container["command"]
    assert command[:2] == ["ncserve", "serve"]
    assert arg_after(command, "--listen") == "0.0.0.0:50051"
    assert arg_after(command, "--metrics-port") == "9464"
    db = Path(arg_after(command, "--db"))
    mount = next(m for m in container["volumeMounts"] if db.is_relative_to(m["mountPath"]))
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    pvc = one(docs, "PersistentVolumeClaim")
    assert volume["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    assert pvc["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    # Native gRPC probes on the health service, on the gRPC port.
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"] == {"port": 50051}, probe
    assert container["resources"]["requests"] and container["resources"]["limits"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    # The Service exposes both ports and selects exactly the server pods.
    service = one(docs, "Service", f"{RELEASE}-ncserve")
    ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert ports["grpc"]["port"] == 50051 and ports["metrics"]["port"] == 9464
    container_ports = {p["name"] for p in container["ports"]}
    assert {p["targetPort"] for p in ports.values()} <= container_ports
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert selects(service["spec"]["selector"], pod_labels)
    assert selects(deployment["spec"]["selector"]["matchLabels"], pod_labels)


def test_persistence_off_uses_an_empty_dir() -> None:
    docs = render("monitoring-off-values.yaml")
    assert not by_kind(docs, "PersistentVolumeClaim")
    pod, _ = server_container(docs)
    assert {"name": "data", "emptyDir": {}} in pod["volumes"]


def test_tls_and_token_come_from_secrets() -> None:
    docs = render("tls-token-values.yaml")
    pod, container = server_container(docs)
    secrets = {v["name"]: v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v}
    assert secrets == {"token": "ncserve-token", "tls": "ncserve-tls"}
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    command = container["command"]
    assert arg_after(command, "--token-file").startswith(mounts["token"] + "/")
    assert arg_after(command, "--tls-cert") == mounts["tls"] + "/tls.crt"
    assert arg_after(command, "--tls-key") == mounts["tls"] + "/tls.key"
    # Native grpc probes cannot speak TLS: the probe runs the health check in the pod.
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        exec_command = container[probe]["exec"]["command"]
        assert exec_command[0] == "ncserve-healthcheck"
        assert arg_after(exec_command, "--tls-ca").startswith(mounts["tls"] + "/")
        assert arg_after(exec_command, "--server-name") == f"{RELEASE}-ncserve.{NAMESPACE}.svc"
    # Trainers get the token and the CA too.
    job = one(docs, "Job")
    trainer_pod = job["spec"]["template"]["spec"]
    (trainer,) = trainer_pod["containers"]
    trainer_mounts = {m["name"]: m["mountPath"] for m in trainer["volumeMounts"]}
    assert arg_after(trainer["command"], "--sidecar-token-file").startswith(
        trainer_mounts["token"] + "/"
    )
    assert arg_after(trainer["command"], "--sidecar-tls-ca").startswith(trainer_mounts["tls"] + "/")
    assert {v["name"] for v in trainer_pod["volumes"]} >= {"token", "tls"}
    # No Secret objects are ever rendered: they are created outside the chart.
    assert not by_kind(docs, "Secret")
    for values_file in CI_VALUES:
        assert not by_kind(render(values_file), "Secret")


# --- trainer: Indexed Job + headless Service --------------------------------------------------


@pytest.mark.parametrize(
    "values_file", ["default-values.yaml", "gpu-values.yaml", "tls-token-values.yaml"]
)
def test_indexed_job_pods_carry_the_pet_variables(values_file: str) -> None:
    docs = render(values_file)
    vals = values(values_file)["trainer"]
    job = one(docs, "Job")
    spec = job["spec"]
    nodes = vals["nodes"]
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"] == nodes
    pod = spec["template"]["spec"]
    headless = one(docs, "Service", job["metadata"]["name"])
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["publishNotReadyAddresses"] is True
    assert pod["subdomain"] == headless["metadata"]["name"]
    assert selects(headless["spec"]["selector"], spec["template"]["metadata"]["labels"])
    (container,) = pod["containers"]
    env = env_of(container)
    assert set(PET_VARS) <= set(env), sorted(set(PET_VARS) - set(env))
    assert env["PET_NNODES"] == str(nodes)
    assert env["PET_NODE_RANK"] == {"fieldRef": {"fieldPath": COMPLETION_INDEX}}
    gpus = vals["gpusPerNode"]
    assert env["PET_NPROC_PER_NODE"] == str(gpus if gpus else 1)
    # Rendezvous on pod 0 through the headless Service's DNS.
    rdzv_host = f"{job['metadata']['name']}-0.{headless['metadata']['name']}.{NAMESPACE}.svc"
    assert env["PET_MASTER_ADDR"] == rdzv_host
    assert env["PET_MASTER_PORT"] == str(vals["rdzv"]["port"])
    assert env["PET_RDZV_ENDPOINT"] == f"{rdzv_host}:{vals['rdzv']['port']}"
    assert headless["spec"]["ports"][0]["port"] == vals["rdzv"]["port"]
    assert env["PET_RDZV_BACKEND"] == "c10d"
    assert env["PET_RDZV_ID"] == (vals["runId"] or RELEASE)
    assert env["PET_MAX_RESTARTS"] == str(vals["maxRestarts"])
    check_trainer_container(docs, pod, container, vals)


def check_trainer_container(
    docs: list[dict[str, Any]], pod: dict[str, Any], container: dict[str, Any], vals: dict[str, Any]
) -> None:
    command = container["command"]
    assert command[0] == "nclaunch"
    # The sidecar is the ncserve Service, on its gRPC port.
    server = one(docs, "Service", f"{RELEASE}-ncserve")
    grpc_port = next(p["port"] for p in server["spec"]["ports"] if p["name"] == "grpc")
    assert (
        arg_after(command, "--sidecar")
        == f"{server['metadata']['name']}.{NAMESPACE}.svc:{grpc_port}"
    )
    run_id = vals["runId"] or RELEASE
    assert arg_after(command, "--run-id") == run_id
    assert arg_after(command, "--run-dir") == f"{vals['runDir']['mountPath']}/{run_id}"
    assert arg_after(command, "--optimizer") == vals["training"]["optimizer"]
    assert arg_after(command, "--model") == vals["training"]["model"]
    assert arg_after(command, "--dataset") == vals["training"]["dataset"]
    assert arg_after(command, "--epochs") == str(vals["training"]["epochs"])
    assert arg_after(command, "--device") == ("cuda" if vals["gpusPerNode"] else "cpu")
    assert command[-len(vals["extraArgs"]) or len(command) :] == (vals["extraArgs"] or [])
    if vals["data"]["existingClaim"]:
        assert arg_after(command, "--data-dir") == vals["data"]["mountPath"]
    # Shared memory for NCCL: a memory-backed emptyDir on /dev/shm.
    shm_mount = next(m for m in container["volumeMounts"] if m["mountPath"] == "/dev/shm")
    shm = next(v for v in pod["volumes"] if v["name"] == shm_mount["name"])
    assert shm["emptyDir"]["medium"] == "Memory"
    gpus = vals["gpusPerNode"]
    if gpus:
        assert container["resources"]["limits"]["nvidia.com/gpu"] == gpus
        assert container["resources"]["requests"]["nvidia.com/gpu"] == gpus
    else:
        assert "nvidia.com/gpu" not in container["resources"].get("limits", {})
    assert pod.get("nodeSelector", {}) == vals["nodeSelector"]
    assert pod.get("tolerations", []) == vals["tolerations"]


def test_gpu_values_request_gpus_and_schedule_on_gpu_nodes() -> None:
    docs = render("gpu-values.yaml")
    pod = one(docs, "Job")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 8
    assert env_of(container)["PET_NPROC_PER_NODE"] == "8"
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    shm = next(v for v in pod["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"]["sizeLimit"] == "16Gi"
    runs = next(v for v in pod["volumes"] if v["name"] == "runs")
    assert runs["persistentVolumeClaim"]["claimName"] == "ncserve-runs"


def test_pytorchjob_replaces_the_indexed_job() -> None:
    docs = render("pytorchjob-values.yaml")
    vals = values("pytorchjob-values.yaml")["trainer"]
    assert not by_kind(docs, "Job")
    assert all(
        s["metadata"]["name"] != f"{RELEASE}-ncserve-trainer" for s in by_kind(docs, "Service")
    )
    job = one(docs, "PyTorchJob")
    assert job["apiVersion"] == "kubeflow.org/v1"
    assert job["spec"]["nprocPerNode"] == str(vals["nprocPerNode"])
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert replicas["Master"]["replicas"] == 1
    assert replicas["Worker"]["replicas"] == vals["nodes"] - 1
    for spec in replicas.values():
        pod = spec["template"]["spec"]
        (container,) = pod["containers"]
        assert container["name"] == "pytorch"  # the operator's required container name
        env = env_of(container)
        assert env["PET_NNODES"] == str(vals["nodes"])
        assert env["PET_NPROC_PER_NODE"] == str(vals["nprocPerNode"])
        assert env["PET_RDZV_ID"] == vals["runId"]
        assert env["PET_MAX_RESTARTS"] == str(vals["maxRestarts"])
        # Node rank and master address are the operator's to inject.
        assert "PET_NODE_RANK" not in env and "PET_MASTER_ADDR" not in env
        check_trainer_container(docs, pod, container, vals)


def test_single_node_pytorchjob_has_no_workers() -> None:
    docs = render_set("trainer.kind=pytorchjob", "trainer.nodes=1")
    replicas = one(docs, "PyTorchJob")["spec"]["pytorchReplicaSpecs"]
    assert set(replicas) == {"Master"}


def test_trainer_can_be_turned_off() -> None:
    docs = render_set("trainer.enabled=false")
    assert not by_kind(docs, "Job") and not by_kind(docs, "PyTorchJob")
    assert [s["metadata"]["name"] for s in by_kind(docs, "Service")] == [f"{RELEASE}-ncserve"]


# --- monitoring -----------------------------------------------------------------------------------


def test_service_monitor_scrapes_the_metrics_port() -> None:
    docs = render("tls-token-values.yaml")
    monitor = one(docs, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    service = one(docs, "Service", f"{RELEASE}-ncserve")
    assert selects(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
    assert monitor["spec"]["namespaceSelector"]["matchNames"] == [NAMESPACE]
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert endpoint["port"] == "metrics" and endpoint["path"] == "/metrics"
    # Only the ncserve Service matches: the trainer's headless Service must not be scraped.
    matching = [
        s
        for s in by_kind(docs, "Service")
        if selects(monitor["spec"]["selector"]["matchLabels"], s["metadata"]["labels"])
    ]
    assert [s["metadata"]["name"] for s in matching] == [f"{RELEASE}-ncserve"]


def test_prometheus_rule_embeds_the_rules_file() -> None:
    chart_copy = CHART / "files" / "ncserve.rules.yml"
    assert chart_copy.read_bytes() == RULES.read_bytes(), (
        "deploy/helm/ncserve/files/ncserve.rules.yml differs from deploy/prometheus/ncserve.rules.yml: "
        "cp deploy/prometheus/ncserve.rules.yml deploy/helm/ncserve/files/"
    )
    rule = one(render(), "PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    # With default values the embedded rules are the file, unchanged.
    assert rule["spec"] == yaml.safe_load(RULES.read_text())


def rule_by_alert(spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {r["alert"]: r for g in spec["groups"] for r in g["rules"]}


def test_prometheus_rule_thresholds_come_from_values() -> None:
    docs = render("gpu-values.yaml")
    rules = rule_by_alert(one(docs, "PrometheusRule")["spec"])
    onset = rules["NeuralCollapseOnset"]
    # The default thresholds, over the 2h window a GPU run's slow epochs need.
    assert "ncserve_nc1 < 0.5" in onset["expr"] and "ncserve_nc3 < 0.5" in onset["expr"]
    assert "max_over_time(ncserve_accuracy_ratio[2h]) >= 0.99" in onset["expr"]
    assert (
        "avg_over_time(ncserve_nc0[1h]) < 0.95 * avg_over_time(ncserve_nc0[1h] offset 1h)"
        in (onset["expr"])
    )
    assert onset["for"] == "30m" and "keep_firing_for" not in onset
    blocked = rules["NeuralCollapseBlocked"]
    # A 2h window: the accuracy gate and the "rose" clause look back 2h, the NC0 trend
    # compares its two 1h halves.
    for text in (
        "max_over_time(ncserve_accuracy_ratio[2h]) >= 0.99",
        "avg_over_time(ncserve_nc0[1h]) >= 0.99 * avg_over_time(ncserve_nc0[1h] offset 1h)",
        "resets(ncserve_nc0[2h]) < changes(ncserve_nc0[2h])",
    ):
        assert text in blocked["expr"], text
    assert blocked["for"] == "1h" and "keep_firing_for" not in blocked
    for rule in rules.values():
        assert rule["labels"]["team"] == "ml-research"
        assert rule["labels"]["severity"]  # the rule's own labels stay
    docs = render_set(
        "alerts.trainAccuracyAtLeast=0.995",
        "alerts.onset.window=15m",
        "alerts.onset.keepFiringFor=5m",
        "alerts.blocked.nc0NormalizedAbove=0.2",
        "alerts.blocked.window=45m",
        "alerts.blocked.keepFiringFor=20m",
        "alerts.stepsIncomplete.window=1h",
        "alerts.stepsIncomplete.for=10m",
        "alerts.down.jobRegex=ml/ncserve.*",
        "alerts.down.for=0m",
    )
    rules = rule_by_alert(one(docs, "PrometheusRule")["spec"])
    onset, blocked = rules["NeuralCollapseOnset"]["expr"], rules["NeuralCollapseBlocked"]["expr"]
    assert onset.count("ncserve_accuracy_ratio[15m]) >= 0.995") == 1
    # Replaced texts are never replaced again: the new [15m] window stays, its half is 450s.
    assert (
        "avg_over_time(ncserve_nc0[450s]) < 0.95 * avg_over_time(ncserve_nc0[450s] offset 450s)"
        in onset
    )
    assert rules["NeuralCollapseOnset"]["keep_firing_for"] == "5m"
    assert "ncserve_nc0_normalized > 0.2" in blocked
    assert "ncserve_accuracy_ratio[45m]) >= 0.995" in blocked
    assert (
        "avg_over_time(ncserve_nc0[1350s]) >= 0.99 * avg_over_time(ncserve_nc0[1350s] offset 1350s)"
        in blocked
    )
    assert "resets(ncserve_nc0[45m]) < changes(ncserve_nc0[45m])" in blocked
    assert rules["NeuralCollapseBlocked"]["keep_firing_for"] == "20m"
    assert "ncserve_steps_incomplete_total[1h]" in rules["NCServeStepsIncomplete"]["expr"]
    assert rules["NCServeStepsIncomplete"]["for"] == "10m"
    assert rules["NCServeDown"]["expr"].count('job=~"ml/ncserve.*"') == 2
    assert "for" not in rules["NCServeDown"]


def test_alert_window_must_halve() -> None:
    code, _, err = helm_template("--set", "alerts.blocked.window=1ms")
    assert code != 0 and "alerts.blocked.window" in err, err


@pytest.mark.parametrize("values_file", ["default-values.yaml", "gpu-values.yaml"])
def test_rendered_rules_pass_promtool(values_file: str, tmp_path: Path) -> None:
    promtool = require_tool("promtool")
    spec = one(render(values_file), "PrometheusRule")["spec"]
    path = tmp_path / "rendered.rules.yml"
    path.write_text(yaml.safe_dump(spec))
    result = run([promtool, "check", "rules", str(path)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_grafana_dashboard_config_map() -> None:
    chart_copy = CHART / "files" / "ncserve.json"
    assert chart_copy.read_bytes() == DASHBOARD_JSON.read_bytes(), (
        "the chart's dashboard copy is stale: python deploy/grafana/dashboard.py"
    )
    config_map = one(render(), "ConfigMap", f"{RELEASE}-ncserve-dashboard")
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert config_map["data"]["ncserve.json"] == DASHBOARD_JSON.read_text().rstrip("\n")
    docs = render_set("monitoring.grafanaDashboard.additionalLabels.team=ml")
    assert one(docs, "ConfigMap")["metadata"]["labels"]["team"] == "ml"


def test_monitoring_off_renders_no_monitoring_objects() -> None:
    docs = render("monitoring-off-values.yaml")
    kinds = {d["kind"] for d in docs}
    assert not kinds & {"ServiceMonitor", "PrometheusRule", "ConfigMap", "NetworkPolicy"}
    assert {"Deployment", "Service", "Job"} <= kinds


# --- NetworkPolicy and helm test ---------------------------------------------------------------


def test_network_policy_admits_only_trainers_and_prometheus() -> None:
    docs = render()
    policy = one(docs, "NetworkPolicy")
    deployment = one(docs, "Deployment")
    server_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert selects(policy["spec"]["podSelector"]["matchLabels"], server_labels)
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    grpc_rule, metrics_rule = policy["spec"]["ingress"]
    assert [p["port"] for p in grpc_rule["ports"]] == ["grpc"]
    assert [p["port"] for p in metrics_rule["ports"]] == ["metrics"]

    def admitted(rule: dict[str, Any], labels: dict[str, str]) -> bool:
        for peer in rule["from"]:
            selector = peer["podSelector"]
            if not selects(selector.get("matchLabels", {}), labels):
                continue
            if all(
                labels.get(e["key"]) in e["values"] for e in selector.get("matchExpressions", [])
            ):
                return True
        return False

    trainer_labels = one(docs, "Job")["spec"]["template"]["metadata"]["labels"]
    test_pod_labels = one(docs, "Pod")["metadata"]["labels"]
    assert admitted(grpc_rule, trainer_labels)
    assert admitted(grpc_rule, test_pod_labels)
    assert not admitted(grpc_rule, server_labels)
    assert not admitted(
        grpc_rule,
        {
            "app.kubernetes.io/name": "ncserve",
            "app.kubernetes.io/instance": "other",
            "app.kubernetes.io/component": "trainer",
        },
    )
    # Prometheus selectors come from values.
    (peer,) = metrics_rule["from"]
    prometheus = values("default-values.yaml")["networkPolicy"]["prometheus"]
    assert peer["namespaceSelector"] == prometheus["namespaceSelector"]
    assert peer["podSelector"] == prometheus["podSelector"]
    docs = render_set("networkPolicy.prometheus.namespaceSelector.matchLabels.team=obs")
    peer = one(docs, "NetworkPolicy")["spec"]["ingress"][1]["from"][0]
    assert peer["namespaceSelector"]["matchLabels"]["team"] == "obs"


@pytest.mark.parametrize("values_file", ["default-values.yaml", "tls-token-values.yaml"])
def test_helm_test_pod_checks_grpc_health(values_file: str) -> None:
    docs = render(values_file)
    pod = one(docs, "Pod")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    assert pod["spec"]["restartPolicy"] == "Never"
    (container,) = pod["spec"]["containers"]
    command = container["command"]
    assert command[0] == "ncserve-healthcheck"
    assert arg_after(command, "--target") == f"{RELEASE}-ncserve.{NAMESPACE}.svc:50051"
    if values_file == "tls-token-values.yaml":
        assert "--tls-ca" in command


def test_notes_render() -> None:
    result = run(
        [require_tool("helm"), "install", RELEASE, str(CHART), "-n", NAMESPACE, "--dry-run=client"]
    )
    assert result.returncode == 0, result.stderr
    assert "NOTES:" in result.stdout and "helm test demo" in result.stdout


def test_the_service_and_the_trainer_run_their_own_images() -> None:
    docs = render_set(
        "image.repository=reg/ncserve",
        "image.tag=1.2.3",
        "trainer.image.repository=reg/ncserve-trainer",
        "trainer.image.digest=sha256:" + "a" * 64,
    )
    (server,) = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert server["image"] == "reg/ncserve:1.2.3"
    (trainer,) = one(docs, "Job")["spec"]["template"]["spec"]["containers"]
    assert trainer["image"] == "reg/ncserve-trainer@sha256:" + "a" * 64
    defaults = render()
    (trainer,) = one(defaults, "Job")["spec"]["template"]["spec"]["containers"]
    (server,) = one(defaults, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert trainer["image"].startswith("ncserve-trainer:") and server["image"].startswith(
        "ncserve:"
    )
