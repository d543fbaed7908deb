"""ncserve report on run directories written here (no training): tables, theory, files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from PIL import Image

from ncserve import theory
from ncserve.cli import cli
from ncserve.report import build_report, load_runs, nc0_prediction, write_report
from ncserve.report.tables import final_rows, format_ratio, momentum_wd_grids, spearman

STEPS_PER_EPOCH, EPOCHS, LR = 10, 4, 0.1


def make_run(
    root: Path,
    name: str,
    optimizer: str,
    momentum: float,
    wd: float,
    *,
    schedule: str = "constant",
    final_acc: float = 1.0,
    coupled_fraction: float | None = None,
) -> Path:
    """A run directory as nclaunch leaves it; sgd/sgdw nc0 follows the exact theory."""
    run_dir = root / name
    run_dir.mkdir(parents=True)
    config = {
        "run_id": name,
        "model": {"name": "mlp"},
        "data": {"dataset": "synthetic"},
        "optim": {
            "name": optimizer,
            "lr": LR,
            "momentum": momentum,
            "weight_decay": wd,
            "lr_schedule": schedule,
            "coupled_fraction": coupled_fraction,
        },
        "train": {"epochs": EPOCHS},
    }
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    total = STEPS_PER_EPOCH * EPOCHS
    if optimizer in ("sgd", "sgdw"):
        lrs = theory.lr_schedule(LR, schedule, total)
        nc0 = 2.0 * np.abs(theory.nc0_factors(optimizer, lrs, momentum, wd))
    else:
        nc0 = 2.0 * np.linspace(1.0, 1.5, total + 1)
    rows = []
    for epoch in range(EPOCHS + 1):
        step = epoch * STEPS_PER_EPOCH
        rows.append(
            {
                "run_id": name,
                "step": step,
                "epoch": epoch,
                "train_acc": None if epoch == 0 else final_acc * epoch / EPOCHS,
                "nc0": float(nc0[step]),
                "nc1": 1.0 / (1 + epoch),
                "nc2": 0.5,
                "nc3": 0.8 - 0.1 * epoch,
                "nc4": 0.5 + 0.1 * epoch,
                "accuracy": final_acc * epoch / EPOCHS,
            }
        )
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run_dir


@pytest.fixture
def sweep_dir(tmp_path: Path) -> Path:
    root = tmp_path / "sweep"
    for momentum in (0.0, 0.9):
        for wd in (0.05, 0.5):
            make_run(root, f"sgd-m{momentum}-wd{wd}", "sgd", momentum, wd)
    make_run(root, "sgdw-step", "sgdw", 0.9, 0.5, schedule="step")
    make_run(root, "adamw", "adamw", 0.9, 0.05)
    make_run(root, "adam-half", "adam", 0.9, 0.05, coupled_fraction=0.5, final_acc=0.5)
    (root / "service").mkdir()  # a sweep's service folder is not a run
    return root


def test_runs_are_found_in_a_sweep_directory(sweep_dir: Path) -> None:
    records = load_runs([sweep_dir, sweep_dir / "adamw", sweep_dir / "adamw" / "metrics.jsonl"])
    assert len(records) == 7  # each run once
    labels = {r.name: r.label for r in records}
    assert labels["adam-half"] == "adam F=0.5"
    assert all(r.steps_per_epoch == STEPS_PER_EPOCH for r in records)


def test_final_table_and_theory(sweep_dir: Path) -> None:
    records = load_runs([sweep_dir])
    rows = {row.name: row for row in final_rows(records)}
    # The study's order: sgd runs first, adam F=0.5 after adamw.
    assert [r.label for r in final_rows(records)][:5] == ["sgd"] * 4 + ["sgdw"]
    sgd = rows["sgd-m0.9-wd0.05"]
    lrs = theory.lr_schedule(LR, "constant", STEPS_PER_EPOCH * EPOCHS)
    want = abs(theory.sgd_nc0_factors(lrs, 0.9, 0.05)[-1])
    assert sgd.cells["nc0"].ratio == pytest.approx(want, rel=1e-12)
    assert sgd.predicted_nc0 == pytest.approx(sgd.cells["nc0"].final, rel=1e-12)
    assert sgd.cells["nc3"].ratio == pytest.approx(0.4 / 0.8)
    # The step schedule's milestones come from the planned length (epochs x steps per epoch).
    sgdw = rows["sgdw-step"]
    assert sgdw.predicted_nc0 == pytest.approx(sgdw.cells["nc0"].final, rel=1e-12)
    assert rows["adamw"].predicted_nc0 is None
    assert rows["adam-half"].coupled_fraction == 0.5


def test_prediction_reaches_every_step(sweep_dir: Path) -> None:
    record = load_runs([sweep_dir / "sgd-m0.0-wd0.5"])[0]
    prediction = nc0_prediction(record)
    assert prediction is not None and len(prediction.nc0) == STEPS_PER_EPOCH * EPOCHS + 1
    for row in record.rows:
        assert prediction.at(row["step"]) == pytest.approx(row["nc0"], rel=1e-12)
    np.testing.assert_allclose(prediction.epochs[::STEPS_PER_EPOCH], np.arange(EPOCHS + 1))


def test_momentum_weight_decay_grid(sweep_dir: Path) -> None:
    grids = momentum_wd_grids(load_runs([sweep_dir]))
    assert [g.label for g in grids] == ["sgd"]  # only sgd spans 2 momenta x 2 weight decays
    grid = grids[0]
    assert grid.momenta == [0.0, 0.9] and grid.weight_decays == [0.05, 0.5]
    assert grid.predicted is not None
    np.testing.assert_allclose(grid.measured, grid.predicted, rtol=1e-12)
    assert grid.measured[1, 0] < grid.measured[0, 0]  # momentum speeds the decay up


def test_spearman_and_ratio_format() -> None:
    x = np.array([1.0, 2.0, 3.0, 4.0])
    assert spearman(x, x**3) == pytest.approx(1.0)
    assert spearman(x, -x) == pytest.approx(-1.0)
    assert spearman(x, np.array([1.0, 1.0, 2.0, 2.0])) == pytest.approx(0.894427191)
    assert spearman(x[:2], x[:2]) is None
    assert format_ratio(2.1e-4) == "×2.1e-04" and format_ratio(0.5) == "×0.5"


def _html_images(text: str) -> int:
    return text.count('src="data:image/png;base64,')


def test_png_and_html_reports(sweep_dir: Path, tmp_path: Path) -> None:
    report = build_report(load_runs([sweep_dir]), title="unit sweep")
    titles = [s.title for s in report.sections]
    assert "Momentum x weight decay" in titles and "nc0 against nc3" in titles
    assert "What each run's NC0 says" in titles
    png, html = tmp_path / "r.png", tmp_path / "r.html"
    write_report(report, png)
    write_report(report, html)
    with Image.open(png) as image:
        assert image.format == "PNG"
    text = html.read_text()
    assert _html_images(text) == 4  # verdicts, curves, nc0-nc3, heatmap
    assert "http://" not in text and "https://" not in text and "<script" not in text
    assert "<td>adam F=0.5</td>" in text and "×" in text


def test_min_train_acc_leaves_runs_out(sweep_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "r.html"
    result = CliRunner().invoke(
        cli, ["report", str(sweep_dir), "--out", str(out), "--min-train-acc", "0.99"]
    )
    assert result.exit_code == 0, result.output
    assert "6 run(s), 1 left out below --min-train-acc" in result.output
    assert "<td>adam-half</td>" not in out.read_text()


@pytest.mark.parametrize(
    ("make_args", "message"),
    [
        (lambda d: [str(d / "missing"), "--out", str(d / "r.png")], "no such file or directory"),
        (lambda d: [str(d), "--out", str(d / "r.png")], "no metrics.jsonl in it"),
        (lambda d: [str(d), "--out", str(d / "r.pdf")], "must end in .png or .html"),
    ],
)
def test_report_user_errors(tmp_path: Path, make_args: Any, message: str) -> None:
    (tmp_path / "empty").mkdir()
    result = CliRunner().invoke(cli, ["report", *make_args(tmp_path / "empty")])
    assert result.exit_code == 2
    assert message in result.output and "Traceback" not in result.output


def test_the_legend_names_every_setting_that_varies(tmp_path: Path) -> None:
    from ncserve.report.figures import curve_colors, curve_labels

    for name, opt, momentum in (("a", "sgd", 0.0), ("b", "sgd", 0.9), ("c", "adamw", 0.9)):
        make_run(tmp_path, name, opt, momentum, 5e-3)
    records = load_runs([tmp_path])
    labels = curve_labels(records)
    assert labels == {"a": "sgd momentum=0", "b": "sgd momentum=0.9", "c": "adamw momentum=0.9"}
    colors = curve_colors(records, labels)
    assert len(set(colors.values())) == 3  # two SGD settings: two shades, not one colour


def test_the_verdict_reads_nc0_from_the_fit_on() -> None:
    from ncserve.report.verdict import verdict

    def rows(nc0s, accs):
        return [
            {"epoch": e, "nc0": n, "accuracy": a}
            for e, (n, a) in enumerate(zip(nc0s, accs, strict=True))
        ]

    assert verdict(rows([2, 1.5, 1.0, 0.5], [0.5, 0.995, 0.999, 1.0])).startswith(
        "NC0 decaying: x3 smaller since the fit at epoch 1"
    )
    assert verdict(rows([2, 2.1, 2.2, 2.3], [0.5, 0.995, 0.999, 1.0])).startswith(
        "NC0 not decaying"
    )
    assert verdict(rows([2, 1.5], [0.5, 0.9])).startswith("not fitted yet")
    assert "too early" in verdict(rows([2, 1.5], [0.5, 0.995]))


def test_run_report_axes_are_linear_when_narrow_and_carry_the_verdict(tmp_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    from launcher.report import write_report as write_run_report

    rows = [
        {"epoch": e, "step": 10 * e, "nc0": 1.776 + 0.006 * e, "nc1": 1.6 / (1 + 3 * e),
         "accuracy": min(1.0, 0.9 + 0.03 * e), "run_id": "r"}
        for e in range(8)
    ]  # fmt: skip
    captured = {}
    real_savefig = matplotlib.figure.Figure.savefig

    def keep(fig, *args, **kwargs):
        captured["fig"] = fig
        return real_savefig(fig, *args, **kwargs)

    matplotlib.figure.Figure.savefig = keep
    try:
        write_run_report(rows, tmp_path / "report.png", title="r")
    finally:
        matplotlib.figure.Figure.savefig = real_savefig
    fig = captured["fig"]
    axes = {ax.get_title(): ax for ax in fig.axes if ax.get_visible()}
    assert axes["nc0"].get_yscale() == "linear" and axes["nc0"].get_ylabel() == "‖Wᵀ1‖"
    assert axes["nc1"].get_yscale() == "log"
    assert "NC0 not decaying" in fig._suptitle.get_text()
    plt.close(fig)


def test_rows_without_an_epoch_still_draw(tmp_path: Path) -> None:
    """A run pushed with `ncserve push` has no epoch: its rows say "epoch": null."""
    run_dir = tmp_path / "pushed"
    run_dir.mkdir()
    row = {"run_id": "pushed", "step": 0, "epoch": None, "nc0": 1.5, "nc1": 0.4, "accuracy": 0.9}
    (run_dir / "metrics.jsonl").write_text(json.dumps(row) + "\n")
    result = CliRunner().invoke(cli, ["report", str(run_dir), "--out", str(tmp_path / "r.png")])
    assert result.exit_code == 0, result.output


# -- reports from the service alone ------------------------------------------------------

SWEEP_RUNS = {  # run id -> (sweep id, nclaunch options)
    "sgd-m09": ("grid", "--optimizer sgd --momentum 0.9 --weight-decay 0.001"),
    "adamw-a": ("grid", "--optimizer adamw --lr 0.002"),
    "sgd-other": ("elsewhere", "--optimizer sgd"),
}


@pytest.fixture(scope="module")
def service_sweep(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Three nclaunch runs reporting to one external service: two of sweep "grid", one of
    sweep "elsewhere". Yields (folder of the run directories, service target, database)."""
    from tests.launcher_support import TINY
    from tests.reliability_support import Sidecar, start_nclaunch

    root = tmp_path_factory.mktemp("service-sweep")
    db = root / "ncserve.db"
    with Sidecar(db, root / "serve.log") as sidecar:
        launched = {
            run_id: start_nclaunch(
                root / f"{run_id}.log",
                *TINY,
                *f"--epochs 2 --sidecar {sidecar.target} --sweep-id {sweep} --run-id {run_id}"
                f" --run-dir {root / 'runs' / run_id} {options}".split(),
            )
            for run_id, (sweep, options) in SWEEP_RUNS.items()
        }
        for run_id, process in launched.items():
            code = process.wait(timeout=400)
            assert code == 0, (root / f"{run_id}.log").read_text()
        yield root / "runs", sidecar.target, db


def _same(a: Any, b: Any) -> bool:
    return a == b or (isinstance(a, float) and isinstance(b, float) and np.isnan(a) and np.isnan(b))


def _check_service_records(records: list[Any], runs_dir: Path) -> None:
    """The sweep's two runs, with the rows of their metrics.jsonl and their config's settings."""
    from ncserve.metrics import METRIC_KEYS
    from ncserve.report import load_run
    from ncserve.report.settings import REPORT_SETTINGS

    assert sorted(r.name for r in records) == ["adamw-a", "sgd-m09"]
    for record in records:
        local = load_run(runs_dir / record.name)
        assert [row["step"] for row in record.rows] == [row["step"] for row in local.rows]
        for got, want in zip(record.rows, local.rows, strict=True):
            # Timings of the trainer's own are not sent; wall_time is the service's.
            assert set(got) == set(want) - {"epoch_time_s", "measure_time_s"}
            for key in (*METRIC_KEYS, "epoch", "lr", "train_loss", "train_acc", "world_size"):
                assert _same(got[key], want[key]), (record.name, got["step"], key)
        for setting in REPORT_SETTINGS:
            assert record.setting(setting.path) == local.setting(setting.path), setting.path
    local_rows = final_rows(load_runs([runs_dir / r.name for r in records]))
    assert final_rows(records) == local_rows  # the same table, theory column included


@pytest.mark.slow
def test_report_from_the_service_reads_one_sweep(service_sweep: Any, tmp_path: Path) -> None:
    from ncserve.client import NCClient
    from ncserve.report import load_service_runs

    runs_dir, target, _ = service_sweep
    client = NCClient(target, replay_in_background=False)
    try:
        records = load_service_runs(client, target, sweep="grid")
    finally:
        client.close(timeout_s=0)
    _check_service_records(records, runs_dir)

    out = tmp_path / "grid.html"
    args = ["report", "--target", target, "--sweep", "grid", "--out", str(out)]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "2 run(s)" in result.output
    text = out.read_text()
    assert "<td>sgd-m09</td>" in text and "<td>adamw-a</td>" in text
    assert "sgd-other" not in text

    everything = CliRunner().invoke(cli, ["report", "--target", target, "--out", str(out)])
    assert everything.exit_code == 0 and "3 run(s)" in everything.output, everything.output


@pytest.mark.slow
def test_report_from_the_database_file_reads_one_sweep(service_sweep: Any, tmp_path: Path) -> None:
    from ncserve.cli.store_reader import StoreReader
    from ncserve.report import load_service_runs

    runs_dir, _, db = service_sweep
    reader = StoreReader(db)
    try:
        records = load_service_runs(reader, str(db), sweep="grid")
    finally:
        reader.close()
    _check_service_records(records, runs_dir)

    out = tmp_path / "grid.png"
    result = CliRunner().invoke(
        cli, ["report", "--db", str(db), "--sweep", "grid", "--out", str(out)]
    )
    assert result.exit_code == 0 and "2 run(s)" in result.output, result.output
    with Image.open(out) as image:
        assert image.format == "PNG"


@pytest.mark.slow
@pytest.mark.parametrize("source", ["--target", "--db"])
def test_an_unknown_sweep_is_named_with_the_known_ones(
    service_sweep: Any, tmp_path: Path, source: str
) -> None:
    _, target, db = service_sweep
    where = target if source == "--target" else str(db)
    args = ["report", source, where, "--sweep", "nope", "--out", str(tmp_path / "r.html")]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2
    assert "--sweep 'nope'" in result.output and "known sweeps: elsewhere, grid" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "r.html").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["RUN", "--target", "127.0.0.1:1"], "not both"),
        (["RUN", "--db", "x.db"], "not both"),
        (["--target", "127.0.0.1:1", "--db", "x.db"], "either --target"),
        (["RUN", "--sweep", "grid"], "--sweep picks runs at --target or in --db"),
        (["--db", "DB"], "holds no runs"),
        (["--target", "127.0.0.1:1", "--deadline", "0.5"], "ncserve report --db FILE"),
    ],
)
def test_report_source_errors(tmp_path: Path, args: list[str], message: str) -> None:
    from ncserve.service.store import Store

    run_dir = make_run(tmp_path, "run", "sgd", 0.9, 0.05)
    Store(tmp_path / "empty.db").close()
    words = [str(run_dir) if a == "RUN" else str(tmp_path / "empty.db") if a == "DB" else a
             for a in args]  # fmt: skip
    result = CliRunner().invoke(cli, ["report", *words, "--out", str(tmp_path / "r.html")])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output


def test_settings_travel_as_metadata_and_back() -> None:
    """Each setting the report reads is listed once in REPORT_SETTINGS, and survives the trip
    through string metadata with its type."""
    import re

    from ncserve.report.settings import (
        REPORT_SETTING_PATHS,
        config_from_metadata,
        settings_metadata,
    )

    package = Path(__file__).resolve().parents[1] / "ncserve" / "report"
    source = "\n".join(p.read_text() for p in package.glob("*.py"))
    read = set(re.findall(r"""setting\(\s*["']([\w.]+)["']""", source))
    assert read and read <= REPORT_SETTING_PATHS
    config = {
        "optim": {"name": "adam", "lr": 1e-3, "momentum": 0.9, "weight_decay": 5e-4,
                  "beta2": 0.999, "coupled_fraction": None, "lr_schedule": "cosine"},
        "model": {"name": "resnet18"}, "data": {"dataset": "cifar10"},
        "train": {"epochs": 200, "batch_size": 128, "seed": 3},
    }  # fmt: skip
    metadata = settings_metadata(config)
    assert metadata["optim.lr"] == "0.001" and "optim.coupled_fraction" not in metadata
    rebuilt = config_from_metadata({**metadata, "optimizer": "adam", "train.seed": "x"})
    del config["optim"]["coupled_fraction"], config["train"]["seed"]  # None; unparsable
    assert rebuilt == config
