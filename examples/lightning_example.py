"""Neural Collapse of a small MLP trained with PyTorch Lightning, tracked by ncserve (CPU).

Needs ``pip install 'ncserve[lightning]'``. Run with ``--devices 2`` for two DDP processes:
each measures its half of the measurement split and the service combines them.
"""

import argparse

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ncserve.integrations.lightning import NCTrackerCallback

K, D, N = 4, 16, 1024  # classes, input width, samples: Gaussian blobs, one per class


class Classifier(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(D, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, K)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss, on_step=False, on_epoch=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=3e-3, weight_decay=0.05)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--target", help="HOST:PORT of ncserve (default: an embedded service)")
    parser.add_argument("--run-dir", default="runs/lightning")
    args = parser.parse_args()

    torch.manual_seed(0)
    y = torch.arange(N) % K
    x = torch.randn(N, D) + 3.0 * nn.functional.one_hot(y, D).float()
    train = DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True)
    measure = DataLoader(TensorDataset(x[:512], y[:512]), batch_size=128)
    callback = NCTrackerCallback(
        measure, every_n_epochs=1, run_id="lightning-example", target=args.target
    )
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        accelerator="cpu",
        devices=args.devices,
        strategy="ddp" if args.devices > 1 else "auto",
        default_root_dir=args.run_dir,
        callbacks=[callback],
        log_every_n_steps=10,
        enable_checkpointing=False,
        enable_progress_bar=False,
    )
    trainer.fit(Classifier(), train)
    if trainer.is_global_zero and callback.latest_metrics is not None:
        m = callback.latest_metrics
        print(f"final: nc0 {m['nc0']:.4f} nc1 {m['nc1']:.4f} nc2 {m['nc2']:.4f} nc4 {m['nc4']:.3f}")


if __name__ == "__main__":
    main()
