"""What only a machine with an accelerator can show, as one prepared run:

    python scripts/device_check.py --device cuda --out DIR     # a GPU machine, < 8 minutes
    python scripts/device_check.py --device cpu --out DIR      # the same checks a CPU can run

It writes ``DIR/device_check.json``: a list of checks, each ``{"name", "ok", ...figures}``,
and prints one line per check. The checks:

- ``nclaunch_ddp``: a short nclaunch run (DDP; nccl on cuda, gloo on cpu) that measures
  through its embedded service;
- ``nclaunch_bf16`` / ``nclaunch_fp16`` (cuda): the same in mixed precision;
- ``nclaunch_deepspeed_zero2`` / ``..._zero3`` (cuda): DeepSpeed on the GPU;
- ``tracker_device_vs_host``: both rounds on the features' device (torch engine) against the
  numpy engine on a host copy, every metric to 1e-10;
- ``engine_timing``: the torch engine on the device against the numpy engine on the host CPU
  for a few shapes (seconds and ratio).

A check that fails records its error and the run goes on; the exit status is 1 when any
check failed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
TINY = [
    "--dataset",
    "synthetic",
    "--num-classes",
    "4",
    "--feature-dim",
    "8",
    "--num-samples",
    "256",
    "--width",
    "0.0625",
    "--batch-size",
    "32",
    "--epochs",
    "2",
]
ENGINE_SHAPES = ((4_500, 512, 10), (20_000, 2_048, 100), (20_000, 1_024, 1_000))


def nclaunch(out: Path, name: str, device: str, *flags: str) -> dict[str, Any]:
    run_dir = out / "runs" / name
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env["DS_ACCELERATOR"] = "cuda" if device == "cuda" else "cpu"
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", "from launcher.cli import main; main()", *TINY,
         "--device", device, "--run-dir", str(run_dir), "--run-id", name, *flags],
        cwd=REPO, capture_output=True, text=True, timeout=420, check=False, env=env,
    )  # fmt: skip
    seconds = round(time.monotonic() - started, 1)
    if done.returncode != 0:
        tail = (done.stdout + done.stderr).strip().splitlines()[-5:]
        raise RuntimeError(f"nclaunch exited {done.returncode}: {' | '.join(tail)}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last = rows[-1]
    finite = all(np.isfinite(last[k]) for k in ("nc0", "nc1", "nc3") if last.get(k) is not None)
    if not finite:
        raise RuntimeError(f"non-finite metrics at the last measurement: {last}")
    return {"seconds": seconds, "measurements": len(rows), "nc0": last["nc0"],
            "nc1": last.get("nc1"), "accuracy": last.get("accuracy")}  # fmt: skip


def tracker_device_vs_host(device: str) -> dict[str, Any]:
    import torch

    from ncserve.metrics import METRIC_KEYS, finalize, round1_stats, round2_stats

    rng = np.random.default_rng(0)
    K, P, N = 10, 256, 5_000
    y = np.arange(N) % K
    h = (rng.normal(size=(N, P)) + 3 * rng.normal(size=(K, P))[y]).astype(np.float32)
    w, b = rng.normal(size=(K, P)), rng.normal(size=K)
    h_dev, y_dev = torch.from_numpy(h).to(device), torch.from_numpy(y).to(device)
    r1_host, r1_dev = round1_stats(h, y, K), round1_stats(h_dev, y_dev, K)
    means = r1_host.class_means()
    host = finalize(r1_host, round2_stats(h, y, means, w, b), w, b)
    dev = finalize(r1_dev, round2_stats(h_dev, y_dev, means, w, b), w, b)
    worst = max(abs(dev[k] - host[k]) / max(abs(host[k]), 1e-12) for k in METRIC_KEYS)
    if worst > 1e-10:
        raise RuntimeError(f"device and host metrics differ by {worst:.3g} (relative)")
    return {"max_relative_difference": worst, "N": N, "K": K, "P": P}


def engine_timing(device: str) -> dict[str, Any]:
    import torch

    from ncserve.metrics import round1_stats, round2_stats

    def both(h: Any, y: Any, K: int, w: np.ndarray, b: np.ndarray) -> float:
        started = time.perf_counter()
        r1 = round1_stats(h, y, K)
        round2_stats(h, y, r1.class_means(), w, b)
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - started

    shapes = []
    for N, P, K in ENGINE_SHAPES:
        rng = np.random.default_rng(1)
        y = np.arange(N) % K
        h = rng.normal(size=(N, P)).astype(np.float32)
        w, b = rng.normal(size=(K, P)), rng.normal(size=K)
        h_dev, y_dev = torch.from_numpy(h).to(device), torch.from_numpy(y).to(device)
        host_s = min(both(h, y, K, w, b) for _ in range(2))
        device_s = min(both(h_dev, y_dev, K, w, b) for _ in range(2))
        shapes.append({"N": N, "P": P, "K": K, "numpy_host_s": round(host_s, 4),
                       "torch_device_s": round(device_s, 4),
                       "device_over_host": round(device_s / host_s, 3)})  # fmt: skip
    return {"shapes": shapes}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), required=True)
    parser.add_argument("--out", type=Path, required=True, help="folder for device_check.json")
    args = parser.parse_args()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    device = args.device
    checks: list[tuple[str, Callable[[], dict[str, Any]]]] = [
        ("nclaunch_ddp", lambda: nclaunch(out, "ddp", device, "--nodes", "2")),
        ("tracker_device_vs_host", lambda: tracker_device_vs_host(device)),
        ("engine_timing", lambda: engine_timing(device)),
    ]
    if device == "cuda":
        checks[1:1] = [
            ("nclaunch_bf16", lambda: nclaunch(out, "bf16", device, "--precision", "bf16")),
            ("nclaunch_fp16", lambda: nclaunch(out, "fp16", device, "--precision", "fp16")),
            ("nclaunch_deepspeed_zero2", lambda: nclaunch(
                out, "zero2", device, "--engine", "deepspeed", "--zero-stage", "2")),
            ("nclaunch_deepspeed_zero3", lambda: nclaunch(
                out, "zero3", device, "--engine", "deepspeed", "--zero-stage", "3")),
        ]  # fmt: skip
    results: list[dict[str, Any]] = []
    environment: dict[str, Any] = {"device": device}
    try:
        import torch

        environment["torch"] = torch.__version__
        if device == "cuda" and torch.cuda.is_available():
            environment["gpu"] = torch.cuda.get_device_name(0)
    except ImportError as err:
        environment["torch"] = f"not importable: {err}"
    for name, check in checks:
        started = time.monotonic()
        try:
            figures = check()
            result = {"name": name, "ok": True, **figures}
        except Exception as err:  # a failed check is a result, not the end of the run
            result = {"name": name, "ok": False, "error": f"{type(err).__name__}: {err}",
                      "traceback": traceback.format_exc(limit=3)}  # fmt: skip
        result["elapsed_s"] = round(time.monotonic() - started, 1)
        results.append(result)
        shown = {k: v for k, v in result.items() if k not in ("name", "ok", "traceback")}
        print(f"{'ok  ' if result['ok'] else 'FAIL'} {name}: {json.dumps(shown)}", flush=True)
    report = {"environment": environment, "checks": results}
    (out / "device_check.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out / 'device_check.json'}")
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
