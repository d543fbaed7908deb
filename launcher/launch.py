"""Start a run: run directory, embedded service, torch elastic launch, report.

The workers are started by torch's elastic agent (``elastic_launch`` with a
``LaunchConfig``), exactly as torchrun would start them, so restarts,
rendezvous and the environment every worker sees (RANK, LOCAL_RANK,
LOCAL_WORLD_SIZE, TORCHELASTIC_RESTART_COUNT, ...) are torch's.

Local mode (no rendezvous endpoint, no master address, or ``--standalone``):
``--nodes`` x ``--nproc-per-node`` workers run on this machine as one node of
an elastic launch with a c10d rendezvous on 127.0.0.1 and an OS-chosen port.
Otherwise this process is the agent of one node of a multi-machine job and
meets the others at the given rendezvous.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, Std
from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.elastic.rendezvous.api import RendezvousError
from torch.distributed.launcher.api import LaunchConfig as ElasticLaunchConfig
from torch.distributed.launcher.api import elastic_launch

from launcher import STARTED
from launcher.config import RunConfig, parse_nnodes
from launcher.report import make_console, summary_table, write_report
from launcher.rundir import RunDir
from launcher.trainer import Runtime, run_worker
from ncserve.protocol import RUN_FAILED

log = logging.getLogger("nclaunch")


class LaunchError(RuntimeError):
    """The run could not be started or did not finish; the message says why and where to look."""


class EmbeddedService:
    """``ncserve serve`` as a child process on 127.0.0.1, its database in ``directory``.

    One run's embedded service, or a sweep's shared one (``max_runs`` raised to hold every
    run of the sweep); ``name`` is how errors refer to it.
    """

    def __init__(
        self,
        directory: Path,
        *,
        max_runs: int | None = None,
        startup_timeout_s: float = 60.0,
        name: str = "the embedded ncserve service",
    ) -> None:
        self.directory = directory
        self.max_runs = max_runs
        self.name = name
        self.startup_timeout_s = startup_timeout_s
        self.process: subprocess.Popen[bytes] | None = None
        self.target: str | None = None

    @property
    def db_path(self) -> Path:
        return self.directory / "ncserve.db"

    @property
    def log_path(self) -> Path:
        return self.directory / "serve.log"

    def start(self) -> str:
        self.directory.mkdir(parents=True, exist_ok=True)
        port_file = self.directory / "port"
        port_file.unlink(missing_ok=True)
        command = [
            sys.executable,
            "-m",
            "ncserve",
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--port-file",
            str(port_file),
            "--db",
            str(self.db_path),
            "--log-level",
            "warning",
        ]
        if self.max_runs is not None:
            command += ["--max-runs", str(self.max_runs)]
        with self.log_path.open("ab") as log_stream:
            self.process = subprocess.Popen(
                command, stdout=log_stream, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if port_file.is_file() and port_file.read_text().strip():
                self.target = f"127.0.0.1:{int(port_file.read_text().strip())}"
                return self.target
            if self.process.poll() is not None:
                raise LaunchError(
                    f"{self.name} exited with status {self.process.returncode}; see {self.log_path}"
                )
            time.sleep(0.05)
        self.stop()
        raise LaunchError(
            f"{self.name} did not start within {self.startup_timeout_s:.0f} s; see {self.log_path}"
        )

    def stop(self, grace_s: float = 15.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        # SIGTERM lets it drain in-flight calls and close the database cleanly.
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@dataclass(frozen=True)
class LaunchPlan:
    """What this node's agent does, derived from the launch options."""

    elastic: ElasticLaunchConfig
    local_mode: bool
    world_size: int | None  # known up front in local mode only


def plan_launch(config: RunConfig, run_dir: RunDir) -> LaunchPlan:
    """The torch elastic LaunchConfig for this run (torchrun's semantics for each option)."""
    launch = config.launch
    nproc = int(launch.nproc_per_node)
    # Ranks other than 0 write into files under the run directory; rank 0 keeps the terminal
    # for the progress bar.
    local_workers = config.world_size_local if launch.local_mode else nproc
    logs_specs = DefaultLogsSpecs(
        log_dir=str(run_dir.logs_dir / "elastic"),
        redirects={i: Std.ALL for i in range(1, local_workers)},
    )
    common: dict[str, Any] = {
        "run_id": launch.rdzv_id,
        "max_restarts": launch.max_restarts,
        "start_method": "spawn",
        "logs_specs": logs_specs,
        "monitor_interval": 0.1,
    }
    if launch.local_mode:
        elastic = ElasticLaunchConfig(
            min_nodes=1,
            max_nodes=1,
            nproc_per_node=local_workers,
            rdzv_backend="c10d",
            # Port 0: the agent's TCP store binds a free port itself (no pick-then-bind race).
            rdzv_endpoint="127.0.0.1:0",
            rdzv_configs={"is_host": True},
            local_addr="127.0.0.1",
            **common,
        )
        return LaunchPlan(elastic, True, local_workers)
    min_nodes, max_nodes = parse_nnodes(launch.nnodes)
    rdzv_configs: dict[str, Any] = {}
    backend, endpoint = launch.rdzv_backend, launch.rdzv_endpoint
    if not endpoint:
        # torchrun: without an endpoint, node 0's MASTER_ADDR:MASTER_PORT is the meeting point
        # and the rendezvous is static (each node knows its rank).
        backend, endpoint = "static", f"{launch.master_addr}:{launch.master_port}"
    if backend == "static":
        rdzv_configs["rank"] = launch.node_rank
    elastic = ElasticLaunchConfig(
        min_nodes=min_nodes,
        max_nodes=max_nodes,
        nproc_per_node=nproc,
        rdzv_backend=backend,
        rdzv_endpoint=endpoint,
        rdzv_configs=rdzv_configs,
        **common,
    )
    return LaunchPlan(elastic, False, None)


def run(config: RunConfig, console: Console | None = None) -> int:
    """Run training to the end; returns the process exit status."""
    console = console or make_console()
    assert config.run_dir is not None
    run_dir = RunDir(config.run_dir)
    run_dir.create(config)
    plan = plan_launch(config, run_dir)
    if config.launch.device == "cpu" and plan.elastic.nproc_per_node > 1:
        # Inherited by the workers: OpenMP pools sized for the whole machine in each of
        # several workers would oversubscribe the cores.
        os.environ.setdefault("OMP_NUM_THREADS", "1")
    if config.engine.name == "deepspeed":
        os.environ["DS_ACCELERATOR"] = "cuda" if config.launch.device == "cuda" else "cpu"

    service: EmbeddedService | None = None
    target = config.tracking.sidecar
    if config.tracking.enabled and target is None:
        service = EmbeddedService(run_dir.service_dir)
        target = service.start()
        console.print(f"[dim]embedded ncserve on {target} (database {service.db_path})[/dim]")
    runtime = Runtime(service_target=target)
    console.print(
        f"[bold]nclaunch[/bold] run [cyan]{config.run_id}[/cyan]: "
        f"{_describe(config, plan)}; run directory {run_dir.root}",
        highlight=False,
    )
    try:
        elastic_launch(plan.elastic, run_worker)(config.model_dump_json(), runtime.to_json())
    except ChildFailedError as err:
        rank, failure = err.get_first_failure()
        message = failure.message
        if isinstance(message, dict):
            message = message.get("message", "")
        reason = str(message).strip().splitlines()[-1] if message else "no message"
        console.print(
            f"[red]training failed[/red]: rank {rank} exited with status {failure.exitcode} "
            f"({escape(reason)}); logs in {escape(str(run_dir.logs_dir))}",
            highlight=False,
        )
        _end_run(config, target, f"rank {rank} exited with status {failure.exitcode}: {reason}")
        return 1
    except (KeyboardInterrupt, SignalException) as err:
        _end_run(config, target, f"interrupted ({err or 'Ctrl-C'}); resume with nclaunch --resume")
        console.print(
            f"[yellow]interrupted[/yellow] ({escape(str(err) or 'Ctrl-C')}); continue with: "
            f"nclaunch --resume --run-dir {escape(str(run_dir.root))}",
            highlight=False,
        )
        return 130
    except RendezvousError as err:
        raise LaunchError(
            f"the workers could not meet at the rendezvous ({type(err).__name__}: {err}); "
            f"check --rdzv-endpoint / --master-addr and that every node was started"
        ) from err
    finally:
        if service is not None:
            service.stop()
    elapsed = time.monotonic() - STARTED  # what the user waited, start-up included
    rows = run_dir.read_metrics()
    if rows:
        write_report(rows, run_dir.report_path, title=config.run_id)
        console.print(summary_table(rows, run_dir.root))
        console.print(
            f"finished in {elapsed:.1f} s; metrics {run_dir.metrics_path}, "
            f"report {run_dir.report_path}",
            highlight=False,
        )
        if service is not None:
            # The embedded service is gone with the run; its store stays readable.
            console.print(
                f"query it: ncserve query {config.run_id} --db {service.db_path} --all",
                highlight=False,
                soft_wrap=True,
            )
    else:
        # A node other than the one hosting rank 0: the measurements are written there.
        console.print(f"finished in {elapsed:.1f} s (no measurements on this node)")
    return 0


def _end_run(config: RunConfig, target: str | None, reason: str) -> None:
    """Mark the run failed in its service (rank 0 does too when it can; both are idempotent).
    A resumed run registers again and is running once more. When the service cannot be
    reached the run ends as abandoned after the service's timeout instead."""
    if target is None:
        return
    from ncserve.client import NCClient

    token, tls = config.tracking.credentials()
    try:
        client = NCClient(
            target,
            token=token,
            tls=tls,
            deadline_s=min(config.tracking.deadline_s, 5.0),
            replay_in_background=False,
        )
    except (OSError, ValueError) as err:
        log.warning("could not mark run %s failed: %s", config.run_id, err)
        return
    with client:
        if not client.finish_run(config.run_id, RUN_FAILED, reason):
            report = client.flush(timeout_s=config.tracking.deadline_s)
            if not report.complete:
                log.warning("could not mark run %s failed: %s", config.run_id, report.summary())


def _describe(config: RunConfig, plan: LaunchPlan) -> str:
    launch = config.launch
    if plan.local_mode:
        where = (
            f"{parse_nnodes(launch.nnodes)[1]} node(s) x {launch.nproc_per_node} "
            f"= {plan.world_size} local workers"
        )
    else:
        where = (
            f"node of {launch.nnodes} x {launch.nproc_per_node} workers, rendezvous "
            f"{plan.elastic.rdzv_backend} at {plan.elastic.rdzv_endpoint}"
        )
    engine: str = config.engine.name
    if engine == "deepspeed":
        engine = f"deepspeed ZeRO-{config.engine.zero_stage}"
    return (
        f"{where} on {launch.device}, {engine}, {config.optim.name} lr {config.optim.lr:g} "
        f"wd {config.optim.weight_decay:g}, {config.model.name} on {config.data.dataset}, "
        f"{config.train.epochs} epoch{'s' if config.train.epochs != 1 else ''}"
    )
