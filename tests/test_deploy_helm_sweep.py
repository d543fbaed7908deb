"""The chart's sweep: a grid file as an Indexed Job, one pod per point, with real helm.

Rendered objects are validated against the Kubernetes 1.33 schemas like the rest of the
chart (tests/test_deploy_helm.py). The last test runs the rendered pod command itself on
this machine, one index at a time, against a local ``ncserve serve``: the pod of index I
must run the grid's point I, the run ``nclaunch sweep GRID --list`` names at I.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from launcher.launch import EmbeddedService
from tests.launcher_support import REPO, TINY_GRID_BASE, nclaunch
from tests.test_deploy_helm import (
    K8S_VERSION,
    NAMESPACE,
    RELEASE,
    arg_after,
    by_kind,
    env_of,
    helm_template,
    one,
    render_set,
    selects,
)
from tests.test_deploy_tools import CHART, require_module, require_tool, run

CPU_GRID = REPO / "examples" / "cpu_grid.yaml"
GRID_IN_POD = "/etc/ncserve/sweep/grid.yaml"
SWEEP_JOB = f"{RELEASE}-ncserve-sweep"
SERVER_TARGET = f"{RELEASE}-ncserve.{NAMESPACE}.svc:50051"
INDEX_VAR = "$(JOB_COMPLETION_INDEX)"
COMPLETION_INDEX = "metadata.annotations['batch.kubernetes.io/job-completion-index']"


def listed_points(grid: Path) -> list[dict[str, Any]]:
    """The grid's points as ``nclaunch sweep GRID --list --format json`` gives them."""
    result = nclaunch("sweep", str(grid), "--list", "--format", "json", timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    points = json.loads(result.stdout)
    assert isinstance(points, list) and points, result.stdout
    return points


def point_name(point: dict[str, Any]) -> str:
    name = point["name"]
    assert isinstance(name, str) and name
    return name


def helm_sweep(grid: Path, *sets: str) -> tuple[int, str, str]:
    args = ["--set-file", f"sweep.grid={grid}"]
    for item in sets:
        args += ["--set", item]
    return helm_template(*args)


def render_sweep(grid: Path, *sets: str) -> list[dict[str, Any]]:
    code, out, err = helm_sweep(grid, *sets)
    assert code == 0, err
    return [doc for doc in yaml.safe_load_all(out) if doc]


def sweep_job(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return one(docs, "Job", SWEEP_JOB)


def sweep_container(docs: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    pod = sweep_job(docs)["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    return pod, container


def validate_all(docs: list[dict[str, Any]]) -> None:
    kubernetes_validate = require_module("kubernetes_validate")
    for doc in docs:
        if doc["kind"] in {"ServiceMonitor", "PrometheusRule"}:
            continue
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as error:
            path = ".".join(str(p) for p in error.path)
            pytest.fail(
                f"{doc['kind']}/{doc['metadata']['name']} invalid at {path}: {error.message}"
            )


@pytest.fixture(scope="module")
def cpu_grid_points() -> list[dict[str, Any]]:
    return listed_points(CPU_GRID)


# --- the rendered objects -------------------------------------------------------------------


def test_one_completion_per_point_of_the_grid(cpu_grid_points: list[dict[str, Any]]) -> None:
    count = len(cpu_grid_points)
    # The completion index is the point's index as --list numbers it; each is one node.
    assert [p["index"] for p in cpu_grid_points] == list(range(count))
    assert all(p["settings"]["launch.nnodes"] == "1" for p in cpu_grid_points)
    docs = render_sweep(CPU_GRID, f"sweep.points={count}", "sweep.parallelism=2")
    validate_all(docs)
    job = sweep_job(docs)
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == count
    assert spec["parallelism"] == 2
    assert spec["backoffLimitPerIndex"] == 2  # sweep.retriesPerPoint's default
    assert "backoffLimit" not in spec  # unlimited overall: retries count per point
    assert "maxFailedIndexes" not in spec
    # A sweep replaces the trainer's single run: the sweep is the release's only Job.
    assert [j["metadata"]["name"] for j in by_kind(docs, "Job")] == [SWEEP_JOB]
    assert not by_kind(docs, "PyTorchJob")
    assert [s["metadata"]["name"] for s in by_kind(docs, "Service")] == [f"{RELEASE}-ncserve"]
    for doc in docs:
        assert doc["metadata"]["labels"]["app.kubernetes.io/instance"] == RELEASE
    lint = run(
        [
            require_tool("helm"),
            "lint",
            "--strict",
            str(CHART),
            "--set-file",
            f"sweep.grid={CPU_GRID}",
            "--set",
            f"sweep.points={count}",
        ]
    )
    assert lint.returncode == 0, lint.stdout + lint.stderr


def test_pods_run_their_point_against_the_release_service() -> None:
    docs = render_sweep(CPU_GRID, "sweep.points=6", "sweep.id=optimizers")
    pod, container = sweep_container(docs)
    command = container["command"]
    assert command[:3] == ["nclaunch", "sweep", GRID_IN_POD]
    assert arg_after(command, "--point") == INDEX_VAR
    # Kubernetes expands $(VAR) only from variables the container's env defines.
    env = env_of(container)
    assert env["JOB_COMPLETION_INDEX"] == {"fieldRef": {"fieldPath": COMPLETION_INDEX}}
    assert arg_after(command, "--sidecar") == SERVER_TARGET
    assert arg_after(command, "--sweep-id") == "optimizers"
    runs_mount = next(m for m in container["volumeMounts"] if m["name"] == "runs")
    assert arg_after(command, "--out") == f"{runs_mount['mountPath']}/optimizers"
    assert container["image"].startswith("ncserve-trainer:")
    # The grid file is the ConfigMap, mounted where the command reads it.
    config_map = one(docs, "ConfigMap", f"{SWEEP_JOB}-grid")
    assert config_map["data"]["grid.yaml"] == CPU_GRID.read_text()
    grid_mount = next(m for m in container["volumeMounts"] if m["name"] == "grid")
    assert f"{grid_mount['mountPath']}/grid.yaml" == GRID_IN_POD and grid_mount["readOnly"]
    grid_volume = next(v for v in pod["volumes"] if v["name"] == "grid")
    assert grid_volume["configMap"]["name"] == config_map["metadata"]["name"]
    # A failed pod is retried as a new pod of the same index; a usage error is not.
    assert pod["restartPolicy"] == "Never"
    rules = sweep_job(docs)["spec"]["podFailurePolicy"]["rules"]
    fail_index = next(r for r in rules if r["action"] == "FailIndex")
    assert fail_index["onExitCodes"] == {
        "containerName": container["name"],
        "operator": "In",
        "values": [2],
    }
    ignore = next(r for r in rules if r["action"] == "Ignore")
    assert ignore["onPodConditions"] == [{"type": "DisruptionTarget", "status": "True"}]
    # The chart's security settings, and CPU only by default.
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert "nvidia.com/gpu" not in container["resources"].get("limits", {})
    assert container["resources"]["requests"]["cpu"]


def test_the_network_policy_admits_sweep_pods() -> None:
    docs = render_sweep(CPU_GRID, "sweep.points=6")
    grpc_rule = one(docs, "NetworkPolicy")["spec"]["ingress"][0]
    labels = sweep_job(docs)["spec"]["template"]["metadata"]["labels"]
    (peer,) = grpc_rule["from"]
    selector = peer["podSelector"]
    assert selects(selector["matchLabels"], labels)
    (expression,) = selector["matchExpressions"]
    assert labels[expression["key"]] in expression["values"]


def test_run_directories_on_a_created_claim_an_existing_one_or_an_empty_dir() -> None:
    docs = render_sweep(CPU_GRID, "sweep.points=6")
    pod, _ = sweep_container(docs)
    runs = next(v for v in pod["volumes"] if v["name"] == "runs")
    claim = one(docs, "PersistentVolumeClaim", f"{RELEASE}-ncserve-sweep-runs")
    assert runs["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    assert claim["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    docs = render_sweep(
        CPU_GRID,
        "sweep.points=6",
        "sweep.runs.persistentVolumeClaim.size=1Ti",
        "sweep.runs.persistentVolumeClaim.storageClassName=fast-rwx",
    )
    claim = one(docs, "PersistentVolumeClaim", f"{RELEASE}-ncserve-sweep-runs")
    assert claim["spec"]["resources"]["requests"]["storage"] == "1Ti"
    assert claim["spec"]["storageClassName"] == "fast-rwx"
    docs = render_sweep(
        CPU_GRID, "sweep.points=6", "sweep.runs.persistentVolumeClaim.existingClaim=s3-bucket"
    )
    pod, _ = sweep_container(docs)
    runs = next(v for v in pod["volumes"] if v["name"] == "runs")
    assert runs["persistentVolumeClaim"]["claimName"] == "s3-bucket"
    assert [c["metadata"]["name"] for c in by_kind(docs, "PersistentVolumeClaim")] == [
        f"{RELEASE}-ncserve-data"
    ]
    docs = render_sweep(
        CPU_GRID, "sweep.points=6", "sweep.runs.persistentVolumeClaim.enabled=false"
    )
    pod, _ = sweep_container(docs)
    assert {"name": "runs", "emptyDir": {}} in pod["volumes"]
    validate_all(docs)


def test_gpus_secrets_datasets_and_failure_budget() -> None:
    docs = render_sweep(
        CPU_GRID,
        "sweep.points=6",
        "sweep.gpusPerRun=2",
        "sweep.retriesPerPoint=5",
        "sweep.maxFailedPoints=3",
        "sweep.extraArgs={--set,epochs=3}",
        "auth.token.enabled=true",
        "auth.token.existingSecret=ncserve-token",
        "auth.tls.enabled=true",
        "auth.tls.existingSecret=ncserve-tls",
        "trainer.data.existingClaim=datasets",
        "trainer.nodeSelector.gpu=h100",
    )
    validate_all(docs)
    spec = sweep_job(docs)["spec"]
    assert spec["backoffLimitPerIndex"] == 5 and spec["maxFailedIndexes"] == 3
    pod, container = sweep_container(docs)
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert container["resources"]["requests"]["nvidia.com/gpu"] == 2
    assert pod["nodeSelector"] == {"gpu": "h100"}
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    command = container["command"]
    sets = [command[i + 1] for i, word in enumerate(command) if word == "--set"]
    assert f"sidecar-token-file={mounts['token']}/token" in sets
    assert f"sidecar-tls-ca={mounts['tls']}/ca.crt" in sets
    assert f"data-dir={mounts['data']}" in sets
    assert command[-2:] == ["--set", "epochs=3"]
    secrets = {v["name"]: v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v}
    assert secrets == {"token": "ncserve-token", "tls": "ncserve-tls"}


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        ((), "sweep.grid is set but sweep.points is not"),
        (
            ("sweep.points=0",),
            'sweep.points must be a positive integer, the number of points of sweep.grid, the lines of `nclaunch sweep GRID.yaml --list | wc -l`; got "0"',
        ),
        (("sweep.points=six",), 'got "six"'),
        (("sweep.points=2.5",), 'got "2.5"'),
    ],
)
def test_sweep_points_must_be_given(sets: tuple[str, ...], message: str) -> None:
    code, _, err = helm_sweep(CPU_GRID, *sets)
    assert code != 0
    assert message in err, err
    assert "nclaunch sweep GRID.yaml --list | wc -l" in err


def test_points_without_a_grid_and_bad_sweep_values_fail() -> None:
    code, _, err = helm_template("--set", "sweep.points=6")
    assert code != 0 and "sweep.points is set but sweep.grid is empty" in err, err
    for bad in ("sweep.parallelism=0", "sweep.retriesPerPoint=-1", "sweep.gpusPerRun=-1"):
        code, _, err = helm_sweep(CPU_GRID, "sweep.points=6", bad)
        assert code != 0, f"--set {bad} was accepted"
        assert "schema" in err.lower() or "values don't meet" in err.lower(), err
    code, _, err = helm_sweep(CPU_GRID, "sweep.points=6", "sweep.runs.pvc=true")
    assert code != 0 and "pvc" in err


def test_without_a_grid_the_trainer_runs_and_no_sweep_is_rendered() -> None:
    docs = render_set("trainer.nodes=2")
    assert [j["metadata"]["name"] for j in by_kind(docs, "Job")] == [f"{RELEASE}-ncserve-trainer"]
    assert not [d for d in docs if d["metadata"]["name"].startswith(SWEEP_JOB)]


def test_notes_describe_the_sweep() -> None:
    result = run(
        [
            require_tool("helm"),
            "install",
            RELEASE,
            str(CHART),
            "-n",
            NAMESPACE,
            "--dry-run=client",
            "--set-file",
            f"sweep.grid={CPU_GRID}",
            "--set",
            "sweep.points=6",
        ]
    )
    assert result.returncode == 0, result.stderr
    notes = result.stdout.split("NOTES:", 1)[1]
    assert f"kubectl -n {NAMESPACE} get job {SWEEP_JOB}" in notes
    assert "6 point(s)" in notes and "Training run" not in notes


# --- the pod command, run here --------------------------------------------------------------

# Two points of a tiny synthetic problem: one epoch each, seconds on a CPU.
TINY_GRID = {
    "base": {**TINY_GRID_BASE, "epochs": 1},
    "axes": {"optimizer": ["sgd", "adamw"]},
}


@pytest.fixture
def local_ncserve(tmp_path: Path) -> Iterator[str]:
    """``ncserve serve`` on 127.0.0.1, OS-picked port; yields HOST:PORT."""
    server = EmbeddedService(tmp_path / "ncserve", name="the test service")
    try:
        yield server.start()
    finally:
        server.stop()


def local_command(
    pod_command: list[str], env: dict[str, str], replace: dict[str, str]
) -> list[str]:
    """The pod's command as the kubelet would run it here: $(VAR) expanded from the pod's
    env, and the cluster's paths and address swapped for local ones."""
    words = []
    for word in pod_command:
        for name, value in env.items():
            word = word.replace(f"$({name})", value)
        words.append(replace.get(word, word))
    return words


def test_each_pod_runs_the_point_of_its_index(tmp_path: Path, local_ncserve: str) -> None:
    grid = tmp_path / "tiny_grid.yaml"
    grid.write_text(yaml.safe_dump(TINY_GRID))
    points = listed_points(grid)
    assert len(points) == 2
    docs = render_sweep(grid, f"sweep.points={len(points)}", "sweep.id=tiny")
    assert sweep_job(docs)["spec"]["completions"] == len(points)
    _, container = sweep_container(docs)
    pod_command = container["command"]
    pod_out = arg_after(pod_command, "--out")
    # The grid as the pod reads it: the ConfigMap's text.
    grid_in_pod = tmp_path / "grid-from-configmap.yaml"
    grid_in_pod.write_text(one(docs, "ConfigMap", f"{SWEEP_JOB}-grid")["data"]["grid.yaml"])
    out = tmp_path / "runs" / "tiny"
    replace = {
        GRID_IN_POD: str(grid_in_pod),
        pod_out: str(out),
        SERVER_TARGET: local_ncserve,
    }
    assert pod_command[0] == "nclaunch"
    done: set[str] = set()
    for index, point in enumerate(points):
        env = {"JOB_COMPLETION_INDEX": str(index)}
        assert set(env) <= set(env_of(container))
        command = local_command(pod_command, env, replace)
        assert INDEX_VAR not in command and GRID_IN_POD not in command
        result = nclaunch(*command[1:], timeout=300)
        shown = shlex.join(command)
        assert result.returncode == 0, f"{shown}:\n{result.stdout}\n{result.stderr}"
        ran = {p.name for p in out.iterdir() if (p / "metrics.jsonl").exists()}
        # Exactly the point of this index ran, besides those of the earlier indexes.
        assert ran - done == {point_name(point)}, f"index {index} ({shown}) ran {ran - done}"
        done |= ran
    # The pods reported to the one service: every point's run is there.
    runs = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from ncserve.cli import main; sys.argv[0] = 'ncserve'; main()",
            "runs",
            "--target",
            local_ncserve,
            "--format",
            "json",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert runs.returncode == 0, runs.stderr
    at_service = {r["run_id"]: r for r in json.loads(runs.stdout)}
    assert set(at_service) == {f"tiny.{point_name(p)}" for p in points}, runs.stdout
    for run_info in at_service.values():
        assert run_info["state"] == "finished", run_info
        assert run_info["metadata"]["sweep"] == "tiny", run_info


def test_deploy_doc_documents_every_sweep_value() -> None:
    text = (REPO / "docs" / "deploy.md").read_text(encoding="utf-8")
    section = text.split("### Running a sweep on Kubernetes", 1)[1].split("\n## ", 1)[0]
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())["sweep"]
    rows = {
        line.split("|")[1].strip(" `"): line.split("|")[2].strip()
        for line in section.splitlines()
        if line.startswith("| `sweep.")
    }
    for key in defaults:
        name = f"sweep.{key}" + (".persistentVolumeClaim.*" if key == "runs" else "")
        assert name in rows or f"sweep.{key}" in rows, f"{name} missing from docs/deploy.md"
    for key in ("parallelism", "retriesPerPoint", "gpusPerRun"):
        assert rows[f"sweep.{key}"] == str(defaults[key]), key
    for needle in ("kubectl -n ml get job", "--list", "one node", "backoffLimitPerIndex"):
        assert needle in section, needle
