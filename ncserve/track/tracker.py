"""Track Neural Collapse from any torch training loop, single-process or distributed.

Legend: N samples on this rank, K classes, P feature dim; ``h_NP`` penultimate features
(the input of the classifier ``nn.Linear``), ``w_KP`` / ``b_K`` its weight and bias.

One measurement = one pass of the model over the measurement loader in eval mode with a
forward hook on the classifier, then the two rounds with the ncserve service: round 1
(counts, class sums) -> global class means -> round 2 (projected scatter, NCC counts). The
service finalizes the metrics. Training never waits on the service for longer than
``deadline_s`` per call: when it is unreachable, the ranks compute the global means among
themselves (all_gather of the round-1 statistics, merged in rank order), finish the
measurement locally, and the client keeps both rounds buffered for replay, so the service
ends up with every measurement.

By default the ranks of a node first sum their statistics (nodes.py) and one rank per node
talks to the service; the rounds themselves are in rounds.py, the model side in capture.py.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch.distributed as dist
from torch import nn

from ncserve.client import DeliveryReport, NCClient, TLSConfig
from ncserve.metrics import (
    METRIC_KEYS,
    Round1Stats,
    Round2Stats,
    finalize,
    nc0_from_weight,
)
from ncserve.protocol import RUN_FAILED, RUN_FINISHED, RUN_ID_PATTERN, RUN_ID_RULE
from ncserve.track.capture import TrackerError, find_classifier, is_distributed
from ncserve.track.nodes import NodeGroup
from ncserve.track.rounds import (
    HOLDOUT_KEYS,
    Capture,
    Finisher,
    Outcome,
    ServiceRounds,
)
from ncserve.track.sinks import CSVSink, TensorBoardSink, require_tensorboard

log = logging.getLogger(__name__)


class Tracker(ServiceRounds):
    """Measure NC0-NC4 of ``model`` through the ncserve service.

    Args:
        model: the network; its forward on a batch's inputs must run the classifier.
        classifier: the final ``nn.Linear`` (default: the last one found in ``model``).
        num_classes: K (default: ``classifier.out_features``).
        target: ``HOST:PORT`` of an ncserve service; None starts an embedded one on rank 0
            (its database in ``run_dir``) and stops it in ``close()``.
        run_id, metadata: the run's id and free-form metadata (optimizer, lr, ...).
        run_dir: where the client spools undelivered pushes (``spool/rank<R>``) and the
            embedded service keeps its database.
        token, tls: credentials for the service.
        deadline_s: the longest any call to the service may hold up training.
        max_buffer_bytes: undelivered pushes this rank keeps while the service is
            unreachable (in memory, then spilled to ``run_dir``); past it the client drops
            and reports them by (step, rank, round).
        rank, world_size: default from torch.distributed (0 and 1 when not initialised).
        csv: also append every measurement (step, epoch, scalars, metrics) to this CSV file.
        tensorboard: also write TensorBoard event files to this folder: each measurement
            (``nc/*``, ``train/*``) and each ``record_nc0`` (``step/*``); needs the
            ``ncserve[tensorboard]`` extra. Both exporters are written by rank 0.
        background: default of ``measure(background=...)``: when True, a measurement holds
            the training loop only for its forward pass; the statistics and the exchange
            with the service run in a background thread while training goes on, and the
            result comes from ``settle()`` (called by the next measurement and by close()).
        heartbeat_s: rank 0 tells the service the run is alive this often, so a run whose
            epochs are longer than the service's abandon timeout is not taken for abandoned.
        shard_per_rank: every rank pushes its own shard. By default (False) the ranks of a
            node sum their statistics in float64 with a collective on the training device
            and the node's lowest rank pushes the node's shard: the service sees one shard
            per node (world size = nodes), with the same metrics (ncserve.track.nodes).
        node: what names this rank's node (default: torch elastic's ``GROUP_RANK``, else the
            host name); ranks with the same ``node`` form one node.
        two_pass: keep no features: each measurement forwards the split twice, chunk by
            chunk (class sums, then round 2 around the global means), for splits too large
            to hold, such as the token-level features of a language model. Measurements then
            run in the foreground.

    Use it as a context manager, or call ``close()`` at the end of training.
    """

    def __init__(
        self,
        model: nn.Module,
        classifier: nn.Linear | None = None,
        num_classes: int | None = None,
        target: str | None = None,
        run_id: str = "run",
        metadata: Mapping[str, str] | None = None,
        run_dir: str | Path | None = None,
        token: str | None = None,
        tls: TLSConfig | None = None,
        deadline_s: float = 5.0,
        max_buffer_bytes: int = 256 << 20,
        rank: int | None = None,
        world_size: int | None = None,
        csv: str | Path | None = None,
        tensorboard: str | Path | None = None,
        background: bool = False,
        heartbeat_s: float = 60.0,
        shard_per_rank: bool = False,
        node: str | None = None,
        two_pass: bool = False,
    ) -> None:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            # Its forward may broadcast buffers (a collective); measuring needs no gradients.
            model = model.module
        self.model = model
        self.classifier = classifier if classifier is not None else find_classifier(model)
        if not isinstance(self.classifier, nn.Linear):
            raise TrackerError(
                f"classifier must be an nn.Linear, got {type(self.classifier).__name__}"
            )
        self.num_classes = int(num_classes or self.classifier.out_features)
        if self.num_classes != self.classifier.out_features:
            raise TrackerError(
                f"num_classes={self.num_classes} but the classifier has "
                f"{self.classifier.out_features} outputs"
            )
        self.feature_dim = int(self.classifier.in_features)
        if not RUN_ID_PATTERN.fullmatch(run_id):
            raise TrackerError(f"run_id={run_id[:80]!r} is not valid: {RUN_ID_RULE}")
        self.run_id = run_id
        self.rank = int(rank if rank is not None else (dist.get_rank() if is_distributed() else 0))
        self.world_size = int(
            world_size
            if world_size is not None
            else (dist.get_world_size() if is_distributed() else 1)
        )
        self.deadline_s = float(deadline_s)
        self.run_dir = Path(run_dir) if run_dir is not None else Path("runs") / run_id
        self.csv: CSVSink | None = None
        self.tensorboard: TensorBoardSink | None = None
        if tensorboard is not None:
            # Checked on every rank, so a missing package fails all ranks alike before any
            # collective, not rank 0 alone while the others wait for it.
            require_tensorboard(tensorboard)
            if self.rank == 0:
                self.tensorboard = TensorBoardSink(tensorboard)
        if csv is not None and self.rank == 0:
            self.csv = CSVSink(csv)
        self._server: Any = None
        if target is None:
            target = self._start_embedded_service(token)
        self.target = target
        self.nodes: NodeGroup | None = None
        if not shard_per_rank and is_distributed() and self.world_size > 1:
            group = NodeGroup.create(self.rank, self.world_size, node)
            if not group.layout.trivial:
                self.nodes = group
        # The shard this rank's pushes stand for, and whether it pushes at all.
        self.shard_rank = self.nodes.index if self.nodes is not None else self.rank
        self.shard_count = (
            len(self.nodes.layout.nodes) if self.nodes is not None else self.world_size
        )
        self._pushes = self.nodes is None or self.nodes.is_leader
        self.two_pass = bool(two_pass)
        # Round 1 of shard 0 is the largest push: counts, class sums and W (float64).
        largest_push = 8 * self.num_classes * (2 * self.feature_dim + 1)
        if self._pushes and max_buffer_bytes < largest_push:
            log.warning(
                "max_buffer_bytes=%d cannot hold one round-1 push of K=%d x P=%d (%d bytes): "
                "while the service is unreachable those measurements are dropped, not spooled; "
                "raise max_buffer_bytes (nclaunch --buffer-mb)",
                max_buffer_bytes,
                self.num_classes,
                self.feature_dim,
                largest_push,
            )
        self.client = NCClient(
            target,
            token=token,
            tls=tls,
            deadline_s=self.deadline_s,
            spill_dir=self.run_dir / "spool" / f"rank{self.rank}",
            max_buffer_bytes=max_buffer_bytes,
        )
        self.client.register_run(
            run_id, self.num_classes, self.feature_dim, self.shard_count, dict(metadata or {})
        )
        self.local_fallbacks = 0
        self.background = bool(background)
        self.heartbeat_s = float(heartbeat_s)
        self._stop_heartbeat = threading.Event()
        if self.rank == 0:
            threading.Thread(
                target=self._heartbeat_loop, name="ncserve-heartbeat", daemon=True
            ).start()
        self._worker: ThreadPoolExecutor | None = None
        # A measurement in the background: its capture, the rounds running in the worker,
        # and what the training thread does with their outcome at settle (the node's
        # round 2, whose sums are collectives) or None.
        self._pending: tuple[Capture, Future[Outcome], Finisher | None] | None = None
        self._concluded: list[tuple[int, dict[str, float]]] = []

    # -- the embedded service ---------------------------------------------------------------

    def _start_embedded_service(self, token: str | None) -> str:
        address = None
        if self.rank == 0:
            from ncserve.service import ServerConfig, start_server

            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._server = start_server(
                ServerConfig(
                    listen="127.0.0.1:0",
                    db_path=self.run_dir / "ncserve.db",
                    token=token,
                )
            )
            address = self._server.address
            log.info("embedded ncserve service on %s", address)
        if self.world_size > 1 and is_distributed():
            box = [address]
            dist.broadcast_object_list(box, src=0)
            address = box[0]
        assert address is not None
        return str(address)

    # -- reading the model ------------------------------------------------------------------

    def measure(
        self,
        loader: Iterable[Any],
        step: int,
        epoch: int | None = None,
        holdout_loader: Iterable[Any] | None = None,
        scalars: Mapping[str, float] | None = None,
        background: bool | None = None,
    ) -> dict[str, float] | None:
        """Measure at ``step`` on every rank (a collective). Rank 0 gets the metrics dict.

        Each rank passes its own shard of the measurement split. ``scalars`` (train loss,
        accuracy, lr, ...) are stored with the measurement.

        ``background`` (default: the tracker's): return right after the forward pass over
        ``loader`` and do the rest while training goes on; the metrics then come from
        ``settle()``, and this returns None. A measurement still in the background is
        settled first (every rank must use the same mode in the same order).
        """
        self._settle_pending()
        if self.two_pass:
            return self._measure_two_pass(loader, step, epoch, holdout_loader, scalars)
        capture = self._capture(loader, step, epoch, holdout_loader, scalars)
        in_background = self.background if background is None else background
        if self.nodes is None:
            if not in_background:
                return self._conclude(capture, self._service_rounds(capture))
            self._pending = (capture, self._submit(self._service_rounds, capture), None)
            return None
        # One shard per node: the node's sums are collectives, so they run here, in the
        # training thread; the leader's wait for the service's means runs in the background.
        out = self._round1_outcome(capture)
        if not in_background:
            return self._conclude(
                capture, self._node_round2(capture, self._node_exchange(capture, out))
            )
        self._pending = (
            capture,
            self._submit(self._node_exchange, capture, out),
            self._node_round2,
        )
        return None

    def _submit(self, work: Callable[..., Outcome], *args: Any) -> Future[Outcome]:
        if self._worker is None:
            self._worker = ThreadPoolExecutor(1, thread_name_prefix="ncserve-track")
        return self._worker.submit(work, *args)

    def settle(self) -> list[tuple[int, dict[str, float]]]:
        """Finish a measurement running in the background (a collective: call on every rank).

        Returns the (step, metrics) of every measurement concluded since the last call, on
        rank 0 (an empty list elsewhere). Waits at most about two ``deadline_s``; if the
        service did not answer by then, the ranks finish it among themselves as ``measure``
        does.
        """
        self._settle_pending()
        concluded, self._concluded = self._concluded, []
        return concluded

    def _settle_pending(self) -> None:
        if self._pending is None:
            return
        capture, future, finish = self._pending
        self._pending = None
        out = future.result()
        if finish is not None:
            out = finish(capture, out)
        metrics = self._conclude(capture, out)
        if metrics is not None:
            self._concluded.append((capture.step, metrics))

    def _measure_two_pass(
        self,
        loader: Iterable[Any],
        step: int,
        epoch: int | None,
        holdout_loader: Iterable[Any] | None,
        scalars: Mapping[str, float] | None,
    ) -> dict[str, float] | None:
        """A measurement that keeps no features: pass 1 over ``loader`` for the class sums,
        pass 2 (and the held-out split) around the global means. The ranks agree on the
        means before pass 2, since a forward may be a collective (FSDP, ZeRO-3)."""
        w_KP, b_K = self.classifier_arrays()
        c = Capture(step, epoch, dict(scalars or {}), None, None, w_KP, b_K, loader, holdout_loader)
        out = self._round1_outcome(c)
        self._exchange_round1(c, out)
        self._share_answer(out)
        not_stored, have_means = self._all_true_many(not out.stored, out.means is not None)
        if not_stored and not have_means:
            out.means = None  # every rank's pass 2 runs in the fallback, around merged means
        elif not_stored:
            self._finish_rounds(c, out)
        return self._conclude(c, out)

    def _conclude(self, c: Capture, out: Outcome) -> dict[str, float] | None:
        """Agree across ranks on how the rounds went and finish the measurement (rank 0
        returns the metrics): the service's, the stored ones of a step measured before a
        restart, or, when the service did not answer in time, computed among the ranks."""
        not_stored, have_means, have_metrics = self._all_true_many(
            not out.stored, out.means is not None, self.rank != 0 or out.metrics is not None
        )
        if not not_stored:
            return self._stored_metrics(c.step) if self.rank == 0 else None
        metrics = out.metrics
        if not (have_means and have_metrics):
            self.local_fallbacks += 1
            # Deterministic on every rank: the same shards merged in rank order, once.
            r1 = Round1Stats.zeros(self.num_classes, self.feature_dim)
            for shard in self._gather(out.r1):
                r1.merge_in_place(shard)
            if not have_means and out.r2 is None:
                self._round2(c, out, r1.class_means())
            r2_all = self._gather((out.r2, out.holdout))
            if self.rank == 0:
                metrics = self._finalize_locally(r1, r2_all, c.w_KP, c.b_K)
                log.warning(
                    "step %d: ncserve at %s did not answer in time; metrics computed on the "
                    "ranks, the service gets them when it is back",
                    c.step,
                    self.target,
                )
        if self.rank != 0:
            return None
        assert metrics is not None
        self._export_measurement(c.step, c.epoch, c.scalars, metrics)
        return metrics

    def _export_measurement(
        self, step: int, epoch: int | None, scalars: dict[str, float], metrics: dict[str, float]
    ) -> None:
        if self.csv is None and self.tensorboard is None:
            return
        row: dict[str, Any] = {"run_id": self.run_id, "step": step, "epoch": epoch}
        row |= scalars
        row["wall_time"] = time.time()
        row |= metrics
        if self.csv is not None:
            self.csv.write(row)
        if self.tensorboard is not None:
            self.tensorboard.write_measurement(
                row, (*METRIC_KEYS, *HOLDOUT_KEYS), scalar_keys=tuple(scalars)
            )

    def _stored_metrics(self, step: int) -> dict[str, float]:
        metrics = self._await_service_metrics(step)
        if metrics is None:
            raise TrackerError(
                f"step {step} of run {self.run_id!r} was refused as already measured, but the "
                "service holds no complete measurement of it"
            )
        log.info("step %d was already measured; using the stored measurement", step)
        return metrics

    def _finalize_locally(
        self,
        r1: Round1Stats,
        r2_all: list[tuple[Round2Stats, Round2Stats | None]],
        w_KP: np.ndarray,
        b_K: np.ndarray | None,
    ) -> dict[str, float]:
        """The metrics from the ranks' merged round 1 and their round-2 shards."""
        r2 = Round2Stats.zeros(self.num_classes, self.feature_dim)
        held: Round2Stats | None = None
        for shard2, shard_holdout in r2_all:
            r2 = r2.merge(shard2)
            if shard_holdout is not None:
                held = shard_holdout if held is None else held.merge(shard_holdout)
        metrics = finalize(r1, r2, w_KP, b_K)
        if held is not None and held.num_samples > 0:
            metrics["holdout_nc4"] = held.ncc_agree / held.num_samples
            metrics["holdout_accuracy"] = held.correct / held.num_samples
        return metrics

    def record_nc0(
        self, step: int, scalars: Mapping[str, float] | None = None, epoch: int | None = None
    ) -> tuple[float, float]:
        """nc0 and nc0_normalized of the current W, sent by rank 0 with ``scalars``.

        Call on every rank (W is gathered collectively under ZeRO-3/FSDP).
        """
        w_KP, _ = self.classifier_arrays()
        nc0, nc0_normalized = nc0_from_weight(w_KP)
        if self.rank == 0:
            values = {"nc0": nc0, "nc0_normalized": nc0_normalized, **dict(scalars or {})}
            self.client.record_scalars(self.run_id, step, values, epoch=epoch)
            if self.tensorboard is not None:
                self.tensorboard.write_step(step, values)
        return nc0, nc0_normalized

    def close(
        self, timeout_s: float | None = None, *, failed: bool = False, reason: str = ""
    ) -> DeliveryReport:
        """Settle a measurement still running in the background (a collective; call
        ``settle()`` first to get its metrics), end the run (``finished``, or ``failed`` with
        ``failed=True``), deliver what is buffered, then stop the embedded service.

        Delivery goes on for up to ``timeout_s`` (default 30 s) while the service takes
        calls. When a whole ``deadline_s`` passes with nothing delivered, the service is taken
        to be down and the rest stays in the spool (``ncserve replay RUN_DIR`` delivers it),
        so an outage costs the end of training one deadline, not ``timeout_s``. The run's
        end is queued behind everything else rank 0 sends, so it arrives last.
        """
        self._settle_pending()
        if self._worker is not None:
            self._worker.shutdown()
            self._worker = None
        self._stop_heartbeat.set()
        if self.rank == 0:
            self.client.finish_run(self.run_id, RUN_FAILED if failed else RUN_FINISHED, reason)
        limit = time.monotonic() + (timeout_s if timeout_s is not None else 30.0)
        report = self.client.report()
        while report.buffered and (remaining := limit - time.monotonic()) > 0:
            delivered = report.delivered
            report = self.client.flush(timeout_s=min(self.deadline_s, remaining))
            if report.delivered == delivered:
                break
        report = self.client.close(timeout_s=0)
        if not report.complete:
            log.warning("rank %d: not everything reached ncserve: %s", self.rank, report.summary())
        # Every rank has delivered before rank 0 stops the service they talk to.
        self._barrier()
        if self._server is not None:
            self._server.stop(grace_s=5.0)
            self._server = None
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None
        return report

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        if exc is None:
            self.close()
        else:
            self.close(failed=True, reason=f"{type(exc).__name__}: {exc}")

    def _heartbeat_loop(self) -> None:
        """Rank 0 says the run is alive between measurements (long epochs), so the service
        does not take it for abandoned."""
        while not self._stop_heartbeat.wait(self.heartbeat_s):
            self.client.heartbeat(self.run_id)
