"""The transformers TrainerCallback: a tiny model trained on CPU, its measurements in the service."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from ncserve.metrics import METRIC_KEYS, compute_metrics, nc0_from_weight
from tests.track_support import loopback_service, require, stored_measurements, stored_scalars

transformers = require("transformers")
require("accelerate")  # the Trainer needs it on torch
from ncserve.integrations.hf import NCTrackerCallback  # noqa: E402

K, D, N = 3, 5, 96


class TinyClassifier(nn.Module):
    """What the Trainer expects of a model: keyword inputs, a dict with the loss."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(D, 8), nn.Tanh())
        self.head = nn.Linear(8, K)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> dict:
        logits = self.head(self.body(x))
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = nn.functional.cross_entropy(logits, labels)
        return out


def test_callback_measures_and_records_nc0_through_the_service(tmp_path):
    torch.manual_seed(0)
    y = torch.arange(N) % K
    x = torch.randn(N, D) + 2.0 * y[:, None].float()
    samples = [{"x": xi, "labels": yi} for xi, yi in zip(x, y, strict=True)]
    measure = DataLoader(samples[:64], batch_size=32, collate_fn=transformers.default_data_collator)
    model = TinyClassifier()
    with loopback_service(tmp_path / "db.sqlite") as target:
        callback = NCTrackerCallback(measure, run_id="hf", target=target)
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path / "out"),
            num_train_epochs=3,
            per_device_train_batch_size=16,  # 6 steps per epoch
            learning_rate=0.1,
            optim="sgd",
            logging_steps=2,
            save_strategy="no",
            report_to="none",
            use_cpu=True,
            disable_tqdm=True,
        )
        trainer = transformers.Trainer(
            model=model, args=args, train_dataset=samples, callbacks=[callback]
        )
        trainer.train()
        rows = stored_measurements(target, "hf")
        series = stored_scalars(target, "hf")
    # At the start and after each epoch; the end of training is epoch 3's measurement.
    assert [(row["step"], row["epoch"], row["status"]) for row in rows] == [
        (0, 0, "complete"),
        (6, 1, "complete"),
        (12, 2, "complete"),
        (18, 3, "complete"),
    ]
    assert all(row["num_samples"] == 64 for row in rows)
    assert rows[1]["scalars"]["train_loss"] > 0
    with torch.no_grad():
        h = model.body(x[:64]).double().numpy()
    w = model.head.weight.detach().double().numpy()
    want = compute_metrics(h, y[:64].numpy(), w, model.head.bias.detach().double().numpy())
    for key in METRIC_KEYS:
        assert rows[-1][key] == pytest.approx(want[key], rel=1e-9, abs=1e-12), key
        assert callback.latest_metrics[key] == pytest.approx(want[key], rel=1e-9, abs=1e-12)
    # nc0 with the logged loss, learning rate and gradient norm at every logged step.
    assert sorted(series) == list(range(2, 19, 2))
    assert {"nc0", "nc0_normalized", "train_loss", "lr", "grad_norm"} <= set(series[18])
    assert series[18]["nc0"] == pytest.approx(nc0_from_weight(w)[0], rel=1e-6)
    assert callback.tracker is None  # closed at the end of training


def test_callback_arguments_are_checked():
    with pytest.raises(ValueError, match="do not pass model="):
        NCTrackerCallback([], model=nn.Linear(2, 2))
