"""The input pipeline of the training loop: a step's micro-batches, collated ahead of time.

While step s computes, a background thread reads step s+1's rows, collates them into pinned host memory
and hands them over; the loop then copies them to the device with ``non_blocking`` copies, which run
alongside the compute already queued. Nothing in here waits for the device, and the per-step figures
the loop needs (supervised tokens of the whole global batch, input tokens, model FLOPs) are counted
from the rows on the host, so no collective and no device sync is needed to learn them: every rank
knows the global batch, because the sampler is a function of the step alone.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from distsft.config import BatchPlan
from distsft.data.collate import collate
from distsft.data.sampler import rank_micro_batches, step_rows
from distsft.data.tokenize import IGNORE_INDEX
from distsft.training.loss import add_loss_targets


@dataclass
class StepBatches:
    step: int
    micro_batches: list[dict[str, Any]]
    """This rank's micro-batches, host tensors (pinned on a GPU machine) until ``to_device``."""
    global_supervised: int
    """Supervised tokens of the whole global batch: the loss's denominator."""
    global_tokens: int
    global_flops: float

    def to_device(self, device: torch.device) -> list[dict[str, Any]]:
        return [
            {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in mb.items()}
            for mb in self.micro_batches
        ]


class RowTable:
    """Packed rows, with per-row counts (supervised tokens, tokens, model FLOPs) computed once and
    vectorised over Arrow columns; a step's figures are sums of these."""

    def __init__(self, rows: Any, flops_of: Callable[[np.ndarray], np.ndarray] | None = None) -> None:
        if hasattr(rows, "with_format"):  # a datasets.Dataset: rows as numpy arrays, not Python lists
            self.rows = rows.with_format("numpy")
            seq_lens = _flat(rows, "seq_lens")
            if "supervised" in rows.column_names:  # counted when packed: no row's tokens are read here
                self.supervised = np.asarray(rows.data.column("supervised").to_numpy(), dtype=np.int64)
                self.tokens = _lengths(rows, "input_ids")
            else:
                self.supervised, self.tokens = _supervised(_flat(rows, "labels"))
        else:
            self.rows = rows
            seq_lens = _flat_lists([r["seq_lens"] for r in rows])
            self.supervised, self.tokens = _supervised(_flat_lists([r["labels"] for r in rows]))
        if flops_of is None:
            self.flops = np.zeros(len(self.tokens))
        else:
            ex_values, ex_starts, _ = seq_lens
            self.flops = np.add.reduceat(flops_of(ex_values), ex_starts)

    def __len__(self) -> int:
        return len(self.tokens)

    def get(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        return [self.rows[int(i)] for i in indices]


def _supervised(labels: tuple[np.ndarray, np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(tokens whose next token is supervised, tokens) per row."""
    values, starts, lengths = labels
    supervised = np.add.reduceat((values != IGNORE_INDEX).astype(np.int64), starts) if len(values) else values
    # A row starts with an example, whose first label is always -100: labels[1:] and labels agree.
    return supervised - (values[starts] != IGNORE_INDEX), lengths


def _lengths(ds: Any, column: str) -> np.ndarray:
    import pyarrow.compute as pc

    return pc.list_value_length(ds.data.column(column)).to_numpy().astype(np.int64)


def _flat(ds: Any, column: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(all values, each row's start in them, each row's length) of a list column, without Python lists."""
    import pyarrow as pa
    import pyarrow.compute as pc

    col = ds.data.table.column(column).combine_chunks() if hasattr(ds.data, "table") else ds.data.column(column)
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    lengths = pc.list_value_length(col).to_numpy(zero_copy_only=False).astype(np.int64)
    values = col.flatten().to_numpy(zero_copy_only=False).astype(np.int64)
    return values, np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64), lengths


def _flat_lists(lists: list) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    lengths = np.array([len(x) for x in lists], dtype=np.int64)
    values = np.concatenate([np.asarray(x, dtype=np.int64) for x in lists]) if lists else np.zeros(0, np.int64)
    return values, np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64), lengths


class Prefetcher:
    """Collates the micro-batches of the step after the one being trained, on one background thread."""

    def __init__(
        self,
        table: RowTable,
        plan: BatchPlan,
        rank: int,
        seed: int,
        pad_id: int,
        varlen: bool,
        pin: bool,
        shard: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    ) -> None:
        """``shard``: cuts a collated micro-batch to this worker's slice (sequence parallelism)."""
        self.table, self.plan, self.rank, self.seed = table, plan, rank, seed
        self.pad_id, self.varlen, self.pin, self.shard = pad_id, varlen, pin, shard
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="distsft-batches")
        self._next: tuple[int, concurrent.futures.Future] | None = None

    def build(self, step: int) -> StepBatches:
        """Step ``step``'s inputs (0-based), computed on the calling thread."""
        global_rows = step_rows(len(self.table), self.plan, step, self.seed)
        mine = rank_micro_batches(global_rows, self.plan, self.rank)
        micro = []
        for indices in mine:
            batch = collate(self.table.get(indices), self.pad_id, self.varlen, self.plan.sequence_parallel)
            if self.shard is not None:
                batch = self.shard(batch)
            batch = add_loss_targets(batch)  # here, so the loss needs no boolean mask on the device
            if self.pin:
                batch = {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            micro.append(batch)
        idx = np.asarray(global_rows)
        return StepBatches(
            step=step,
            micro_batches=micro,
            global_supervised=int(self.table.supervised[idx].sum()),
            global_tokens=int(self.table.tokens[idx].sum()),
            global_flops=float(self.table.flops[idx].sum()),
        )

    def get(self, step: int, then: int | None = None) -> StepBatches:
        """Step ``step``'s inputs (waiting only if they are not ready yet), and start on ``then``."""
        if self._next is not None and self._next[0] == step:
            result = self._next[1].result()
        else:
            result = self.build(step)
        self._next = (then, self._pool.submit(self.build, then)) if then is not None else None
        return result

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
