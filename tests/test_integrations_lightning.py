"""The PyTorch Lightning callback: a tiny model trained on CPU, its measurements in the service."""

from __future__ import annotations

import csv

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ncserve.metrics import METRIC_KEYS, compute_metrics, nc0_from_weight
from tests.track_support import loopback_service, require, stored_measurements, stored_scalars

pl = require("lightning.pytorch")
from ncserve.integrations.lightning import NCTrackerCallback  # noqa: E402

K, D, N = 3, 5, 96


class TinyClassifier(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(D, 8), nn.Tanh())
        self.head = nn.Linear(8, K)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        # A key with "/": the callback must turn it into one the service accepts.
        self.log("train/loss", loss, on_step=False, on_epoch=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, weight_decay=1e-3)


def test_callback_measures_and_records_nc0_through_the_service(tmp_path):
    torch.manual_seed(0)
    y = torch.arange(N) % K
    x = torch.randn(N, D) + 2.0 * y[:, None].float()
    train = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True)  # 6 steps per epoch
    measure = DataLoader(TensorDataset(x[:64], y[:64]), batch_size=32)
    module = TinyClassifier()
    logger = pl.loggers.CSVLogger(tmp_path, name="logs")
    with loopback_service(tmp_path / "db.sqlite") as target:
        callback = NCTrackerCallback(measure, every_n_epochs=2, run_id="pl", target=target)
        trainer = pl.Trainer(
            max_epochs=3,
            accelerator="cpu",
            devices=1,
            logger=logger,
            callbacks=[callback],
            log_every_n_steps=2,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=tmp_path,
        )
        trainer.fit(module, train)
        rows = stored_measurements(target, "pl")
        series = stored_scalars(target, "pl")
    # At fit start, after epoch 2 of 3, and at the end of fit.
    assert [(row["step"], row["epoch"], row["status"]) for row in rows] == [
        (0, 0, "complete"),
        (12, 2, "complete"),
        (18, 3, "complete"),
    ]
    assert all(row["num_samples"] == 64 for row in rows)
    assert rows[1]["scalars"]["train_loss"] > 0 and rows[1]["scalars"]["lr"] == 0.1
    # The last measurement is that of the trained model, computed directly.
    with torch.no_grad():
        h = module.body(x[:64]).double().numpy()
    w = module.head.weight.detach().double().numpy()
    want = compute_metrics(h, y[:64].numpy(), w, module.head.bias.detach().double().numpy())
    for key in METRIC_KEYS:
        assert rows[-1][key] == pytest.approx(want[key], rel=1e-9, abs=1e-12), key
        assert callback.latest_metrics[key] == pytest.approx(want[key], rel=1e-9, abs=1e-12)
    # nc0 with the loss and learning rate at every logged step.
    assert sorted(series) == list(range(2, 19, 2))
    assert set(series[18]) == {"nc0", "nc0_normalized", "train_loss", "lr"}
    assert series[18]["nc0"] == pytest.approx(nc0_from_weight(w)[0], rel=1e-6)
    # The metrics also reach the trainer's own loggers.
    with open(logger.log_dir + "/metrics.csv", newline="") as stream:
        logged = [r for r in csv.DictReader(stream) if r.get("nc/nc1")]
    assert [int(r["step"]) for r in logged] == [0, 12, 18]
    assert callback.tracker is None  # closed at the end of fit


def test_callback_arguments_are_checked():
    with pytest.raises(ValueError, match="every_n_epochs must be >= 1, got 0"):
        NCTrackerCallback([], every_n_epochs=0)
