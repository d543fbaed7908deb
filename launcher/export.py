"""``nclaunch export-features``: the penultimate features of a measured step (or a
checkpoint), in ``ncserve compute``'s format.

Legend: N samples, K classes, P feature dim.

The features are recomputed in one process on the CPU: the run's measurement split
(rebuilt from config.yaml and the run's world size, exactly as the workers built it), or
its held-out split, goes through the model with the weights the run kept for that step
(RUN_DIR/weights, every measured step including step 0, or a checkpoint) in eval mode, and
a forward hook on ``model.classifier`` captures its input h. The .npz holds
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
from launcher.config import RunConfig
from launcher.models import build_model
from launcher.resolve import load_yaml
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


def _weights(
    folder: RunDir, checkpoint: str | None, step: int | None
) -> tuple[dict[str, Any], str]:
    """The trainer state holding the weights to export, and where it came from."""
    store = CheckpointStore(folder.checkpoints_dir)
    kept = folder.measured_weight_steps()
    if step is not None:
        if step in kept:
            return _load(folder.weights_path(step)), f"weights/{folder.weights_path(step).name}"
        for path in store.completed():
            state = load_trainer_state(path)
            if int(state["step"]) == step:
                return state, str(path)
        shown = ", ".join(str(s) for s in kept[-10:]) or "none"
        raise CheckpointError(
            f"no weights for step {step} in {folder.root}: measured steps kept: {shown} "
            "(runs keep them with --keep-measured-weights), or a checkpoint of that step"
        )
    if checkpoint is not None or store.latest() is not None or not kept:
        path = store.resolve(checkpoint)
        return load_trainer_state(path), str(path)
    return _load(folder.weights_path(kept[-1])), f"weights/{folder.weights_path(kept[-1]).name}"


def _load(path: Path) -> dict[str, Any]:
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or "model" not in state or "step" not in state:
        raise CheckpointError(f"{path} is not a file of measured weights")
    return state


def export_features(
    run_dir: Path,
    checkpoint: str | None,
    out: Path,
    *,
    step: int | None = None,
    split: str = "measurement",
) -> dict[str, Any]:
    """Write ``out`` and return a summary (num_samples, feature_dim, num_classes, step,
    split, source). ``step`` picks the weights of a measured step (step 0: the initial
    ones); ``split`` is "measurement" (the split the run measured) or "holdout"."""
    folder = RunDir(run_dir)
    if not folder.config_path.is_file():
        raise CheckpointError(f"{run_dir} is not an nclaunch run directory (no config.yaml)")
    config = RunConfig.model_validate(load_yaml(folder.config_path))
    state, source = _weights(folder, checkpoint, step)

    splits = load_splits(config)
    if split == "holdout":
        if splits.holdout is None:
            raise CheckpointError(
                f"run {config.run_id} has no held-out split (train with --holdout F, or a "
                "dataset with a test split)"
            )
        x_N, y_N = splits.holdout.tensors
        rows = np.arange(len(y_N))
    else:
        x_N, y_N = splits.train.tensors
        rows = measurement_split(
            y_N, config.data.measure_samples_per_class, config.train.seed, int(state["world_size"])
        )
    model = build_model(
        config.model.name, splits.input_shape, splits.num_classes, config.model.width
    )
    weights = {k: v.float() if v.is_floating_point() else v for k, v in state["model"].items()}
    model.load_state_dict(weights)
    index = torch.from_numpy(rows)
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
        "split": split,
        "source": source,
    }
