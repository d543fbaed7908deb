"""Capturing what a measurement needs from the model: the classifier (found, and gathered
whole under FSDP, ZeRO-3 or DTensor sharding), the features entering it over a loader (a
forward hook, in eval mode; in lockstep across ranks when a forward is a collective), and
the collectives the ranks use to agree. The Tracker (tracker.py) does the rounds with the
service and the local fallback on top of this.

Legend: N samples on this rank, K classes, P feature dim; ``h_NP`` the classifier's inputs,
``w_KP`` / ``b_K`` its weight and bias.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn


def _joined(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    if len(parts) == 1:
        return parts[0]
    return torch.cat([h for h, _ in parts]), torch.cat([y for _, y in parts])


class TrackerError(ValueError):
    """A tracker that cannot work as configured (no classifier found, wrong feature shape)."""


def find_classifier(model: nn.Module) -> nn.Linear:
    """The last ``nn.Linear`` registered in ``model`` (the usual place of the classifier)."""
    last = None
    for module in model.modules():
        if isinstance(module, nn.Linear):
            last = module
    if last is None:
        raise TrackerError(
            f"no nn.Linear found in {type(model).__name__}; pass classifier=<the final layer>"
        )
    return last


def _split_batch(batch: Any) -> tuple[Any, torch.Tensor]:
    """(inputs, labels) from a (x, y) pair or a mapping with a 'labels' (or 'label') key."""
    if isinstance(batch, Mapping):
        for key in ("labels", "label", "y"):
            if key in batch:
                inputs = {k: v for k, v in batch.items() if k != key}
                return inputs, batch[key]
        raise TrackerError(f"batch mapping has no 'labels' key (keys: {sorted(batch)})")
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[0], batch[1]
    raise TrackerError(f"a batch must be (inputs, labels) or a mapping, got {type(batch).__name__}")


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


class ModelCapture:
    """The model side of a Tracker (mixed into it)."""

    model: nn.Module
    classifier: nn.Linear
    num_classes: int
    feature_dim: int
    world_size: int

    def _fsdp1_units(self) -> list[nn.Module]:
        """The FSDP1 units of ``model`` that contain the classifier, outermost first."""
        if not dist.is_available():
            return []
        from torch.distributed.fsdp import FullyShardedDataParallel

        # modules() is pre-order, so a later match is nested deeper; the last one owns W, b.
        return [
            module
            for module in self.model.modules()
            if isinstance(module, FullyShardedDataParallel)
            and any(inner is self.classifier for inner in module.modules())
        ]

    def _forward_is_collective(self) -> bool:
        """Whether a forward pass gathers parameters from all ranks (FSDP, ZeRO-3, DTensor)."""
        if not (is_distributed() and self.world_size > 1):
            return False
        from torch.distributed.fsdp import FullyShardedDataParallel

        if any(isinstance(m, FullyShardedDataParallel) for m in self.model.modules()):
            return True
        return any(
            hasattr(p, "ds_id") or hasattr(p, "full_tensor") for p in self.model.parameters()
        )

    @contextlib.contextmanager
    def _full_classifier(self) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        """The whole W and b, gathered first under DeepSpeed ZeRO-3 or FSDP (collective)."""
        fsdp1_units = self._fsdp1_units()
        if fsdp1_units:
            from torch.distributed.fsdp import FullyShardedDataParallel

            # FSDP1 keeps W and b in a flat parameter: a 1-D shard per rank with
            # use_orig_params=True, views valid only inside forward otherwise. Summon the
            # unit that owns them, and the root unit first (its own parameters only): before
            # the first forward, summoning a nested unit alone would make FSDP take it for
            # the root. Copies, because FSDP frees that storage on exit, which torch refuses
            # once numpy has seen it.
            with contextlib.ExitStack() as stack:
                for unit in dict.fromkeys((fsdp1_units[0], fsdp1_units[-1])):
                    stack.enter_context(
                        FullyShardedDataParallel.summon_full_params(
                            unit, recurse=False, writeback=False
                        )
                    )
                weight, bias = self.classifier.weight, self.classifier.bias
                yield weight.detach().clone(), None if bias is None else bias.detach().clone()
            return
        weight, bias = self.classifier.weight, self.classifier.bias
        params = [p for p in (weight, bias) if p is not None]
        if any(hasattr(p, "ds_id") for p in params):
            import deepspeed

            with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
                yield weight.detach(), None if bias is None else bias.detach()
            return
        if hasattr(weight, "full_tensor"):  # DTensor (FSDP2 / tensor parallel)
            full_w: torch.Tensor = getattr(weight, "full_tensor")()  # noqa: B009
            full_b = None if bias is None else getattr(bias, "full_tensor")()  # noqa: B009
            yield full_w.detach(), None if full_b is None else full_b.detach()
            return
        yield weight.detach(), None if bias is None else bias.detach()

    def classifier_arrays(self) -> tuple[np.ndarray, np.ndarray | None]:
        """(W, b) as float64 numpy arrays (a collective under ZeRO-3/FSDP)."""
        with self._full_classifier() as (weight, bias):
            w_KP = weight.float().cpu().numpy().astype(np.float64)
            b_K = None if bias is None else bias.float().cpu().numpy().astype(np.float64)
        if w_KP.shape != (self.num_classes, self.feature_dim):
            raise TrackerError(
                f"classifier weight has shape {w_KP.shape}, expected "
                f"({self.num_classes}, {self.feature_dim}); is it sharded without a gather?"
            )
        return w_KP, b_K

    def features(self, loader: Iterable[Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """(h_NP, y_N int64): the classifier's inputs over ``loader``, in eval mode, on the
        device (and in the dtype) the model made them."""
        chunks = list(self.feature_chunks(loader, max_bytes=None))
        if chunks:
            return chunks[0]  # everything, in one chunk
        device = self.classifier.weight.device
        return (
            torch.zeros((0, self.feature_dim), device=device),
            torch.zeros(0, dtype=torch.int64, device=device),
        )

    def feature_chunks(
        self, loader: Iterable[Any], max_bytes: int | None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The classifier's inputs over ``loader`` as (h, y) chunks of whole batches, each
        held until it reaches ``max_bytes`` of features (None: one chunk of everything), so a
        split larger than memory can be measured chunk by chunk."""
        held: list[tuple[torch.Tensor, torch.Tensor]] = []
        held_bytes = 0
        for h, y in self._feature_batches(loader):
            held.append((h, y))
            held_bytes += h.numel() * h.element_size()
            if max_bytes is not None and held_bytes >= max_bytes:
                yield _joined(held)
                held, held_bytes = [], 0
        if held:
            yield _joined(held)

    @torch.no_grad()
    def _feature_batches(
        self, loader: Iterable[Any]
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(h_BP, y_B int64) per batch of ``loader``, in eval mode, where the model made them."""
        captured: list[torch.Tensor] = []

        def hook(_module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            captured.append(inputs[0].detach())

        was_training = self.model.training
        lockstep = self._forward_is_collective()
        handle = self.classifier.register_forward_pre_hook(hook)
        self.model.eval()
        try:
            batches = iter(loader)
            batch = next(batches, None)
            if lockstep and not self._all_true(batch is not None):
                empty = [r for r, has in enumerate(self._gather(batch is not None)) if not has]
                raise TrackerError(
                    "with FSDP, ZeRO-3 or DTensor parameters every rank needs at least one "
                    f"measurement batch (a forward pass is a collective); ranks {empty} got none"
                )
            last_inputs: Any = None
            while True:
                # In lockstep every rank joins the all-reduce each round, batch or not.
                if lockstep:
                    if self._all_true(batch is None):
                        break
                elif batch is None:
                    break
                captured.clear()
                if batch is None:
                    # Sharded parameters are gathered with every rank in each forward, so a
                    # rank whose shard ran out repeats its last batch (output discarded)
                    # until every rank is done.
                    self._forward(last_inputs)
                else:
                    inputs, y = _split_batch(batch)
                    self._forward(inputs)
                    if len(captured) != 1:
                        raise TrackerError(
                            f"the classifier ran {len(captured)} times in one forward "
                            "pass; pass classifier=<the final nn.Linear>"
                        )
                    yield self._checked_batch(captured[0], torch.as_tensor(y).reshape(-1))
                    last_inputs = inputs
                batch = next(batches, None)
        finally:
            handle.remove()
            self.model.train(was_training)

    def _checked_batch(self, c: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # nn.Linear acts on the last dimension: a (B, T, P) input (a language model's
        # tokens) is B x T samples, each with its own label (y of shape (B, T)).
        h = c.reshape(-1, c.shape[-1]) if c.ndim != 2 else c
        if h.shape[1] != self.feature_dim:
            raise TrackerError(
                f"classifier inputs have {h.shape[1]} features per sample, expected "
                f"{self.feature_dim}"
            )
        if y.shape[0] != h.shape[0]:
            raise TrackerError(
                f"got {y.shape[0]} labels for {h.shape[0]} feature rows "
                "(one label per sample is needed)"
            )
        # The features stay where the model made them: on a GPU both rounds run there.
        return h, y.to(device=h.device, dtype=torch.int64)

    def _forward(self, inputs: Any) -> None:
        if isinstance(inputs, Mapping):
            self.model(**inputs)
        else:
            self.model(inputs)

    # -- collectives (no-ops in a single process) --------------------------------------------

    def _collective_device(self) -> torch.device:
        if dist.get_backend() == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def _all_true(self, flag: bool) -> bool:
        return self._all_true_many(flag)[0]

    def _all_true_many(self, *flags: bool) -> list[bool]:
        """For each flag, whether it holds on every rank (one all-reduce for all of them)."""
        if not (is_distributed() and self.world_size > 1):
            return list(flags)
        t = torch.tensor(
            [1 if f else 0 for f in flags], dtype=torch.int32, device=self._collective_device()
        )
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return [bool(v) for v in t.tolist()]

    def _barrier(self) -> None:
        if is_distributed() and self.world_size > 1:
            dist.barrier()

    def _gather(self, obj: Any) -> list[Any]:
        if not (is_distributed() and self.world_size > 1):
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    # -- measurement ------------------------------------------------------------------------
