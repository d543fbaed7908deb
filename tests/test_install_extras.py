"""Two installs: `ncserve` (service, client, CLI, reports: no torch) and `ncserve[train]`.

The slow test builds a fresh virtual environment with the base install only, proves that
torch is not there, and runs the service's whole surface from it: serve, push, query,
compute, report.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import time
import venv
from pathlib import Path

import numpy as np
import pytest
import tomllib

from launcher import entry

REPO = Path(__file__).resolve().parents[1]


def test_the_base_install_has_no_training_packages() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    base = " ".join(project["dependencies"]).lower()
    for name in ("torch", "deepspeed", "mlxtend", "scikit-learn", "mnist1d"):
        assert name not in base, f"{name} is in the base install"
        assert any(d.startswith(name) for d in project["optional-dependencies"]["train"]), name
    assert "ncserve[train]" in project["optional-dependencies"]["dev"]
    assert project["scripts"]["nclaunch"] == "launcher.entry:main"


def test_nclaunch_without_the_extra_says_what_to_install(monkeypatch, capsys) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "torch" else real(name, *a)
    )
    with pytest.raises(SystemExit) as exit_info:
        entry.main()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install 'ncserve[train]'" in err[0] and "torch" in err[0]


@pytest.mark.slow
def test_service_client_compute_and_report_without_torch(tmp_path: Path) -> None:
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = str(env_dir / "bin" / "python")

    def run(*args: str, timeout: float = 600, **kw) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [python, *args], capture_output=True, text=True, timeout=timeout, check=False, **kw
        )

    installed = run("-m", "pip", "install", "-q", "--disable-pip-version-check", str(REPO))
    assert installed.returncode == 0, installed.stderr[-3000:]
    assert run("-c", "import torch").returncode != 0, "torch came with the base install"
    ncserve = str(env_dir / "bin" / "ncserve")

    rng = np.random.default_rng(0)
    y = np.arange(60) % 3
    features = tmp_path / "f.npz"
    np.savez(features, features=rng.normal(size=(60, 5)) + y[:, None], labels=y,
             weight=rng.normal(size=(3, 5)))  # fmt: skip
    computed = subprocess.run(
        [ncserve, "compute", str(features), "--format", "json"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert computed.returncode == 0, computed.stderr
    expected = json.loads(computed.stdout)

    port_file = tmp_path / "port"
    server = subprocess.Popen(
        [ncserve, "serve", "--listen", "127.0.0.1:0", "--port-file", str(port_file),
         "--db", str(tmp_path / "nc.db")],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not (port_file.exists() and port_file.read_text().strip()):
            assert server.poll() is None, server.stderr.read() if server.stderr else ""
            assert time.monotonic() < deadline, "ncserve serve did not start"
            time.sleep(0.1)
        target = f"127.0.0.1:{port_file.read_text().strip()}"

        def cli(*args: str) -> str:
            done = subprocess.run([ncserve, *args, "--target", target], capture_output=True,
                                  text=True, timeout=120, check=False)  # fmt: skip
            assert done.returncode == 0, done.stderr
            return done.stdout

        cli("push", str(features), "--run", "bare", "--step", "0", "--rank", "0",
            "--world-size", "1")  # fmt: skip
        row = json.loads(cli("query", "bare", "--format", "json"))
        for key in ("nc0", "nc1", "nc3", "accuracy"):
            assert row[key] == pytest.approx(expected[key], rel=1e-12), key
        runs = json.loads(cli("runs", "--format", "json"))
        assert [r["run_id"] for r in runs] == ["bare"]
    finally:
        server.terminate()
        server.wait(timeout=30)
    run_dir = tmp_path / "runs" / "bare"
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text(json.dumps({"run_id": "bare", "epoch": 0, **row}) + "\n")
    report = subprocess.run(
        [ncserve, "report", str(run_dir), "--out", str(tmp_path / "report.png")],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert report.returncode == 0, report.stderr
    assert (tmp_path / "report.png").stat().st_size > 10_000
