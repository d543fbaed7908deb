"""The ``nclaunch`` command line.

Every training option maps to one field of ``RunConfig``; its default, shown by
``--help``, is that field's default. Launch options are torchrun's and are also
read from the ``PET_*`` environment variables torchrun reads, so the same
command line runs under Kubeflow's PyTorchJob/TrainJob or an Indexed Job.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource
from pydantic import ValidationError

from launcher.config import FILE_PATH, RunConfig
from launcher.options import FLAG_BY_PATH, FLAGS, add_flags, preflight
from launcher.resolve import describe_validation_error, load_yaml, merge, resolve, to_yaml
from launcher.sweep.command import sweep_command
from ncserve.errors import UserError
from ncserve.report.settings import assign


def build_config(ctx: click.Context, config_file: Path | None, values: dict[str, Any]) -> RunConfig:
    """Defaults < --config file < PET_* environment < flags, validated and resolved."""
    from_file = load_yaml(config_file) if config_file is not None else {}
    from_env: dict[str, Any] = {}
    from_flags: dict[str, Any] = {}
    for flag in FLAGS:
        source = ctx.get_parameter_source(flag.name)
        value = values[flag.name]
        if source is ParameterSource.ENVIRONMENT:
            assign(from_env, flag.path, value)
        elif source is ParameterSource.COMMANDLINE:
            assign(from_flags, flag.path, value)
    layered = merge(merge(from_file, from_env), from_flags)
    base: dict[str, Any] = {}
    if layered.get("resume"):
        base = _resumed_config(layered)
    try:
        config = RunConfig.model_validate(merge(base, layered))
    except ValidationError as err:
        raise UserError(describe_validation_error(err, FLAG_BY_PATH)) from None
    import torch

    try:
        return resolve(config, cuda_available=torch.cuda.is_available())
    except ValueError as err:
        raise UserError(str(err)) from None


def _resumed_config(layered: dict[str, Any]) -> dict[str, Any]:
    """The saved config.yaml of the run to resume, as the base layer."""
    run_dir = layered.get("run_dir")
    if run_dir is None and layered.get("run_id"):
        run_dir = Path("runs") / layered["run_id"]
    if run_dir is None:
        raise UserError("--resume needs the run to continue: give --run-dir or --run-id")
    saved = Path(run_dir) / "config.yaml"
    if not saved.is_file():
        raise UserError(f"--resume: {saved} not found; is {run_dir} an nclaunch run directory?")
    try:
        return load_yaml(saved)
    except ValueError as err:
        raise UserError(str(err)) from None


class OneLineErrorGroup(click.Group):
    """A click group whose usage errors are one line (``Error: ...``), exit status 2.

    Click would print the usage synopsis and a help hint above the message; a mistyped
    value deserves the same single line as any other invalid configuration.
    """

    def main(  # type: ignore[override]
        self,
        args: list[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        try:
            result = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.ClickException as err:
            click.echo(f"Error: {err.format_message()}", err=True)
            sys.exit(err.exit_code)
        except click.Abort:
            click.echo("Aborted!", err=True)
            sys.exit(1)
        if standalone_mode:
            sys.exit(result if isinstance(result, int) else 0)
        return result


@click.group(
    cls=OneLineErrorGroup,
    invoke_without_command=True,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@click.option(
    "--config",
    "config_file",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="YAML file with any of the settings (sections launch, model, data, optim, engine, "
    "train, tracking; as --print-config shows); flags override it.",
)
@click.option(
    "--print-config", is_flag=True, help="Print the resolved configuration as YAML and exit."
)
@click.pass_context
def main_group(
    ctx: click.Context, config_file: Path | None, print_config: bool, **values: Any
) -> None:
    """Train with live Neural Collapse tracking: nclaunch [OPTIONS].

    Starts --nodes x --nproc-per-node workers with torch's elastic launcher (DDP or
    DeepSpeed), measures NC0-NC4 every --measure-every epochs through the ncserve service
    (an embedded one unless --sidecar is given) and leaves config.yaml, metrics.jsonl,
    checkpoints, logs and report.png in the run directory.

    \b
    Example:  nclaunch --nodes 4 --optimizer adamw
    """
    if ctx.invoked_subcommand is not None:
        return
    if config_file is not None and not config_file.is_file():
        raise UserError(f"--config: no such file {str(config_file)!r}")
    try:
        config = build_config(ctx, config_file, values)
    except ValueError as err:
        raise UserError(str(err)) from None
    if print_config:
        click.echo(to_yaml(config), nl=False)
        return
    preflight(config)
    from launcher.launch import LaunchError, run
    from launcher.rundir import RunDirError

    try:
        status = run(config)
    except (RunDirError, LaunchError) as err:
        raise UserError(str(err)) from None
    ctx.exit(status)


main_group = add_flags(main_group)  # type: ignore[assignment]


@main_group.command("export-features")
@click.argument("run_dir", type=click.Path(path_type=Path, file_okay=False, exists=True))
@click.option(
    "--checkpoint",
    default=None,
    help="Checkpoint directory, or its name under RUN_DIR/checkpoints.  [default: latest]",
)
@click.option(
    "--step",
    type=click.IntRange(min=0),
    default=None,
    help="A measured step: the weights kept for it (RUN_DIR/weights, --keep-measured-weights), "
    "or a checkpoint of that step. Step 0 is the initial weights.",
)
@click.option(
    "--split",
    type=click.Choice(["measurement", "holdout"]),
    default="measurement",
    show_default=True,
    help="measurement: the split the run measured NC on; holdout: the held-out split.",
)
@click.option(
    "--out",
    required=True,
    type=FILE_PATH,
    help="Output .npz (features, labels, weight, bias, "
    "num_classes), the format ncserve compute reads.",
)
def export_features_command(
    run_dir: Path, checkpoint: str | None, step: int | None, split: str, out: Path
) -> None:
    """Write a split's penultimate features, labels, W and b of a measured step or a
    checkpoint (default: the latest checkpoint, else the latest measured step)."""
    from launcher.checkpoint import CheckpointError
    from launcher.export import export_features

    if step is not None and checkpoint is not None:
        raise UserError("give --step or --checkpoint, not both")
    try:
        summary = export_features(run_dir, checkpoint, out, step=step, split=split)
    except (CheckpointError, ValueError, OSError) as err:
        raise UserError(str(err)) from None
    click.echo(
        f"wrote {out}: {summary['num_samples']} samples x {summary['feature_dim']} features, "
        f"{summary['num_classes']} classes, step {summary['step']} ({summary['split']} split, "
        f"weights from {summary['source']})"
    )


@main_group.command("report")
@click.argument("run_dir", type=click.Path(path_type=Path, file_okay=False, exists=True))
def report_command(run_dir: Path) -> None:
    """Redraw RUN_DIR/report.png from metrics.jsonl and print the summary table."""
    from rich.console import Console

    from launcher.report import summary_table, write_report
    from launcher.rundir import RunDir

    folder = RunDir(run_dir)
    rows = folder.read_metrics()
    if not rows:
        raise UserError(f"{folder.metrics_path}: no measurements")
    write_report(rows, folder.report_path)
    Console().print(summary_table(rows, folder.root))
    click.echo(f"wrote {folder.report_path}")


main_group.add_command(sweep_command)


def main() -> None:
    main_group(prog_name="nclaunch")
