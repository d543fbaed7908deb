"""What nclaunch and its NC tracking cost, next to a plain torch DDP script.

One run of this script trains the same model on the same data three ways, each with
2 worker processes (gloo on CPU, or nccl on GPUs with --device cuda):

1. ``nclaunch --no-tracking``      (engine, logging, nc0 at logged steps; no measurements)
2. ``nclaunch`` with tracking      (a full NC measurement through the embedded service
                                    after every epoch)
3. a minimal plain DDP script      (DistributedSampler + DataLoader + DDP + optimizer)

and prints the median epoch time of each (the first epoch, warm-up, excluded; the best of
``--repeats`` interleaved runs, since load from elsewhere only adds time), the throughput
ratios, and the cost of one measurement next to a bare forward pass of the model over the
same samples. Checkpoints are off in the nclaunch runs (final one only):
they are not what is compared.

    python benchmarks/training_overhead.py [--epochs 6] [--optimizer sgd] [--json out.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

WORKERS = 2
BATCH_SIZE = 128  # global, as nclaunch's default
LR = 0.05  # nclaunch's default for sgd
MOMENTUM, WEIGHT_DECAY = 0.9, 5e-4


def nclaunch_epochs(tracking: bool, epochs: int, workdir: Path, device: str) -> dict[str, float]:
    run_dir = workdir / ("tracked" if tracking else "untracked")
    command = [
        sys.executable,
        "-c",
        "from launcher.cli import main; main()",
        "--nodes",
        str(WORKERS),
        "--dataset",
        "mnist5k",
        "--model",
        "mlp",
        "--optimizer",
        "sgd",
        "--lr",
        str(LR),
        "--batch-size",
        str(BATCH_SIZE),
        "--epochs",
        str(epochs),
        "--checkpoint-every",
        "0",
        "--device",
        device,
        "--run-dir",
        str(run_dir),
        "--tracking" if tracking else "--no-tracking",
    ]
    started = time.perf_counter()
    subprocess.run(command, cwd=REPO, check=True, capture_output=True, text=True)
    total = time.perf_counter() - started
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in rows if r["epoch"] >= 2]  # epoch 1 is warm-up
    walls = [b["wall_time"] - a["wall_time"] for a, b in itertools.pairwise(rows[1:])]
    return {
        "train_s": statistics.median(r["epoch_time_s"] for r in trained),
        "measure_s": statistics.median(r["measure_time_s"] for r in trained),
        "epoch_wall_s": statistics.median(walls),
        "run_s": total,
    }


def _plain_worker(rank: int, epochs: int, port: int, device: str, out: str) -> None:
    """The plain DDP script: what a researcher writes without nclaunch."""
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel
    from torch.utils.data import DataLoader, DistributedSampler

    from launcher.data import load_dataset
    from launcher.models import build_model

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    cuda = device == "cuda"
    dev = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if not cuda:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // WORKERS))
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=WORKERS)
    splits = load_dataset("mnist5k")
    torch.manual_seed(0)
    model = build_model("mlp", splits.input_shape, splits.num_classes).to(dev)
    ddp = DistributedDataParallel(model, device_ids=[rank] if cuda else None)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY
    )
    sampler = DistributedSampler(splits.train, WORKERS, rank, shuffle=True, seed=0, drop_last=True)
    loader = DataLoader(
        splits.train, batch_size=BATCH_SIZE // WORKERS, sampler=sampler, drop_last=True
    )
    times = []
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        dist.barrier()
        started = time.perf_counter()
        for x, y in loader:
            optimizer.zero_grad(set_to_none=True)
            loss = torch.nn.functional.cross_entropy(ddp(x.to(dev)), y.to(dev))
            loss.backward()
            optimizer.step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    # A bare forward pass over this rank's share of the measurement split (all training
    # samples), batch 1024 as nclaunch's measurement: the floor a measurement is held to.
    x_all, _ = splits.train.tensors
    share = x_all[rank::WORKERS].to(dev)
    model.eval()
    forwards = []
    with torch.no_grad():
        for _ in range(5):
            started = time.perf_counter()
            for start in range(0, len(share), 1024):
                model(share[start : start + 1024])
            if cuda:
                torch.cuda.synchronize()
            forwards.append(time.perf_counter() - started)
    if rank == 0:
        Path(out).write_text(json.dumps({"epochs": times, "forward": forwards}))
    dist.destroy_process_group()


def plain_epochs(epochs: int, device: str, workdir: Path) -> dict[str, float]:
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    out = workdir / "plain.json"
    started = time.perf_counter()
    mp.spawn(_plain_worker, args=(epochs, port, device, str(out)), nprocs=WORKERS, join=True)
    total = time.perf_counter() - started
    result = json.loads(out.read_text())
    return {
        "train_s": statistics.median(result["epochs"][1:]),
        "forward_s": statistics.median(result["forward"]),
        "run_s": total,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=2, help="runs of each, best kept")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = parser.parse_args()
    if args.device == "cpu":
        os.environ.setdefault("OMP_NUM_THREADS", "1")
    runs: dict[str, list[dict[str, float]]] = {"untracked": [], "tracked": [], "plain": []}
    for repeat in range(args.repeats):
        # Interleaved, so a burst of load from elsewhere hits all three alike.
        with tempfile.TemporaryDirectory(prefix=f"nclaunch-bench-{repeat}-") as tmp:
            workdir = Path(tmp)
            runs["untracked"].append(nclaunch_epochs(False, args.epochs, workdir, args.device))
            runs["tracked"].append(nclaunch_epochs(True, args.epochs, workdir, args.device))
            runs["plain"].append(plain_epochs(args.epochs, args.device, workdir))
    # The least disturbed repeat of each number: interference only ever adds time.
    untracked, tracked, plain = (
        {key: min(r[key] for r in runs[name]) for key in runs[name][0]}
        for name in ("untracked", "tracked", "plain")
    )
    results: dict[str, Any] = {
        "setup": {
            "workers": WORKERS,
            "device": args.device,
            "dataset": "mnist5k",
            "model": "mlp",
            "global_batch": BATCH_SIZE,
            "epochs": args.epochs,
            "repeats": args.repeats,
            "cpus": os.cpu_count(),
        },
        "plain_ddp": plain,
        "nclaunch_no_tracking": untracked,
        "nclaunch_tracking": tracked,
        "ratios": {
            # > 1: nclaunch trains faster than the plain script; the target is >= 0.95.
            "throughput_no_tracking_vs_plain": plain["train_s"] / untracked["train_s"],
            # Whole epochs (training + measurement + bookkeeping), tracked vs untracked.
            "epoch_tracking_vs_no_tracking": tracked["epoch_wall_s"] / untracked["epoch_wall_s"],
            # One measurement vs a bare forward pass over the same samples; target <= 1.2.
            "measurement_vs_forward": tracked["measure_s"] / plain["forward_s"],
        },
    }
    print(f"{'':32}{'train s/epoch':>15}{'epoch wall s':>15}{'measure s':>12}")
    print(f"{'plain DDP script':32}{plain['train_s']:>15.3f}{'':>15}{'':>12}")
    for name, row in (("nclaunch --no-tracking", untracked), ("nclaunch (tracking)", tracked)):
        print(
            f"{name:32}{row['train_s']:>15.3f}{row['epoch_wall_s']:>15.3f}{row['measure_s']:>12.4f}"
        )
    print(f"bare forward over the measurement share: {plain['forward_s']:.4f} s")
    for key, value in results["ratios"].items():
        print(f"{key}: {value:.3f}")
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
