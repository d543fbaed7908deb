"""Neural Collapse at a language model's head: a small causal transformer, tracked with ncserve.

The text is Python's own help pages, which ship with Python (the standard library's
pydoc_data.topics), split into lowercase words and punctuation; every word seen at least
--min-count times is a class (the rest share one <unk> class), so K is the vocabulary, a few
thousand classes. The model (random init, no download) is a 2-layer pre-norm transformer with a
causal mask; its head is nn.Linear(d_model, K), and its features are token-level: the
(batch x context) rows of d_model that enter the head. The measurement split is the whole
text cut into consecutive windows, so every class is present (the metrics need a sample of
each) and each token is measured once.
"""

from __future__ import annotations

import argparse
import collections
import math
import pydoc_data.topics
import re

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ncserve.track import Tracker

SEPARATOR = "<doc>"  # starts every help page, so the first token is a class like the others
UNKNOWN = "<unk>"
WORD = re.compile(r"\w+|[^\w\s]")
SHOWN = ("nc1", "nc1_trace_ratio", "cdnv", "nc2", "nc2w", "nc3", "nc4", "accuracy")


def corpus_tokens(max_tokens: int | None) -> list[str]:
    """The help pages as one stream of lowercase words and punctuation, each page after a
    separator; the first ``max_tokens`` of it when given."""
    tokens: list[str] = []
    for name in sorted(pydoc_data.topics.topics):
        tokens.append(SEPARATOR)
        tokens.extend(WORD.findall(pydoc_data.topics.topics[name].lower()))
        if max_tokens is not None and len(tokens) >= max_tokens:
            return tokens[:max_tokens]
    return tokens


def build_vocabulary(tokens: list[str], min_count: int) -> dict[str, int]:
    """Word -> class id: the words seen at least ``min_count`` times, most frequent first,
    then <unk> for the rest (only when some word is that rare)."""
    counts = collections.Counter(tokens)
    kept = [word for word, count in counts.most_common() if count >= min_count]
    if len(kept) < len(counts):
        kept.append(UNKNOWN)
    return {word: index for index, word in enumerate(kept)}


class TinyLM(nn.Module):
    """A causal transformer language model whose head sees one d_model row per token."""

    def __init__(self, vocab: int, d_model: int, heads: int, layers: int, context: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.position = nn.Embedding(context, d_model)
        block = nn.TransformerEncoderLayer(
            d_model, heads, 4 * d_model, dropout=0.0, batch_first=True, norm_first=True
        )
        self.blocks = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, T) token ids -> (B*T, vocab) next-token logits."""
        length = tokens.shape[1]
        x = self.embed(tokens) + self.position.weight[:length]
        mask = nn.Transformer.generate_square_subsequent_mask(length)
        x = self.norm(self.blocks(x, mask=mask, is_causal=True))
        # Token-level features: the head (and the tracker) sees (B*T) rows of d_model.
        return self.head(x.reshape(-1, x.shape[-1]))


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


# (full run, --quick) for the options whose default depends on --quick.
STEPS = (600, 40)
MEASURE_EVERY = (150, 20)
MAX_TOKENS = (None, 12_000)
BATCH_SIZE = (32, 16)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Defaults train for a minute or two on 2 CPU cores; --quick for a few seconds.",
    )
    parser.add_argument(
        "--steps",
        type=positive,
        help=f"training steps (default {STEPS[0]}; {STEPS[1]} with --quick)",
    )
    parser.add_argument(
        "--measure-every",
        type=positive,
        help=f"measure NC at step 0, every this many steps and at the end (default "
        f"{MEASURE_EVERY[0]}; {MEASURE_EVERY[1]} with --quick)",
    )
    parser.add_argument(
        "--max-tokens",
        type=positive,
        help=f"use only the first this many tokens of the text (default: all of it, about "
        f"114,000; {MAX_TOKENS[1]:,} with --quick)",
    )
    parser.add_argument(
        "--batch-size",
        type=positive,
        help=f"windows per training step (default {BATCH_SIZE[0]}; {BATCH_SIZE[1]} with --quick)",
    )
    parser.add_argument(
        "--min-count",
        type=positive,
        default=2,
        help="a word is a class when seen at least this often, else <unk> (default %(default)s)",
    )
    parser.add_argument(
        "--context", type=positive, default=64, help="tokens per window (default %(default)s)"
    )
    parser.add_argument(
        "--d-model", type=positive, default=128, help="model width, P (default %(default)s)"
    )
    parser.add_argument(
        "--heads", type=positive, default=4, help="attention heads (default %(default)s)"
    )
    parser.add_argument(
        "--layers", type=positive, default=2, help="transformer layers (default %(default)s)"
    )
    parser.add_argument(
        "--lr", type=float, default=3e-3, help="AdamW learning rate (default %(default)s)"
    )
    parser.add_argument(
        "--weight-decay", type=float, default=0.1, help="AdamW weight decay (default %(default)s)"
    )
    parser.add_argument(
        "--quick", action="store_true", help="a shorter text, fewer and smaller steps"
    )
    parser.add_argument("--target", help="HOST:PORT of ncserve (default: an embedded service)")
    parser.add_argument(
        "--run-dir",
        default="runs/tiny-lm",
        help="spool, embedded database and metrics.csv (default %(default)s)",
    )
    parser.add_argument("--run-id", default="tiny-lm", help="run id (default %(default)s)")
    parser.add_argument(
        "--two-pass",
        action="store_true",
        help="keep no features: forward the measurement split twice per measurement (class "
        "sums, then round 2), as for a split too large to hold",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default %(default)s)")
    args = parser.parse_args()
    if args.d_model % args.heads:
        parser.error(f"--d-model ({args.d_model}) must be a multiple of --heads ({args.heads})")
    pick = 1 if args.quick else 0
    args.steps = args.steps or STEPS[pick]
    args.measure_every = args.measure_every or MEASURE_EVERY[pick]
    args.max_tokens = args.max_tokens or MAX_TOKENS[pick]
    args.batch_size = args.batch_size or BATCH_SIZE[pick]
    return args


def main() -> None:
    args = parse_args()
    torch.manual_seed(args.seed)
    words = corpus_tokens(args.max_tokens)
    # Whole windows: the targets are tokens 1..end, each once (token 0 is a separator).
    windows = (len(words) - 1) // args.context
    if windows < 1:
        raise SystemExit(
            f"the text has {len(words)} tokens, fewer than one window of {args.context}"
        )
    words = words[: windows * args.context + 1]
    vocab = build_vocabulary(words, args.min_count)
    unknown = vocab.get(UNKNOWN, -1)
    stream = torch.tensor([vocab.get(word, unknown) for word in words])
    K = len(vocab)
    print(
        f"text: {len(words):,} tokens; vocabulary: K = {K} classes "
        f"(words seen at least {args.min_count} times, plus <unk>)"
    )

    # The measurement split: consecutive windows, so every token after the first is one
    # target, and every class appears among the targets.
    inputs = stream[:-1].reshape(windows, args.context)
    targets = stream[1:].reshape(windows, args.context)
    measure = DataLoader(TensorDataset(inputs, targets), batch_size=64)
    model = TinyLM(K, args.d_model, args.heads, args.layers, args.context)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    generator = torch.Generator().manual_seed(args.seed)

    def batch() -> tuple[torch.Tensor, torch.Tensor]:
        """Windows at random offsets of the text."""
        starts = torch.randint(
            0, stream.numel() - args.context, (args.batch_size,), generator=generator
        )
        rows = starts[:, None] + torch.arange(args.context + 1)
        chunk = stream[rows]
        return chunk[:, :-1], chunk[:, 1:]

    print(
        f"{'step':>5} {'loss':>7} {'N':>7} "
        + " ".join(f"{key:>15}" for key in SHOWN)
        + f" {'nc0':>8}"
    )
    loss = math.nan
    with Tracker(
        model,
        classifier=model.head,
        run_id=args.run_id,
        target=args.target,
        run_dir=args.run_dir,
        metadata={"optimizer": "adamw", "model": "tiny-lm", "dataset": "pydoc-topics"},
        csv=f"{args.run_dir}/metrics.csv",
        two_pass=args.two_pass,
    ) as tracker:
        for step in range(args.steps + 1):
            if step % args.measure_every == 0 or step == args.steps:
                scalars = {} if math.isnan(loss) else {"train_loss": loss}
                m = tracker.measure(measure, step=step, scalars=scalars)
                print(
                    f"{step:>5} {loss:>7.3f} {int(m['num_samples']):>7} "
                    + " ".join(f"{m[key]:>15.4g}" for key in SHOWN)
                    + f" {m['nc0']:>8.3f}",
                    flush=True,
                )
            if step == args.steps:
                break
            x, y = batch()
            output = nn.functional.cross_entropy(model(x), y.reshape(-1))
            optimizer.zero_grad()
            output.backward()
            optimizer.step()
            loss = output.item()


if __name__ == "__main__":
    main()
