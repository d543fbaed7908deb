"""Neural Collapse of a tiny BERT classifier trained with the transformers Trainer (CPU).

Needs ``pip install 'ncserve[hf]'``. The model is built from a small config (no download);
each class of the synthetic task draws its tokens mostly from its own band of the
vocabulary. The tracker captures the input of ``model.classifier``, the pooled [CLS] state.
"""

import argparse

import torch
from torch.utils.data import DataLoader
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    Trainer,
    TrainingArguments,
    default_data_collator,
)

from ncserve.integrations.hf import NCTrackerCallback

K, VOCAB, LENGTH, N = 4, 64, 12, 512  # classes, vocabulary, tokens per sample, samples


def make_dataset(seed: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(N) % K
    band = VOCAB // K
    tokens = y[:, None] * band + torch.randint(0, band, (N, LENGTH), generator=g)
    noise = torch.rand(N, LENGTH, generator=g) < 0.2  # a fifth of the tokens from anywhere
    tokens = torch.where(noise, torch.randint(0, VOCAB, (N, LENGTH), generator=g), tokens)
    return [
        {"input_ids": t, "attention_mask": torch.ones(LENGTH, dtype=torch.int64), "labels": c}
        for t, c in zip(tokens, y, strict=True)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=float, default=6)
    parser.add_argument("--target", help="HOST:PORT of ncserve (default: an embedded service)")
    parser.add_argument("--run-dir", default="runs/hf")
    args = parser.parse_args()

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=LENGTH,
        num_labels=K,
    )
    model = BertForSequenceClassification(config)
    train = make_dataset(seed=0)
    measure = DataLoader(train[:256], batch_size=128, collate_fn=default_data_collator)
    callback = NCTrackerCallback(measure, every_n_epochs=1, run_id="hf-example", target=args.target)
    training = TrainingArguments(
        output_dir=args.run_dir,
        num_train_epochs=args.epochs,
        per_device_train_batch_size=32,
        learning_rate=2e-3,
        weight_decay=0.01,
        logging_steps=4,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=training, train_dataset=train, callbacks=[callback])
    trainer.train()
    if callback.latest_metrics is not None:
        m = callback.latest_metrics
        print(f"final: nc0 {m['nc0']:.4f} nc1 {m['nc1']:.4f} nc2 {m['nc2']:.4f} nc4 {m['nc4']:.3f}")


if __name__ == "__main__":
    main()
