"""``nclaunch export-features``: a checkpoint's penultimate features, in ``ncserve compute``'s format.

Legend: N samples, K classes, P feature dim.

The features are recomputed in one process on the CPU: the run's measurement
split (rebuilt from config.yaml and the checkpoint's world size, exactly as the
workers built it) goes through the checkpointed model in eval mode and a
forward hook on ``model.classifier`` captures its input h. The .npz holds
``features`` (N x P), ``labels`` (N), ``weight`` (K x P), ``bias`` (K) and
``num_classes``, so ``ncserve compute FILE.npz`` gives the metrics the run
measured at that step.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from launcher.checkpoint import CheckpointError, CheckpointStore, load_trainer_state
from launcher.config import RunConfig, load_yaml
from launcher.models import build_model
from launcher.rundir import RunDir
from launcher.trainer import load_splits, measurement_split


def penultimate_features(model: nn.Module, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """h_NP: the input of ``model.classifier`` for every row of ``x`` (eval mode, no grad)."""
    classifier = model.classifier
    if not isinstance(classifier, nn.Linear):
        raise TypeError(f"{type(model).__name__}.classifier is not an nn.Linear")
    captured: list[torch.Tensor] = []

    def hook(_module: nn.Module, inputs: tuple[torch.Tensor, ...], _output: torch.Tensor) -> None:
        captured.append(inputs[0].detach())

    handle = classifier.register_forward_hook(hook)
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(x), batch_size):
                model(x[start : start + batch_size])
    finally:
        handle.remove()
    return torch.cat(captured)


def export_features(run_dir: Path, checkpoint: str | None, out: Path) -> dict[str, Any]:
    """Write ``out`` and return a summary (num_samples, feature_dim, num_classes, step)."""
    folder = RunDir(run_dir)
    if not folder.config_path.is_file():
        raise CheckpointError(f"{run_dir} is not an nclaunch run directory (no config.yaml)")
    config = RunConfig.model_validate(load_yaml(folder.config_path))
    path = CheckpointStore(folder.checkpoints_dir).resolve(checkpoint)
    state = load_trainer_state(path)

    splits = load_splits(config)
    x_N, y_N = splits.train.tensors
    split = measurement_split(
        y_N, config.data.measure_samples_per_class, config.train.seed, int(state["world_size"])
    )
    model = build_model(
        config.model.name, splits.input_shape, splits.num_classes, config.model.width
    )
    weights = {k: v.float() if v.is_floating_point() else v for k, v in state["model"].items()}
    model.load_state_dict(weights)
    index = torch.from_numpy(split)
    h_NP = penultimate_features(model, x_N[index], config.train.measure_batch_size)
    classifier = model.classifier
    assert isinstance(classifier, nn.Linear)
    w_KP = classifier.weight.detach().numpy()
    arrays: dict[str, np.ndarray] = {
        "features": h_NP.numpy(),
        "labels": y_N[index].numpy().astype(np.int64),
        "weight": w_KP,
        "num_classes": np.asarray(splits.num_classes, dtype=np.int64),
    }
    if classifier.bias is not None:
        arrays["bias"] = classifier.bias.detach().numpy()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out, **arrays)  # type: ignore[arg-type]
    return {
        "num_samples": int(h_NP.shape[0]),
        "feature_dim": int(h_NP.shape[1]),
        "num_classes": splits.num_classes,
        "step": int(state["step"]),
        "checkpoint": str(path),
    }
