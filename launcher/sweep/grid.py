"""The grid of ``nclaunch sweep``: its file, its points, their names and the sweep id.

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

Every combination is one point: an index (its place in the order below, the same for every
backend and for ``--list``), a name made of the values that vary across the sweep
(``sgd-lr0.01-wd0.0005``) and the settings passed to its nclaunch run.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from launcher.config import RunConfig
from launcher.options import FLAG_BY_PATH, FLAGS, preflight
from launcher.resolve import describe_validation_error, resolve
from ncserve.errors import UserError
from ncserve.protocol import RUN_ID_PATTERN, RUN_ID_RULE
from ncserve.report.settings import assign

GRID_KEYS: tuple[str, ...] = ("base", "axes", "groups")
# Settings the sweep decides for every run; a grid that sets them would break the layout.
_SWEEP_OWNED: dict[str, str] = {
    "run_id": "the sweep names each run after its values",
    "run_dir": "each run lives in --out/<name>",
    "resume": "the sweep resumes unfinished runs itself",
    "tracking.sweep_id": "the sweep gives every run its id (nclaunch sweep --sweep-id)",
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
SIDECAR_PATH = "tracking.sidecar"
# Settings the sweep fills in for each run and that therefore differ between attempts.
RUN_LOCAL = frozenset(
    {SIDECAR_PATH, "run_id", "run_dir", "resume", "launch.rdzv_id", "tracking.sweep_id"}
)


@dataclass(frozen=True)
class PlannedRun:
    """One point: its index, name, the settings passed to nclaunch and its resolved config."""

    index: int
    name: str
    settings: dict[str, Any]  # path -> value, as the grid gives them
    config: RunConfig  # resolved

    @property
    def epochs(self) -> int:
        return int(self.config.train.epochs)

    @property
    def service(self) -> str | None:
        """The external service HOST:PORT the run reports to (None: none named)."""
        tracking = self.config.tracking
        return tracking.sidecar if tracking.enabled else None


@dataclass(frozen=True)
class GridPoints:
    """The points of a grid file, in order, and the settings that vary among them."""

    grid_path: Path
    runs: list[PlannedRun]
    axis_paths: list[str]  # the settings that vary across the sweep, in name order


@dataclass(frozen=True)
class SweepPlan:
    grid_path: Path
    out_dir: Path
    runs: list[PlannedRun]
    axis_paths: list[str]
    sweep_id: str  # sent with every run (nclaunch --sweep-id); prefixes external run ids

    @property
    def needs_service(self) -> bool:
        """Some run reports to a service and names no external one: start the sweep's."""
        return any(
            run.config.tracking.enabled and run.config.tracking.sidecar is None for run in self.runs
        )

    def run_dir(self, run: PlannedRun) -> Path:
        return self.out_dir / run.name

    def run_id(self, run: PlannedRun) -> str:
        """The run's id at the service: its name, prefixed with the sweep id when the service
        is an external one that other sweeps may share."""
        if run.config.tracking.sidecar is None:
            return run.name
        run_id = f"{self.sweep_id}.{run.name}"
        if not RUN_ID_PATTERN.fullmatch(run_id):
            raise UserError(
                f"run id {run_id!r} (sweep id + point name) is not valid: {RUN_ID_RULE}; "
                "give a shorter --sweep-id"
            )
        return run_id

    def point(self, index: int) -> PlannedRun:
        """Point ``index`` (0-based)."""
        if not 0 <= index < len(self.runs):
            raise UserError(
                f"--point {index}: {self.grid_path} has {len(self.runs)} point(s), "
                f"0 to {len(self.runs) - 1}"
            )
        return self.runs[index]


def check_sweep_id(value: str, where: str = "--sweep-id") -> str:
    if not RUN_ID_PATTERN.fullmatch(value):
        raise UserError(f"{where}: {value!r} is not a valid sweep id: {RUN_ID_RULE}")
    return value


def default_sweep_id(out_dir: Path) -> str:
    """The sweep id when --sweep-id is not given: the name of the sweep directory, with
    characters a run id cannot hold replaced, so every machine that runs points of the sweep
    in a directory of that name derives the same id."""
    name = out_dir.resolve().name
    text = re.sub(r"[^A-Za-z0-9_.-]", "_", name)
    text = re.sub(r"\.{2,}", ".", text).lstrip("._-")[:100].rstrip(".")
    if not text:
        raise UserError(f"--out {str(out_dir)!r}: its name gives no sweep id; give --sweep-id")
    return check_sweep_id(text, f"--out {str(out_dir)!r}")


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


def settings_tree(flat: dict[str, Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for path, value in flat.items():
        assign(tree, path, value)
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


def plan_points(grid_path: Path, overrides: dict[str, Any] | None = None) -> GridPoints:
    """Every point of the grid, validated and named, in order; duplicates (same settings)
    once. ``overrides`` (path -> value) apply to every point; one that names an axis pins it."""
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
            config = RunConfig.model_validate(settings_tree(settings))
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
    for index, (settings, config) in enumerate(zip(combos, configs, strict=True)):
        # A setting left unset (None) in this run adds nothing to its name.
        parts = [_name_part(p, v) for p in axis_paths if (v := _value_at(config, p)) is not None]
        name = "-".join(parts) or "run"
        count = names.get(name, 0)
        names[name] = count + 1
        if count:
            name = f"{name}-{count + 1}"
        config.run_id = name
        runs.append(PlannedRun(index, name, settings, config))
    return GridPoints(grid_path=grid_path, runs=runs, axis_paths=axis_paths)


def preflight_run(grid_path: Path, run: PlannedRun) -> None:
    """nclaunch's checks of one run that need the filesystem or torch (data directory, ...)."""
    try:
        preflight(run.config)
    except UserError as err:
        raise UserError(f"{grid_path}: run {run.name}: {err.message}") from None


def plan_sweep(
    grid_path: Path,
    out_dir: Path,
    overrides: dict[str, Any] | None = None,
    *,
    sweep_id: str | None = None,
    preflight_all: bool = True,
) -> SweepPlan:
    """The points of the grid placed in ``out_dir`` (one run directory each), with the
    sweep id (``--sweep-id``, else derived from ``out_dir``'s name). ``preflight_all``:
    check every run now (a backend that runs them all); a single point checks its own."""
    points = plan_points(grid_path, overrides)
    for run in points.runs:
        run.config.run_dir = out_dir / run.name
        if preflight_all:
            preflight_run(grid_path, run)
    return SweepPlan(
        grid_path=grid_path,
        out_dir=out_dir,
        runs=points.runs,
        axis_paths=points.axis_paths,
        sweep_id=check_sweep_id(sweep_id) if sweep_id is not None else default_sweep_id(out_dir),
    )


def _describe(settings: dict[str, Any]) -> str:
    return ", ".join(f"{p}={v}" for p, v in settings.items())


def parse_sets(values: tuple[str, ...]) -> dict[str, Any]:
    """``--set KEY=VALUE`` options as path -> value (VALUE read as YAML)."""
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
