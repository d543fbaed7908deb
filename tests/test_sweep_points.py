"""Addressable sweep points: ``--list``, ``--point I`` against an external service (in
parallel, skipped when done, resumed after a kill) and the submitit backend's local cluster."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from launcher.checkpoint import CheckpointStore
from launcher.cli import main_group
from launcher.launch import EmbeddedService
from launcher.sweep import plan_sweep
from launcher.sweep.grid import default_sweep_id
from ncserve.client import NCClient
from tests.launcher_support import REPO, metrics, nclaunch
from tests.launcher_support import TINY_GRID_BASE as TINY_BASE

TWO_POINTS = {"base": TINY_BASE, "axes": {"optimizer": ["sgd", "adamw"]}}


def write_grid(path: Path, grid: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(grid))
    return path


def invoke(*args: str) -> Any:
    return CliRunner().invoke(main_group, ["sweep", *map(str, args)])


# -- without running anything ---------------------------------------------------------------


def test_list_is_the_plans_order_in_text_and_json(tmp_path: Path) -> None:
    grid = write_grid(
        tmp_path / "grid.yaml",
        {
            "base": TINY_BASE,
            "axes": {"weight-decay": [0, 0.05]},
            "groups": [{"optimizer": ["sgd"]}, {"optimizer": ["adam", "adamw"]}],
        },
    )
    names = [run.name for run in plan_sweep(grid, tmp_path / "out").runs]
    as_json = invoke(grid, "--list", "--format", "json")
    assert as_json.exit_code == 0, as_json.output
    points = json.loads(as_json.output)
    assert [p["index"] for p in points] == list(range(6))
    assert [p["name"] for p in points] == names
    assert points[0]["settings"]["optim.name"] == "sgd"
    assert points[0]["settings"]["data.dataset"] == "synthetic"  # every setting, base too
    as_text = invoke(grid, "--list")
    assert as_text.exit_code == 0, as_text.output
    lines = [line.split("\t") for line in as_text.output.splitlines()]
    assert [(int(i), name) for i, name, _ in lines] == list(enumerate(names))
    assert lines[1][2] == "optim.name=sgd optim.weight_decay=0.05"  # what varies
    assert not (tmp_path / "out").exists()
    again = invoke(grid, "--list", "--format", "json")
    assert again.output == as_json.output  # stable


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--point", "2", "--out", "OUT", "--sidecar", "127.0.0.1:1"), "has 2 point(s), 0 to 1"),
        (("--point", "0", "--out", "OUT"), "give --sidecar HOST:PORT"),
        (("--point", "0"), "--out: required"),
        (("--point", "0", "--out", "OUT", "--parallel", "2"), "not with --point"),
        (("--list", "--point", "0"), "not with --list"),
        (("--out", "OUT", "--format", "json"), "goes with --list"),
        (("--out", "OUT", "--sidecar", "nowhere"), "--sidecar: expected HOST:PORT"),
        (("--out", "OUT", "--sweep-id", "-x"), "not a valid sweep id"),
        (("--out", "OUT", "--backend", "submitit"), "--partition: required with --cluster slurm"),
        (
            ("--out", "OUT", "--backend", "submitit", "--cluster", "local", "--partition", "p"),
            "--partition: only with --cluster slurm",
        ),
        (("--out", "OUT", "--backend", "submitit", "--cluster", "local"), "give --sidecar"),
        (("--out", "OUT", "--backend", "submitit", "--gpus", "0"), "local backend only"),
        (("--out", "OUT", "--max-parallel", "2"), "go with --backend submitit"),
    ],
)
def test_point_and_backend_errors_are_one_line(
    tmp_path: Path, args: tuple[str, ...], message: str
) -> None:
    grid = write_grid(tmp_path / "grid.yaml", TWO_POINTS)
    out = str(tmp_path / "out")
    result = invoke(grid, *(out if a == "OUT" else a for a in args))
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "out" / "sgd").exists()


def test_sweep_id_and_run_ids(tmp_path: Path) -> None:
    assert default_sweep_id(tmp_path / "paper grid (v2)") == "paper_grid__v2_"
    assert default_sweep_id(tmp_path / "..hidden..sweep") == "hidden.sweep"
    grid = write_grid(tmp_path / "grid.yaml", TWO_POINTS)
    external = plan_sweep(grid, tmp_path / "s1", {"tracking.sidecar": "127.0.0.1:9"})
    assert [external.run_id(r) for r in external.runs] == ["s1.sgd", "s1.adamw"]
    named = plan_sweep(grid, tmp_path / "s1", {"tracking.sidecar": "h:1"}, sweep_id="lab-7")
    assert named.run_id(named.runs[0]) == "lab-7.sgd"
    own_service = plan_sweep(grid, tmp_path / "s1")
    assert own_service.run_id(own_service.runs[0]) == "sgd"  # the sweep's own service


# -- points against one external service ----------------------------------------------------


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``ncserve serve`` on 127.0.0.1, an OS-picked port, for the whole module."""
    server = EmbeddedService(tmp_path_factory.mktemp("service"), name="the test service")
    target = server.start()
    try:
        yield target
    finally:
        server.stop()


def point(grid: Path, index: int, out: Path, target: str, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-c",
        "from launcher.cli import main; main()",
        "sweep",
        str(grid),
        "--point",
        str(index),
        "--out",
        str(out),
        "--sidecar",
        target,
        *extra,
    ]


def start(command: list[str], log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1"}
    with log.open("wb") as handle:
        return subprocess.Popen(command, cwd=REPO, env=env, stdout=handle, stderr=subprocess.STDOUT)


def stored(target: str, run_id: str) -> list[dict[str, Any]]:
    client = NCClient(target, replay_in_background=False)
    try:
        rows = client.get_metrics(run_id, all_steps=True)
        assert isinstance(rows, list)
        return rows
    finally:
        client.close(timeout_s=0)


@pytest.mark.slow
def test_two_points_at_once_then_skipped(tmp_path: Path, service: str) -> None:
    grid = write_grid(tmp_path / "grid.yaml", TWO_POINTS)
    out = tmp_path / "pair"
    logs = [tmp_path / f"point{i}.log" for i in (0, 1)]
    processes = [start(point(grid, i, out, service), logs[i]) for i in (0, 1)]
    for process, log in zip(processes, logs, strict=True):
        assert process.wait(timeout=300) == 0, log.read_text()
    client = NCClient(service, replay_in_background=False)
    try:
        runs = {r["run_id"]: r for r in client.list_runs()}
    finally:
        client.close(timeout_s=0)
    for name in ("sgd", "adamw"):
        run = runs[f"pair.{name}"]  # prefixed by the sweep id, the --out folder's name
        assert run["state"] == "finished" and run["metadata"]["sweep"] == "pair"
        assert [r["epoch"] for r in stored(service, f"pair.{name}")] == [0, 1, 2]
        assert [r["epoch"] for r in metrics(out / name)] == [0, 1, 2]
    assert not (out / "sweep.yaml").exists()  # points write only their own run directories

    # Done: a second run of the point does nothing, quickly.
    before = {p: p.read_bytes() for p in (out / "sgd").rglob("*") if p.is_file()}
    started = time.monotonic()
    again = nclaunch("sweep", str(grid), "--point", "0", "--out", str(out), "--sidecar", service)
    assert again.returncode == 0, again.stderr
    assert "point 0 (sgd): skipped" in again.stdout and "starting" not in again.stdout
    assert time.monotonic() - started < 60
    assert {p: p.read_bytes() for p in before} == before

    # Elsewhere (no run directory here), the same sweep id: the service says it is done.
    elsewhere = tmp_path / "node2" / "pair"
    result = nclaunch(
        "sweep", str(grid), "--point", "1", "--out", str(elsewhere), "--sidecar", service
    )
    assert result.returncode == 0, result.stderr
    assert f"stored at {service} (run pair.adamw)" in result.stdout
    assert not (elsewhere / "adamw" / "config.yaml").exists()


def _descendants(root: int) -> list[int]:
    """``root`` and every process below it (from /proc), parents first."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found, queue = [], [root]
    while queue:
        pid = queue.pop(0)
        found.append(pid)
        queue.extend(children.get(pid, []))
    return found


def _kill_tree(root: int) -> None:
    """Lose the point's whole process tree at once, as when its machine goes away."""
    for _ in range(2):  # stop first, so nothing starts a new child meanwhile
        for pid in _descendants(root):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)
    for pid in _descendants(root):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.slow
def test_killed_point_resumes_from_its_checkpoint(tmp_path: Path, service: str) -> None:
    epochs = 6
    base = {**TINY_BASE, "num-samples": 2048, "epochs": epochs, "checkpoint-every": 1}
    grid = write_grid(tmp_path / "grid.yaml", {"base": base, "axes": {"lr": [0.05]}})
    out = tmp_path / "killed"
    run_dir = out / "run"
    process = start(point(grid, 0, out, service), tmp_path / "first.log")
    checkpoints = CheckpointStore(run_dir / "checkpoints")
    deadline = time.monotonic() + 240
    while not checkpoints.completed():
        assert process.poll() is None, (tmp_path / "first.log").read_text()
        assert time.monotonic() < deadline, "no checkpoint"
        time.sleep(0.05)
    _kill_tree(process.pid)
    process.wait()
    assert max(r["epoch"] for r in metrics(run_dir)) < epochs, "finished before the kill"

    result = nclaunch("sweep", str(grid), "--point", "0", "--out", str(out), "--sidecar", service)
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    assert "point 0 (run): resuming run killed.run" in result.stdout
    assert "resumed from checkpoint" in (run_dir / "nclaunch.log").read_text()
    steps = [r["step"] for r in stored(service, "killed.run")]
    assert len(steps) == len(set(steps)) == epochs + 1  # every epoch measured, once
    assert max(r["epoch"] for r in metrics(run_dir)) == epochs


# -- the submitit backend --------------------------------------------------------------------


@pytest.mark.slow
def test_submitit_local_cluster_runs_every_point(tmp_path: Path, service: str) -> None:
    grid = write_grid(tmp_path / "grid.yaml", TWO_POINTS)
    out = tmp_path / "array"
    result = nclaunch(
        "sweep",
        str(grid),
        "--backend",
        "submitit",
        "--cluster",
        "local",
        "--max-parallel",
        "2",
        "--out",
        str(out),
        "--sidecar",
        service,
        "--sweep-id",
        "arr",
        timeout=300,
    )
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    assert "2/2 run(s) done (2 now, 0 before)" in result.stdout
    for name in ("sgd", "adamw"):
        assert [r["epoch"] for r in stored(service, f"arr.{name}")] == [0, 1, 2]
        task_logs = "".join(p.read_text() for p in (out / "submitit").rglob("*_log.out"))
        assert f"starting run arr.{name}" in task_logs  # each task ran the --point entry
    listed = yaml.safe_load((out / "sweep.yaml").read_text())
    assert [r["name"] for r in listed["runs"]] == ["sgd", "adamw"]
    assert listed["sweep_id"] == "arr"


def _fake_slurm(bin_dir: Path, record: Path) -> None:
    """sbatch, sacct, srun and scancel stand-ins: sbatch keeps the script it was given and
    answers job 4242; sacct says every task of it failed (no result ever appears)."""
    bin_dir.mkdir()
    scripts = {
        "sbatch": f'cp "$1" {record}\necho "Submitted batch job 4242"',
        "sacct": 'printf "JobID|State|NodeList\\n4242_[0-1]|FAILED|node7\\n"',
        "srun": "exit 0",
        "scancel": "exit 0",
    }
    for name, body in scripts.items():
        path = bin_dir / name
        path.write_text(f"#!/bin/sh\n{body}\n")
        path.chmod(0o755)


@pytest.mark.slow
def test_slurm_array_submission_and_a_failed_point(tmp_path: Path) -> None:
    """The sbatch script of the array (partition, %N, GPUs, time) and, for a point whose task
    fails, the report naming it with its logs and a non-zero exit status."""
    grid = write_grid(tmp_path / "grid.yaml", TWO_POINTS)
    record = tmp_path / "sbatch.sh"
    _fake_slurm(tmp_path / "bin", record)
    out = tmp_path / "slurm"
    result = nclaunch(
        *("sweep", str(grid), "--backend", "submitit", "--partition", "gpu-a100"),
        *("--gpus-per-run", "1", "--max-parallel", "2", "--timeout-min", "90"),
        *("--out", str(out), "--sidecar", "127.0.0.1:9"),
        env={"PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}"},
        timeout=120,
    )
    assert result.returncode == 1, f"{result.stdout}\n{result.stderr}"
    script = record.read_text()
    for line in (
        "#SBATCH --partition=gpu-a100",
        "#SBATCH --array=0-1%2",
        "#SBATCH --gpus-per-node=1",
        "#SBATCH --time=90",
        "#SBATCH --job-name=nclaunch-sweep-slurm",
    ):
        assert line in script, script
    assert "2 point(s) submitted to Slurm partition gpu-a100 as job array 4242" in result.stdout
    assert "0/2 run(s) done (0 now, 0 before), 2 failed" in result.stdout
    failed = next(line for line in result.stdout.splitlines() if "failed: adamw" in line)
    assert "(task FAILED)" in failed and str(out / "adamw" / "nclaunch.log") in failed
    assert str(out.resolve() / "submitit" / "4242_1" / "4242_1_0_log.out") in failed
