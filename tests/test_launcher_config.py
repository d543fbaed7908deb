"""nclaunch configuration: layering, validation before launch, launch plans, run-dir pieces.

All in-process and fast: nothing here starts a worker.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner

from launcher.checkpoint import CheckpointError, CheckpointStore, save_trainer_state
from launcher.cli import FLAGS, main_group
from launcher.config import RunConfig
from launcher.launch import plan_launch
from launcher.resolve import resolve
from launcher.rundir import RunDir
from launcher.trainer import measurement_split


def invoke(*args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    result = CliRunner().invoke(main_group, list(args), env=env, prog_name="nclaunch")
    return result.exit_code, result.output


def printed_config(*args: str, env: dict[str, str] | None = None) -> dict:
    code, output = invoke(*args, "--print-config", env=env)
    assert code == 0, output
    return yaml.safe_load(output)


def test_flags_override_environment_override_file(tmp_path: Path) -> None:
    config_file = tmp_path / "run.yaml"
    config_file.write_text(
        "optim: {name: adamw, weight_decay: 0.05}\n"
        "train: {epochs: 3, batch_size: 64}\n"
        "launch: {nnodes: '1'}\n"
    )
    resolved = printed_config(
        "--config", str(config_file), "--epochs", "5", env={"PET_NNODES": "2"}
    )
    assert resolved["optim"]["name"] == "adamw"  # from the file
    assert resolved["optim"]["weight_decay"] == 0.05
    assert resolved["optim"]["lr"] == 0.001  # adamw's default, resolved
    assert resolved["train"]["epochs"] == 5  # flag beats file
    assert resolved["train"]["batch_size"] == 64
    assert resolved["launch"]["nnodes"] == "2"  # PET_* beats file
    assert resolved["launch"]["device"] == "cpu"
    assert resolved["run_id"].startswith("adamw-mlp-mnist5k-")
    assert resolved["run_dir"] == f"runs/{resolved['run_id']}"
    # A flag beats the PET_* variable, as with torchrun.
    again = printed_config("--nodes", "4", env={"PET_NNODES": "2", "PET_MAX_RESTARTS": "3"})
    assert again["launch"]["nnodes"] == "4" and again["launch"]["max_restarts"] == 3


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("--optimizer", "adamx"), "'adamx' is not one of"),
        (("--batch-size", "0"), "--batch-size"),
        (("--nodes", "0:2"), "launch.nnodes (--nodes): got '0:2'"),
        (("--nproc-per-node", "two"), "must be a positive integer or auto"),
        (("--nodes", "3", "--batch-size", "128"), "not a positive multiple of the world size 3"),
        (("--precision", "bf16", "--device", "cpu"), "'bf16' needs a GPU; allowed on cpu: fp32"),
        (("--optimizer", "sgd", "--coupled-fraction", "0.5"), "adam and adamw only"),
        (("--dataset", "cifar10"), "reads files: give --data-dir"),
        (("--sidecar", "localhost"), "tracking.sidecar (--sidecar): got 'localhost'; must be"),
        (("--run-id", "a/b"), "run_id (--run-id): got 'a/b'"),
        (("--resume",), "--resume needs the run to continue"),
        (("--optimizer", "lion", "--beta2", "0.5", "--momentum", "0.9"), None),
    ],
)
def test_invalid_values_fail_before_launch(args: tuple[str, ...], expected: str | None) -> None:
    code, output = invoke(*args, "--print-config")
    if expected is None:
        assert code == 0, output
        return
    assert code == 2, output
    assert "Traceback" not in output
    assert len(output.strip().splitlines()) == 1, output
    assert expected in output


def test_yaml_errors_name_field_flag_and_allowed_values(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: {name: rmsprop, lr: -1}\ntrain: {epochs: 2, warmup: 3}\n")
    code, output = invoke("--config", str(bad))
    assert code == 2
    line = output.strip()
    assert "\n" not in line and "Traceback" not in line
    assert "optim.name (--optimizer): got 'rmsprop'; must be one of sgd, sgdw, adam" in line
    assert "optim.lr (--lr): got -1" in line
    assert "train.warmup: unknown setting" in line
    not_yaml = tmp_path / "list.yaml"
    not_yaml.write_text("- 1\n- 2\n")
    code, output = invoke("--config", str(not_yaml))
    assert code == 2 and "must hold a mapping" in output


def test_existing_run_dir_needs_resume(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("{}\n")
    code, output = invoke("--run-dir", str(run_dir), "--no-tracking")
    assert code == 2 and "already holds a run; pass --resume" in output


def test_help_documents_every_option_with_its_default() -> None:
    code, output = invoke("--help")
    assert code == 0
    for flag in FLAGS:
        assert flag.decls[0].split("/")[0] in output
    flat = " ".join(output.split())
    for text in ("[default: 128", "[default: mnist5k]", "PET_NNODES", "[default: ddp]"):
        assert text in flat
    assert "sgd/sgdw 0.05" in flat  # the per-optimizer learning rates


def _resolved(**sections: dict) -> RunConfig:
    return resolve(RunConfig.model_validate(sections), cuda_available=False)


def test_the_training_guide_lists_every_nclaunch_option() -> None:
    """docs/training.md's option tables name every flag `nclaunch` takes."""
    import click

    guide = (Path(__file__).resolve().parents[1] / "docs" / "training.md").read_text()
    missing = []
    for param in main_group.params:
        if not isinstance(param, click.Option):
            continue
        flag = "/".join([param.opts[0], *param.secondary_opts[:1]])
        if f"| `{flag}`" not in guide:
            missing.append(flag)
    assert not missing, f"docs/training.md lacks rows for {missing}"


def test_launch_plans_follow_torchrun(tmp_path: Path) -> None:
    local = _resolved(launch={"nnodes": "4", "nproc_per_node": "1"})
    plan = plan_launch(local, RunDir(tmp_path))
    assert plan.local_mode and plan.world_size == 4
    assert plan.elastic.nproc_per_node == 4 and plan.elastic.max_nodes == 1
    assert plan.elastic.rdzv_backend == "c10d" and plan.elastic.rdzv_endpoint == "127.0.0.1:0"

    static = _resolved(
        launch={"nnodes": "2", "master_addr": "node0", "node_rank": 1, "nproc_per_node": "2"},
        tracking={"sidecar": "ncserve:50051"},
    )
    plan = plan_launch(static, RunDir(tmp_path))
    assert not plan.local_mode
    assert plan.elastic.rdzv_backend == "static" and plan.elastic.rdzv_endpoint == "node0:29500"
    assert plan.elastic.rdzv_configs["rank"] == 1 and plan.elastic.nproc_per_node == 2

    elastic = _resolved(
        launch={"nnodes": "1:3", "rdzv_endpoint": "head:29400", "rdzv_id": "job-7"},
        train={"batch_size": 96},
        tracking={"sidecar": "ncserve:50051"},
    )
    plan = plan_launch(elastic, RunDir(tmp_path))
    assert (plan.elastic.min_nodes, plan.elastic.max_nodes) == (1, 3)
    assert plan.elastic.rdzv_backend == "c10d" and plan.elastic.run_id == "job-7"
    # Every node names the run alike: by the rendezvous id they share.
    assert elastic.run_id == "job-7"

    with pytest.raises(ValueError, match="needs the address of the ncserve service"):
        _resolved(launch={"nnodes": "2", "rdzv_endpoint": "head:29400"})


def test_measurement_split_gives_equal_shares() -> None:
    labels = torch.arange(103) % 10
    split = measurement_split(labels, None, seed=3, world_size=4)
    assert len(split) == 100 and len(set(split.tolist())) == 100
    shares = [split[rank::4] for rank in range(4)]
    assert {len(s) for s in shares} == {25}
    assert np.array_equal(split, measurement_split(labels, None, seed=3, world_size=4))
    per_class = measurement_split(labels, 5, seed=0, world_size=2)
    assert len(per_class) == 50
    assert np.bincount(labels[torch.from_numpy(per_class)].numpy()).tolist() == [5] * 10


def test_checkpoint_store_commit_latest_prune(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "checkpoints", keep=2)
    assert store.latest() is None
    for step in (10, 20, 30):
        staging = store.prepare_staging(step)
        save_trainer_state(staging, {"model": {}, "step": step})
        store.commit(step)
    assert [p.name for p in store.completed()] == ["step_00000020", "step_00000030"]
    assert store.latest() == tmp_path / "checkpoints" / "step_00000030"
    # An interrupted save leaves only a hidden staging directory: latest is unchanged.
    store.prepare_staging(40)
    assert store.latest().name == "step_00000030"
    assert store.resolve("step_00000020").name == "step_00000020"
    with pytest.raises(CheckpointError, match=r"available in .*step_00000020, step_00000030"):
        store.resolve("step_00000010")


def test_metrics_file_survives_a_torn_line(tmp_path: Path) -> None:
    folder = RunDir(tmp_path)
    folder.append_metrics({"step": 0, "nc0": 1.5})
    with folder.metrics_path.open("a") as stream:
        stream.write('{"step": 8, "nc0"')  # a crash in the middle of a write
    assert [r["step"] for r in folder.repair_metrics()] == [0]
    folder.append_metrics({"step": 8, "nc0": float("nan")})
    assert folder.read_metrics() == [{"step": 0, "nc0": 1.5}, {"step": 8, "nc0": None}]


def test_export_and_report_errors_are_one_line(tmp_path: Path) -> None:
    code, output = invoke("export-features", str(tmp_path), "--out", str(tmp_path / "f.npz"))
    assert code == 2 and "is not an nclaunch run directory (no config.yaml)" in output
    (tmp_path / "config.yaml").write_text("data: {dataset: digits}\n")
    code, output = invoke("export-features", str(tmp_path), "--out", str(tmp_path / "f.npz"))
    assert code == 2 and "no checkpoint in" in output and "Traceback" not in output
    code, output = invoke("report", str(tmp_path))
    assert code == 2 and "metrics.jsonl: no measurements" in output


def test_only_the_synthetic_dataset_records_a_synthetic_shape() -> None:
    from launcher.config import RunConfig
    from launcher.data.datasets import SYNTHETIC_DEFAULTS
    from launcher.resolve import resolve

    mnist = resolve(RunConfig(), cuda_available=False, cpu_count=2).data
    assert (mnist.num_classes, mnist.feature_dim, mnist.num_samples) == (None, None, None)
    synthetic = resolve(
        RunConfig.model_validate({"data": {"dataset": "synthetic", "num_samples": 64}}),
        cuda_available=False,
        cpu_count=2,
    ).data
    assert synthetic.num_samples == 64
    assert synthetic.num_classes == SYNTHETIC_DEFAULTS["num_classes"]
    assert synthetic.feature_dim == SYNTHETIC_DEFAULTS["feature_dim"]


def test_a_late_measurement_line_shows_its_own_step_values(capsys) -> None:
    from launcher.report import TrainingProgress

    progress = TrainingProgress(epochs=1, steps_per_epoch=30, enabled=True)
    assert not progress.live  # pytest captures stdout: one line per measurement
    with progress:
        progress.set_running(0.1234, 0.5, 1.0)  # step 30's running loss
        progress.epoch_done(1, {}, {"step": 0, "train_loss": None, "train_acc": None, "nc0": 2.0})
    line = capsys.readouterr().out.strip()
    assert line.startswith("epoch 1/1 step 0: loss - acc - nc0 2")
    assert "0.1234" not in line
    assert len(line) < 160  # and it was not wrapped at 80 columns


def test_every_nclaunch_default_is_the_run_configs() -> None:
    """One definition of each setting: nclaunch's option defaults are RunConfig's fields."""
    config = RunConfig()
    by_name = {p.name: p for p in main_group.params}
    for flag in FLAGS:
        value: object = config
        for part in flag.path.split("."):
            value = getattr(value, part)
        if isinstance(value, Path):
            value = str(value)
        assert by_name[flag.name].default == value, flag.path
