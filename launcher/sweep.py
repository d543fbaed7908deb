"""``nclaunch sweep GRID.yaml --out DIR``: a grid of nclaunch runs sharing one service.

The grid file (YAML)::

    base:                    # settings every run shares
      dataset: mnist5k       # nclaunch option names (lr, weight-decay, nodes, ...), config
      epochs: 10             # paths (optim.lr), or whole sections as --print-config shows
    axes:                    # the cartesian product of these lists
      optimizer: [sgd, adam]
      weight-decay: [0, 5.0e-4]
    groups:                  # optional: a union of sub-grids, each crossed with `axes`
      - {optimizer: [sgd, sgdw], lr: [0.01, 0.0679]}
      - {optimizer: [adam, adamw], lr: [0.001, 0.005]}

Every combination becomes one nclaunch run in ``DIR/<name>``, its name made of the values
that vary across the sweep (``sgd-lr0.01-wd0.0005``). All runs report to one ncserve
service, started by the sweep with its database in ``DIR/service`` (or the external one
in the grid's ``sidecar``). Each run is a separate ``nclaunch`` process, so a run that
fails leaves the others running. Re-running the same command skips finished runs (a
measurement at the last epoch is in their metrics.jsonl) and continues unfinished ones
from their last checkpoint with ``nclaunch --resume``.

Layout of DIR::

    sweep.yaml              the grid as given and the planned runs (names and settings)
    service/                the sweep's ncserve database, log and port file
    <name>/                 an nclaunch run directory, plus
      sweep-settings.yaml   the settings the sweep passes (nclaunch --config)
      nclaunch.log          the run's console output, appended on every attempt
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import click
import yaml
from pydantic import ValidationError
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from launcher.config import RunConfig
from launcher.launch import EmbeddedService, LaunchError
from launcher.options import FLAG_BY_PATH, FLAGS, preflight
from launcher.resolve import describe_validation_error, load_yaml, resolve, to_yaml
from launcher.rundir import RunDir, write_atomic
from ncserve.errors import UserError

GRID_KEYS: tuple[str, ...] = ("base", "axes", "groups")
# Settings the sweep decides for every run; a grid that sets them would break the layout.
_SWEEP_OWNED: dict[str, str] = {
    "run_id": "the sweep names each run after its values",
    "run_dir": "each run lives in --out/<name>",
    "resume": "the sweep resumes unfinished runs itself",
}
# Order and short labels of the values that make up a run's name; others follow in the
# grid's order with their own leaf name, and the seed comes last.
_NAME_LABELS: dict[str, str] = {
    "model.name": "",
    "data.dataset": "",
    "optim.name": "",
    "optim.coupled_fraction": "cf",
    "optim.lr": "lr",
    "optim.lr_schedule": "",
    "optim.momentum": "m",
    "optim.beta2": "b2",
    "optim.weight_decay": "wd",
    "optim.eps": "eps",
    "model.width": "w",
    "train.batch_size": "bs",
    "train.epochs": "ep",
    "launch.nnodes": "nodes",
    "launch.nproc_per_node": "nproc",
    "engine.name": "",
    "engine.zero_stage": "zero",
    "engine.precision": "",
}
_SEED_PATH = "train.seed"
# Settings the sweep fills in for each run and that therefore differ between attempts.
_RUN_LOCAL = frozenset({"tracking.sidecar", "run_id", "run_dir", "resume", "launch.rdzv_id"})
_POLL_S = 0.5


# -- the grid --------------------------------------------------------------------------------


@dataclass(frozen=True)
class PlannedRun:
    """One combination: its name, the settings passed to nclaunch and its resolved config."""

    name: str
    settings: dict[str, Any]  # path -> value, as the grid gives them
    config: RunConfig  # resolved

    @property
    def epochs(self) -> int:
        return int(self.config.train.epochs)


@dataclass(frozen=True)
class SweepPlan:
    grid_path: Path
    out_dir: Path
    runs: list[PlannedRun]
    axis_paths: list[str]  # the settings that vary across the sweep, in name order

    @property
    def needs_service(self) -> bool:
        """Some run reports to a service and names no external one: start the sweep's."""
        return any(
            run.config.tracking.enabled and run.config.tracking.sidecar is None for run in self.runs
        )

    def run_dir(self, run: PlannedRun) -> Path:
        return self.out_dir / run.name

    def run_id(self, run: PlannedRun) -> str:
        """The run's id at the service: its name, prefixed with the sweep's folder name when
        the service is an external one that other sweeps may share."""
        if run.config.tracking.sidecar is None:
            return run.name
        prefix = re.sub(r"[^A-Za-z0-9_.-]", "_", self.out_dir.resolve().name)
        return f"{prefix}.{run.name}"


def option_paths() -> dict[str, str]:
    """Every nclaunch option name (without dashes, '-' for '_') -> its config path."""
    names: dict[str, str] = {}
    for flag in FLAGS:
        for decl in flag.decls:
            for part in decl.split("/"):
                name = part.lstrip("-").replace("_", "-")
                if not name.startswith("no-"):
                    names[name] = flag.path
    return names


def setting_path(key: str, where: str) -> str:
    """The config path a grid key names: an option name (lr, --weight-decay) or a path."""
    if not isinstance(key, str) or not key:
        raise UserError(f"{where}: setting names are strings, got {key!r}")
    paths = option_paths()
    name = key.lstrip("-").replace("_", "-")
    path = paths.get(name)
    if path is None and "." in key:
        # A config path: every part must be a field of its section.
        node: Any = RunConfig
        for part in key.split("."):
            fields = getattr(node, "model_fields", {})
            if part not in fields:
                node = None
                break
            node = fields[part].annotation
        path = key if node is not None else None
    if path is None:
        known = ", ".join(sorted(n for n in paths if n not in ("config", "print-config")))
        raise UserError(
            f"{where}: unknown setting {key!r}; use an nclaunch option ({known}) "
            "or a config path such as optim.lr"
        )
    if path in _SWEEP_OWNED:
        raise UserError(f"{where}: {key!r} cannot be set in a sweep: {_SWEEP_OWNED[path]}")
    return path


def _default_at(path: str) -> Any:
    value: Any = RunConfig()
    for part in path.split("."):
        value = getattr(value, part)
    return value


def _coerce(path: str, value: Any) -> Any:
    # YAML reads `nodes: 2` as an int; the launch fields are strings (N or MIN:MAX, auto).
    if (
        isinstance(_default_at(path), str)
        and isinstance(value, int | float)
        and not isinstance(value, bool)
    ):
        return str(value)
    if isinstance(value, Path):
        return str(value)
    return value


def _flatten_base(base: Any, where: str) -> dict[str, Any]:
    """``base`` as path -> value: option names, config paths or whole sections."""
    if base is None:
        return {}
    if not isinstance(base, dict):
        raise UserError(f"{where}: must be a mapping of settings, not {type(base).__name__}")
    flat: dict[str, Any] = {}
    sections = {
        name
        for name, info in RunConfig.model_fields.items()
        if isinstance(info.default_factory, type)
    }
    for key, value in base.items():
        if key in sections and isinstance(value, dict):
            for leaf, inner in value.items():
                path = setting_path(f"{key}.{leaf}", f"{where}.{key}")
                flat[path] = _coerce(path, inner)
        else:
            path = setting_path(key, where)
            flat[path] = _coerce(path, value)
    return flat


def _axes(raw: Any, where: str) -> dict[str, list[Any]]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise UserError(f"{where}: must map settings to lists of values, not {type(raw).__name__}")
    axes: dict[str, list[Any]] = {}
    for key, values in raw.items():
        path = setting_path(key, where)
        values = values if isinstance(values, list) else [values]
        if not values:
            raise UserError(f"{where}.{key}: the list of values is empty")
        if path in axes:
            raise UserError(f"{where}: {key!r} names {path}, which is already an axis")
        axes[path] = [_coerce(path, v) for v in values]
    return axes


def load_grid(path: Path) -> tuple[dict[str, Any], list[dict[str, list[Any]]]]:
    """(base settings, list of sub-grids) of a grid file; each sub-grid is path -> values."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as err:
        raise UserError(f"{path}: cannot read the grid: {err.strerror}") from None
    except yaml.YAMLError as err:
        raise UserError(f"{path}: not valid YAML: {' '.join(str(err).split())}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: a grid is a mapping with keys {', '.join(GRID_KEYS)}")
    unknown = sorted(set(data) - set(GRID_KEYS))
    if unknown:
        raise UserError(
            f"{path}: unknown key(s) {', '.join(map(str, unknown))}; a grid has "
            f"{', '.join(GRID_KEYS)}"
        )
    base = _flatten_base(data.get("base"), f"{path}: base")
    shared = _axes(data.get("axes"), f"{path}: axes")
    groups_raw = data.get("groups")
    if groups_raw is None:
        return base, [shared]
    if not isinstance(groups_raw, list) or not groups_raw:
        raise UserError(f"{path}: groups must be a non-empty list of sub-grids")
    groups = []
    for i, raw in enumerate(groups_raw):
        group = _axes(raw, f"{path}: groups[{i}]")
        both = sorted(set(group) & set(shared))
        if both:
            raise UserError(f"{path}: groups[{i}] sets {', '.join(both)}, already in axes")
        groups.append({**shared, **group})
    return base, groups


def _tree(flat: dict[str, Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for path, value in flat.items():
        *sections, leaf = path.split(".")
        node = tree
        for section in sections:
            node = node.setdefault(section, {})
        node[leaf] = value
    return tree


def _value_at(config: Any, path: str) -> Any:
    value = config
    for part in path.split("."):
        value = getattr(value, part)
    return value


def _name_part(path: str, value: Any) -> str:
    label = _NAME_LABELS.get(path, path.split(".")[-1].replace("_", ""))
    if path == _SEED_PATH:
        label = "seed"
    if isinstance(value, bool):
        text = "on" if value else "off"
        label = label or path.split(".")[-1]
    elif isinstance(value, float):
        short = f"{value:g}"
        text = short if float(short) == value else repr(value)
    elif isinstance(value, Path):
        text = value.name or str(value)
    else:
        text = str(value)
        if "/" in text:
            text = Path(text).name or text
    return re.sub(r"[^A-Za-z0-9_.-]", "_", f"{label}{text}")


def _ordered_paths(paths: list[str]) -> list[str]:
    known = [p for p in _NAME_LABELS if p in paths]
    rest = [p for p in paths if p not in _NAME_LABELS and p != _SEED_PATH]
    seed = [_SEED_PATH] if _SEED_PATH in paths else []
    return known + rest + seed


def plan_sweep(
    grid_path: Path, out_dir: Path, overrides: dict[str, Any] | None = None
) -> SweepPlan:
    """Every run of the grid, validated and named; duplicates (same settings) once."""
    import torch

    base, groups = load_grid(grid_path)
    overrides = overrides or {}
    base = {**base, **overrides}
    # An override of an axis pins it to that one value (e.g. one dataset of a paper grid).
    groups = [{p: ([overrides[p]] if p in overrides else v) for p, v in g.items()} for g in groups]
    combos: list[dict[str, Any]] = []
    seen: set[str] = set()
    for group in groups:
        paths = list(group)
        for values in itertools.product(*(group[p] for p in paths)):
            settings = {**base, **dict(zip(paths, values, strict=True))}
            key = repr(sorted(settings.items(), key=lambda kv: kv[0]))
            if key not in seen:
                seen.add(key)
                combos.append(settings)
    cuda = torch.cuda.is_available()
    configs = []
    for i, settings in enumerate(combos):
        try:
            config = RunConfig.model_validate(_tree(settings))
            configs.append(resolve(config, cuda_available=cuda))
        except ValidationError as err:
            described = describe_validation_error(err, FLAG_BY_PATH)
            raise UserError(
                f"{grid_path}: combination {i + 1} ({_describe(settings)}): {described}"
            ) from None
        except ValueError as err:
            raise UserError(
                f"{grid_path}: combination {i + 1} ({_describe(settings)}): {err}"
            ) from None
    varying = [
        p
        for p in dict.fromkeys(p for settings in combos for p in settings)
        if len({repr(_value_at(c, p)) for c in configs}) > 1
    ]
    axis_paths = _ordered_paths(varying)
    runs: list[PlannedRun] = []
    names: dict[str, int] = {}
    for settings, config in zip(combos, configs, strict=True):
        # A setting left unset (None) in this run adds nothing to its name.
        parts = [_name_part(p, v) for p in axis_paths if (v := _value_at(config, p)) is not None]
        name = "-".join(parts) or "run"
        count = names.get(name, 0)
        names[name] = count + 1
        if count:
            name = f"{name}-{count + 1}"
        config.run_id = name
        config.run_dir = out_dir / name
        runs.append(PlannedRun(name, settings, config))
    for run in runs:
        try:
            preflight(run.config)
        except UserError as err:
            raise UserError(f"{grid_path}: run {run.name}: {err.message}") from None
    return SweepPlan(grid_path=grid_path, out_dir=out_dir, runs=runs, axis_paths=axis_paths)


def _describe(settings: dict[str, Any]) -> str:
    return ", ".join(f"{p}={v}" for p, v in settings.items())


# -- the state of a run directory -----------------------------------------------------------

NEW, UNFINISHED, DONE = "new", "unfinished", "done"


def run_state(plan: SweepPlan, run: PlannedRun) -> str:
    """new (nothing there), unfinished (config.yaml, no final measurement) or done."""
    folder = RunDir(plan.run_dir(run))
    if not folder.config_path.is_file():
        return NEW
    rows = folder.read_metrics()
    if any(int(row.get("epoch") or 0) >= run.epochs for row in rows):
        return DONE
    return UNFINISHED


def check_same_settings(plan: SweepPlan, run: PlannedRun) -> None:
    """An existing run directory must hold the run this grid describes."""
    saved_path = plan.run_dir(run) / "config.yaml"
    try:
        saved = load_yaml(saved_path)
    except ValueError as err:
        raise UserError(f"{saved_path}: {err}") from None
    planned = yaml.safe_load(to_yaml(run.config))
    for path in run.settings:
        if path in _RUN_LOCAL:
            continue
        have: Any = saved
        want: Any = planned
        for part in path.split("."):
            have = have.get(part) if isinstance(have, dict) else None
            want = want.get(part) if isinstance(want, dict) else None
        if have != want:
            raise UserError(
                f"{plan.run_dir(run)} holds a run with {path} = {have!r}, but the grid now "
                f"gives {want!r}; choose another --out for a changed grid"
            )


def _last_row(run_dir: Path) -> dict[str, Any]:
    rows = RunDir(run_dir).read_metrics()
    return rows[-1] if rows else {}


# -- running -----------------------------------------------------------------------------------


def nclaunch_command(
    plan: SweepPlan, run: PlannedRun, *, target: str | None, resume: bool
) -> list[str]:
    """The nclaunch command line of one run (its settings file written beside it)."""
    run_dir = plan.run_dir(run)
    command = [
        sys.executable,
        "-c",
        "from launcher.cli import main; main()",
        "--config",
        str(run_dir / "sweep-settings.yaml"),
        "--run-dir",
        str(run_dir),
        "--run-id",
        plan.run_id(run),
    ]
    # A run that names its own service keeps it; the others report to the sweep's.
    tracking = run.config.tracking
    if target is not None and tracking.enabled and tracking.sidecar is None:
        command += ["--sidecar", target]
    if resume:
        command.append("--resume")
    return command


@dataclass
class ActiveRun:
    run: PlannedRun
    process: subprocess.Popen[bytes]
    log: IO[bytes]
    started: float
    gpu: str | None
    resumed: bool


@dataclass
class SweepOutcome:
    done: list[str] = field(default_factory=list)  # finished before this invocation
    finished: list[str] = field(default_factory=list)  # finished now
    failed: list[tuple[str, int]] = field(default_factory=list)


class SweepProgress:
    """Runs done, running and left: a live bar and a table of the running runs on a
    terminal, one line per event otherwise (a CI log, a pipe)."""

    def __init__(self, plan: SweepPlan, console: Console, total: int, done: int) -> None:
        self.plan = plan
        self.console = console
        self.total = total
        self.done = done
        self.failed = 0
        self.running: dict[str, ActiveRun] = {}
        self.started = time.monotonic()
        self.live: Live | None = None

    def __enter__(self) -> SweepProgress:
        if self.console.is_terminal:
            self.live = Live(
                self._render(), console=self.console, refresh_per_second=2, transient=False
            )
            self.live.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.live is not None:
            self.live.update(self._render())
            self.live.stop()

    @property
    def left(self) -> int:
        return self.total - self.done - self.failed - len(self.running)

    def _counts(self) -> str:
        return f"{self.done}/{self.total} done, {len(self.running)} running, {self.left} left" + (
            f", {self.failed} failed" if self.failed else ""
        )

    def _render(self) -> Group:
        width = 30
        filled = 0 if self.total == 0 else round(width * self.done / self.total)
        elapsed = _clock(time.monotonic() - self.started)
        head = Text.assemble(
            ("sweep ", "bold"),
            ("█" * filled, "green"),
            ("░" * (width - filled), "dim"),
            f"  {self._counts()}  {elapsed}",
        )
        if not self.running:
            return Group(head)
        table = Table(box=None, pad_edge=False, show_header=True, header_style="dim")
        for column in ("running", "epoch", "train acc", "nc0", "time"):
            table.add_column(column, justify="left" if column == "running" else "right")
        for name, active in self.running.items():
            row = _last_row(self.plan.run_dir(active.run))
            acc = row.get("train_acc")
            nc0 = row.get("nc0")
            table.add_row(
                name + (" (resumed)" if active.resumed else ""),
                f"{row.get('epoch', 0)}/{active.run.epochs}",
                "-" if acc is None else f"{100 * acc:.1f}%",
                "-" if nc0 is None else f"{nc0:.4g}",
                _clock(time.monotonic() - active.started),
            )
        return Group(head, table)

    def refresh(self) -> None:
        if self.live is not None:
            self.live.update(self._render(), refresh=True)

    def _say(self, message: str) -> None:
        if self.live is not None:
            self.live.console.print(message, highlight=False)
        else:
            self.console.print(f"[{self._counts()}] {message}", highlight=False, soft_wrap=True)

    def started_run(self, active: ActiveRun) -> None:
        self.running[active.run.name] = active
        verb = "resuming" if active.resumed else "starting"
        where = f" on GPU {active.gpu}" if active.gpu is not None else ""
        self._say(f"{verb} {active.run.name}{where}")
        self.refresh()

    def ended_run(self, active: ActiveRun, status: int) -> None:
        del self.running[active.run.name]
        seconds = _clock(time.monotonic() - active.started)
        if status == 0:
            self.done += 1
            row = _last_row(self.plan.run_dir(active.run))
            acc, nc0 = row.get("train_acc"), row.get("nc0")
            detail = ", ".join(
                part
                for part in (
                    None if acc is None else f"train acc {100 * acc:.1f}%",
                    None if nc0 is None else f"nc0 {nc0:.4g}",
                )
                if part
            )
            self._say(
                f"finished {active.run.name} in {seconds}" + (f" ({detail})" if detail else "")
            )
        else:
            self.failed += 1
            log = self.plan.run_dir(active.run) / "nclaunch.log"
            self._say(
                f"[red]failed[/red] {active.run.name} (exit {status}) after {seconds}; see {log}"
            )
        self.refresh()


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


@contextlib.contextmanager
def sweep_lock(out_dir: Path) -> Iterator[None]:
    """One sweep invocation per directory at a time."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with (out_dir / ".sweep.lock").open("w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"another nclaunch sweep is running in {out_dir}") from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _write_plan(plan: SweepPlan) -> None:
    document = {
        "grid_file": str(plan.grid_path),
        "grid": yaml.safe_load(plan.grid_path.read_text()),
        "axes": plan.axis_paths,
        "runs": [{"name": run.name, "settings": _tree(run.settings)} for run in plan.runs],
    }
    write_atomic(plan.out_dir / "sweep.yaml", yaml.safe_dump(document, sort_keys=False))


def _start(
    plan: SweepPlan, run: PlannedRun, target: str | None, resume: bool, gpu: str | None
) -> ActiveRun:
    run_dir = plan.run_dir(run)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(
        run_dir / "sweep-settings.yaml", yaml.safe_dump(_tree(run.settings), sort_keys=False)
    )
    command = nclaunch_command(plan, run, target=target, resume=resume)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "120"}
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    log = (run_dir / "nclaunch.log").open("ab")
    log.write(f"\n$ {shlex.join(command)}\n".encode())
    log.flush()
    # Its own session: an interrupt reaches the run's whole process group (agent and
    # workers) through us, in order, rather than through the terminal at once.
    process = subprocess.Popen(
        command,
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env=env,
        start_new_session=True,
    )
    return ActiveRun(run, process, log, time.monotonic(), gpu, resume)


def _stop_all(active: list[ActiveRun], grace_s: float = 30.0) -> None:
    for item in active:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(item.process.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for item in active:
        try:
            item.process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(item.process.pid, signal.SIGKILL)
            item.process.wait()
        item.log.close()


def run_sweep(
    plan: SweepPlan,
    *,
    parallel: int,
    gpus: list[str] | None = None,
    console: Console | None = None,
) -> SweepOutcome:
    """Run every run of ``plan`` that is not done, ``parallel`` at a time."""
    console = console or Console()
    outcome = SweepOutcome()
    todo: list[tuple[PlannedRun, bool]] = []
    for run in plan.runs:
        state = run_state(plan, run)
        if state != NEW:
            check_same_settings(plan, run)
        if state == DONE:
            outcome.done.append(run.name)
        else:
            todo.append((run, state == UNFINISHED))
    resumed = sum(1 for _, resume in todo if resume)
    console.print(
        f"[bold]nclaunch sweep[/bold] {plan.grid_path} -> {plan.out_dir}: {len(plan.runs)} "
        f"run(s); {len(outcome.done)} done, {resumed} to resume, {len(todo) - resumed} new",
        highlight=False,
        soft_wrap=True,
    )
    _write_plan(plan)
    if not todo:
        return outcome
    service: EmbeddedService | None = None
    target: str | None = None
    if plan.needs_service:
        service = EmbeddedService(
            plan.out_dir / "service",
            max_runs=max(1000, len(plan.runs) + 16),
            name="the sweep's ncserve service",
        )
        try:
            target = service.start()
        except LaunchError as exc:
            raise UserError(str(exc)) from None
        console.print(
            f"[dim]sweep service ncserve on {target} (database {service.db_path})[/dim]",
            highlight=False,
            soft_wrap=True,
        )
    free_gpus = list(gpus or [])
    active: list[ActiveRun] = []
    previous = signal.getsignal(signal.SIGTERM)

    def _terminate(_signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _terminate)
    try:
        with SweepProgress(plan, console, len(plan.runs), len(outcome.done)) as progress:
            pending = list(todo)
            while pending or active:
                while pending and len(active) < parallel:
                    run, resume = pending.pop(0)
                    gpu = free_gpus.pop(0) if gpus else None
                    item = _start(plan, run, target, resume, gpu)
                    active.append(item)
                    progress.started_run(item)
                time.sleep(_POLL_S)
                for item in list(active):
                    status = item.process.poll()
                    if status is None:
                        continue
                    active.remove(item)
                    item.log.close()
                    if item.gpu is not None:
                        free_gpus.append(item.gpu)
                    if status == 0:
                        outcome.finished.append(item.run.name)
                    else:
                        outcome.failed.append((item.run.name, status))
                    progress.ended_run(item, status)
                progress.refresh()
    except KeyboardInterrupt:
        _stop_all(active)
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
        if service is not None:
            service.stop()
    return outcome


def _parse_set(values: tuple[str, ...]) -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    for item in values:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise UserError(f"--set: expected KEY=VALUE, got {item!r}")
        path = setting_path(key.strip(), "--set")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        overrides[path] = _coerce(path, value)
    return overrides


def _parse_gpus(value: str | None) -> list[str] | None:
    if value is None:
        return None
    ids = [part.strip() for part in value.split(",") if part.strip()]
    if not ids or not all(part.isdigit() for part in ids):
        raise UserError(
            f"--gpus: expected comma-separated GPU indices such as 0,1,2,3; got {value!r}"
        )
    return ids


@click.command("sweep")
@click.argument(
    "grid", type=click.Path(path_type=Path, dir_okay=False, exists=True), metavar="GRID.yaml"
)
@click.option(
    "--out",
    "out_dir",
    required=True,
    type=click.Path(path_type=Path, file_okay=False),
    help="Sweep directory: one run directory per combination, the service database "
    "and sweep.yaml. Re-running with the same --out skips finished runs and resumes "
    "unfinished ones.",
)
@click.option(
    "--parallel",
    type=click.IntRange(min=1),
    default=None,
    help="Runs at a time.  [default: the number of --gpus, else 1]",
)
@click.option(
    "--gpus",
    default=None,
    metavar="LIST",
    help="Comma-separated CUDA device indices; each concurrent run gets one of them "
    "as CUDA_VISIBLE_DEVICES.",
)
@click.option(
    "--set",
    "sets",
    multiple=True,
    metavar="KEY=VALUE",
    help="Set a value for every run, over the grid's base and axes (an axis set this way "
    "has that one value), e.g. --set data-dir=/data --set dataset=cifar10 (repeatable; "
    "VALUE is read as YAML).",
)
@click.option(
    "--dry-run",
    is_flag=True,
    help="Print the runs and their state (new, unfinished, done) and run nothing.",
)
def sweep_command(
    grid: Path,
    out_dir: Path,
    parallel: int | None,
    gpus: str | None,
    sets: tuple[str, ...],
    dry_run: bool,
) -> None:
    """Run the cartesian product of GRID.yaml's axes over its base settings.

    Any nclaunch option can be an axis. Every run reports to one ncserve service (started
    for the sweep, database in OUT/service, unless the grid sets sidecar) and lives in
    OUT/<name>, named after its values. A rerun skips finished runs and resumes the others.
    Compare the results with: ncserve report OUT --out report.html

    \b
    Example:  nclaunch sweep examples/cpu_grid.yaml --out sweeps/cpu --parallel 2
    """
    gpu_ids = _parse_gpus(gpus)
    if parallel is None:
        parallel = len(gpu_ids) if gpu_ids else 1
    if gpu_ids is not None and parallel > len(gpu_ids):
        raise UserError(
            f"--parallel {parallel}: more concurrent runs than --gpus "
            f"({len(gpu_ids)}); each run needs its own GPU"
        )
    plan = plan_sweep(grid, out_dir, _parse_set(sets))
    console = Console()
    if dry_run:
        console.print(f"{len(plan.runs)} run(s) in {out_dir}", highlight=False, soft_wrap=True)
        table = Table()
        table.add_column("run")
        table.add_column("state")
        for run in plan.runs:
            table.add_row(run.name, run_state(plan, run))
        console.print(table)
        return
    with sweep_lock(out_dir):
        try:
            outcome = run_sweep(plan, parallel=parallel, gpus=gpu_ids, console=console)
        except KeyboardInterrupt:
            console.print(f"interrupted; rerun the same command to resume the sweep in {out_dir}")
            raise click.exceptions.Exit(130) from None
    total = len(plan.runs)
    finished = len(outcome.done) + len(outcome.finished)
    console.print(
        f"{finished}/{total} run(s) done ({len(outcome.finished)} now, {len(outcome.done)} "
        f"before)"
        + (f", {len(outcome.failed)} failed" if outcome.failed else "")
        + f"; compare them: ncserve report {out_dir} --out {out_dir}/report.html",
        highlight=False,
        soft_wrap=True,
    )
    if outcome.failed:
        for name, status in outcome.failed:
            console.print(
                f"  failed: {name} (exit {status}), log {out_dir / name / 'nclaunch.log'}",
                highlight=False,
                soft_wrap=True,
            )
        raise click.exceptions.Exit(1)
