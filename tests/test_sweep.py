"""nclaunch sweep: grid files, run names, run states, and a real 2 x 2 sweep end to end."""

from __future__ import annotations

import io
import itertools
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from PIL import Image
from rich.console import Console

from launcher.cli import main_group
from launcher.sweep import (
    DONE,
    NEW,
    UNFINISHED,
    ActiveRun,
    SweepProgress,
    load_grid,
    nclaunch_command,
    plan_sweep,
    run_state,
)
from ncserve.cli import cli as ncserve_cli
from ncserve.service.store import Store
from tests.launcher_support import REPO, nclaunch
from tests.launcher_support import TINY_GRID_BASE as TINY_BASE


def write_grid(path: Path, grid: dict[str, object]) -> Path:
    path.write_text(yaml.safe_dump(grid))
    return path


def test_paper_grid_is_the_papers_3888_runs() -> None:
    base, groups = load_grid(REPO / "examples" / "paper_grid.yaml")
    assert base["train.epochs"] == 200 and base["optim.lr_schedule"] == "step"
    combos = [
        dict(zip(g, values, strict=True))
        for g in groups
        for values in itertools.product(*g.values())
    ]
    assert len(combos) == 3888
    optimizers = {c["optim.name"] for c in combos}
    assert optimizers == {"sgd", "sgdw", "adam", "adamw", "signum", "signumw"}
    decoupled = {
        c["optim.weight_decay"] for c in combos if c["optim.name"] in ("sgdw", "adamw", "signumw")
    }
    assert {float(v) for v in decoupled} == {0, 5e-4, 0.05, 0.5, 5, 10}
    sgd_lrs = {c["optim.lr"] for c in combos if c["optim.name"] in ("sgd", "sgdw")}
    assert sgd_lrs == {0.001, 0.01, 0.0679}


def test_plan_names_runs_after_the_values_that_vary(tmp_path: Path) -> None:
    grid = write_grid(
        tmp_path / "grid.yaml",
        {
            "base": {**TINY_BASE, "optim": {"beta2": 0.99}},
            "axes": {"--weight-decay": [0, "5e-4"], "seed": [0, 1]},
            "groups": [
                {"optimizer": ["sgd"], "lr": [0.05]},
                {"optimizer": ["adam"], "lr": [0.001], "coupled_fraction": [0.5]},
            ],
        },
    )
    plan = plan_sweep(grid, tmp_path / "out", {"optim.momentum": 0.5})
    names = [run.name for run in plan.runs]
    assert len(names) == 8 == len(set(names))
    assert names[0] == "sgd-lr0.05-wd0-seed0"  # no coupled fraction: no part for it
    assert "adam-cf0.5-lr0.001-wd0.0005-seed1" in names
    run = plan.runs[-1]
    assert run.config.optim.beta2 == 0.99 and run.config.optim.momentum == 0.5
    assert run.config.launch.nnodes == "1"  # YAML's int became the string the field wants
    command = nclaunch_command(plan, run, target="127.0.0.1:5", resume=False)
    assert command[command.index("--sidecar") + 1] == "127.0.0.1:5"
    assert command[command.index("--run-id") + 1] == run.name
    assert "--resume" not in command


def test_set_pins_an_axis(tmp_path: Path) -> None:
    grid = write_grid(
        tmp_path / "grid.yaml",
        {"base": TINY_BASE, "axes": {"optimizer": ["sgd", "sgdw"], "lr": [0.1, 0.2]}},
    )
    result = CliRunner().invoke(
        main_group,
        [
            "sweep",
            str(grid),
            "--out",
            str(tmp_path / "out"),
            "--dry-run",
            "--set",
            "lr=0.3",
            "--set",
            "seed=4",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "2 run(s)" in result.output
    assert "sgd " in result.output and "sgdw " in result.output  # named by what still varies
    assert not (tmp_path / "out").exists()  # a dry run writes nothing


def test_run_states_and_resume_command(tmp_path: Path) -> None:
    grid = write_grid(
        tmp_path / "grid.yaml", {"base": TINY_BASE, "axes": {"optimizer": ["sgd", "sgdw"]}}
    )
    plan = plan_sweep(grid, tmp_path / "out")
    sgd, sgdw = plan.runs
    assert run_state(plan, sgd) == NEW
    for run, last_epoch in ((sgd, 1), (sgdw, 2)):
        folder = plan.run_dir(run)
        folder.mkdir(parents=True)
        (folder / "config.yaml").write_text(yaml.safe_dump(run.config.model_dump(mode="json")))
        rows = [{"step": 8 * e, "epoch": e, "nc0": 1.0} for e in range(last_epoch + 1)]
        (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert run_state(plan, sgd) == UNFINISHED
    assert run_state(plan, sgdw) == DONE
    assert "--resume" in nclaunch_command(plan, sgd, target=None, resume=True)


@pytest.mark.parametrize(
    ("grid", "message"),
    [
        ({"axes": {"learning-rate": [0.1]}}, "unknown setting 'learning-rate'"),
        ({"axes": {"run-dir": ["x"]}}, "'run-dir' cannot be set in a sweep"),
        ({"base": {"sweep-id": "x"}}, "'sweep-id' cannot be set in a sweep"),
        ({"axes": {"lr": []}}, "the list of values is empty"),
        ({"axes": {"lr": [0.1]}, "groups": [{"lr": [0.2]}]}, "already in axes"),
        ({"axis": {"lr": [0.1]}}, "unknown key(s) axis"),
        ({"base": {"optimizer": "sgd"}, "axes": {"lr": [-1]}}, "optim.lr (--lr): got -1"),
        ({"base": {"dataset": "mnist"}}, "give --data-dir"),
    ],
)
def test_grid_errors_are_one_line(tmp_path: Path, grid: dict[str, object], message: str) -> None:
    path = write_grid(tmp_path / "grid.yaml", grid)
    result = CliRunner().invoke(main_group, ["sweep", str(path), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def finished_sweep(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    """A 2 x 2 sweep of 2-epoch runs on tiny synthetic data, two at a time."""
    root = tmp_path_factory.mktemp("sweep")
    grid = write_grid(
        root / "grid.yaml",
        {
            "base": TINY_BASE,
            "axes": {"optimizer": ["sgd", "adamw"], "weight-decay": [0, 0.05]},
        },
    )
    out = root / "out"
    result = nclaunch("sweep", str(grid), "--out", str(out), "--parallel", "2", timeout=400)
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    return grid, out, result.stdout


NAMES = ["sgd-wd0", "sgd-wd0.05", "adamw-wd0", "adamw-wd0.05"]


@pytest.mark.slow
def test_sweep_runs_every_combination_against_one_service(
    finished_sweep: tuple[Path, Path, str],
) -> None:
    _, out, stdout = finished_sweep
    assert "4 run(s); 0 done, 0 to resume, 4 new" in stdout
    assert "4/4 run(s) done" in stdout
    for name in NAMES:
        rows = [
            json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()
        ]
        assert [r["epoch"] for r in rows] == [0, 1, 2]
        assert all("nc1" in r for r in rows)  # finalized by the service, not only nc0 from W
        saved = yaml.safe_load((out / name / "config.yaml").read_text())
        assert saved["run_id"] == name and saved["train"]["epochs"] == 2
    # One database in the sweep directory holds every run and its three measurements.
    store = Store(out / "service" / "ncserve.db")
    try:
        assert sorted(r.run_id for r in store.runs()) == sorted(NAMES)
        assert all(len(store.measurements(name)) == 3 for name in NAMES)
    finally:
        store.close()
    plan = yaml.safe_load((out / "sweep.yaml").read_text())
    assert [r["name"] for r in plan["runs"]] == NAMES


@pytest.mark.slow
def test_list_names_the_runs_of_the_local_backend(
    finished_sweep: tuple[Path, Path, str],
) -> None:
    grid, out, _ = finished_sweep
    result = CliRunner().invoke(main_group, ["sweep", str(grid), "--list", "--format", "json"])
    assert result.exit_code == 0, result.output
    points = json.loads(result.output)
    assert [(p["index"], p["name"]) for p in points] == list(enumerate(NAMES))
    planned = yaml.safe_load((out / "sweep.yaml").read_text())
    assert [(r["index"], r["name"]) for r in planned["runs"]] == list(enumerate(NAMES))
    for name in NAMES:  # each run got the sweep id, the --out folder's name
        saved = yaml.safe_load((out / name / "config.yaml").read_text())
        assert saved["tracking"]["sweep_id"] == out.name


@pytest.mark.slow
def test_second_invocation_runs_nothing(finished_sweep: tuple[Path, Path, str]) -> None:
    grid, out, _ = finished_sweep
    before = {name: (out / name / "metrics.jsonl").read_bytes() for name in NAMES}
    logs = {name: (out / name / "nclaunch.log").read_bytes() for name in NAMES}
    result = nclaunch("sweep", str(grid), "--out", str(out), "--parallel", "2")
    assert result.returncode == 0, result.stderr
    assert "4 run(s); 4 done, 0 to resume, 0 new" in result.stdout
    assert "starting" not in result.stdout and "sweep service" not in result.stdout
    assert {name: (out / name / "metrics.jsonl").read_bytes() for name in NAMES} == before
    assert {name: (out / name / "nclaunch.log").read_bytes() for name in NAMES} == logs


@pytest.mark.slow
@pytest.mark.parametrize("suffix", [".png", ".html"])
def test_report_of_the_sweep(finished_sweep: tuple[Path, Path, str], suffix: str) -> None:
    _, out, _ = finished_sweep
    report = out / f"report{suffix}"
    result = CliRunner().invoke(ncserve_cli, ["report", str(out), "--out", str(report)])
    assert result.exit_code == 0, result.output
    assert "4 run(s)" in result.output
    if suffix == ".png":
        with Image.open(report) as image:
            assert image.format == "PNG" and image.width > 800 and image.height > 800
        return
    text = report.read_text()
    assert text.count('src="data:image/png;base64,') >= 2  # curves, nc0-nc3
    assert "http://" not in text and "https://" not in text and "<link" not in text
    for name in NAMES:
        assert f"<td>{name}</td>" in text
    # The sgd runs carry the exact nc0 next to the measured one.
    assert "nc0 exact" in text


def test_progress_view_on_a_terminal(tmp_path: Path) -> None:
    grid = write_grid(tmp_path / "grid.yaml", {"base": TINY_BASE, "axes": {"lr": [0.1, 0.2]}})
    plan = plan_sweep(grid, tmp_path / "out")
    run = plan.runs[0]
    plan.run_dir(run).mkdir(parents=True)
    row = {"step": 8, "epoch": 1, "train_acc": 0.625, "nc0": 0.75}
    (plan.run_dir(run) / "metrics.jsonl").write_text(json.dumps(row) + "\n")
    screen = io.StringIO()
    console = Console(file=screen, force_terminal=True, width=120, color_system=None)
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    with (tmp_path / "log").open("ab") as log, SweepProgress(plan, console, 2, 0) as progress:
        active = ActiveRun(run, process, log, time.monotonic(), None, resumed=False)
        progress.started_run(active)
        running = screen.getvalue()
        progress.ended_run(active, 0)
    text = screen.getvalue()
    assert "starting lr0.1" in text and "finished lr0.1" in text
    assert "1/2 done, 0 running, 1 left" in text
    assert "62.5%" in running and "1/2" in running  # the running table: epoch, train acc
