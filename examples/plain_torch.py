"""Neural Collapse of a small MLP, tracked with ncserve from a plain PyTorch loop (CPU)."""

import argparse

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ncserve.track import Tracker

parser = argparse.ArgumentParser(description=__doc__)
parser.add_argument("--epochs", type=int, default=30)
parser.add_argument("--target", help="HOST:PORT of ncserve (default: an embedded service)")
parser.add_argument("--run-dir", default="runs/plain-torch")
args = parser.parse_args()

torch.manual_seed(0)
K, D, N = 4, 16, 1024  # classes, input width, samples: Gaussian blobs, one per class
y = torch.arange(N) % K
x = torch.randn(N, D) + 3.0 * nn.functional.one_hot(y, D).float()
train = DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True)
measure = DataLoader(TensorDataset(x[:512], y[:512]), batch_size=256)  # the measurement split
model = nn.Sequential(nn.Linear(D, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, K))
optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.05)

# The classifier is the last nn.Linear; its input (32 features) is what collapses.
with Tracker(
    model,
    run_id="plain-torch",
    target=args.target,
    run_dir=args.run_dir,
    metadata={"optimizer": "adamw"},
    csv=f"{args.run_dir}/metrics.csv",
) as tracker:
    step = 0
    tracker.measure(measure, step=step, epoch=0)
    for epoch in range(1, args.epochs + 1):
        for xb, yb in train:
            loss = nn.functional.cross_entropy(model(xb), yb)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
            if step % 10 == 0:  # nc0 needs only W: cheap enough for every logged step
                tracker.record_nc0(step, scalars={"train_loss": loss.item()})
        m = tracker.measure(measure, step=step, epoch=epoch, scalars={"train_loss": loss.item()})
        print(f"epoch {epoch} loss {loss.item():.4f} nc1 {m['nc1']:.4f} nc2 {m['nc2']:.4f}")
