"""Pack examples into rows of at most ``max_len`` tokens (best-fit decreasing), deterministically.

A packed row keeps what training needs to isolate its examples: ``position_ids`` restart at 0 for each
example, and ``seq_lens`` lists the examples' lengths so the collator can build a block-diagonal causal
mask (or flash-attention's cumulative sequence lengths). Without packing, every example is its own row
and the same code paths apply.
"""

from __future__ import annotations

import bisect
import random
from collections.abc import Sequence
from typing import Any

from distsft.data.tokenize import Example


def best_fit_decreasing(lengths: Sequence[int], max_len: int) -> list[list[int]]:
    """Bins of example indices; each example goes to the fullest bin it still fits in.

    O(n log n): open bins are kept sorted by remaining space, so the best fit is one bisect away.
    Ties are broken by index, so the result depends only on ``lengths``.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (remaining space, bin id), sorted
    for i in order:
        n = lengths[i]
        if n > max_len:
            raise ValueError(f"example {i} has {n} tokens, more than max_len={max_len}")
        k = bisect.bisect_left(free, (n, -1))
        if k < len(free):
            space, b = free.pop(k)
            bins[b].append(i)
            space -= n
        else:
            b, space = len(bins), max_len - n
            bins.append([i])
        if space > 0:
            bisect.insort(free, (space, b))
    return bins


def plan_rows(lengths: Sequence[int], max_len: int, seed: int, packing: bool = True) -> list[list[int]]:
    """Which examples (indices) make each row, rows in a seeded random order.

    The shuffle of rows matters: best-fit decreasing puts the longest examples first, and training on
    rows sorted by length would bias early steps.
    """
    bins = best_fit_decreasing(lengths, max_len) if packing else [[i] for i in range(len(lengths))]
    random.Random(seed).shuffle(bins)
    return bins


def pack(examples: Sequence[Example], max_len: int, seed: int, packing: bool = True) -> list[dict[str, list[int]]]:
    """Rows with ``input_ids``, ``labels``, ``position_ids`` and ``seq_lens`` (Python lists: for tests and
    small sets; the pipeline packs Arrow columns with :func:`pack_columns`, the same rows)."""
    bins = plan_rows([len(e.input_ids) for e in examples], max_len, seed, packing)
    rows = []
    for b in bins:
        ids: list[int] = []
        labels: list[int] = []
        pos: list[int] = []
        lens: list[int] = []
        for i in b:
            e = examples[i]
            ids += e.input_ids
            labels += e.labels
            pos += range(len(e.input_ids))
            lens.append(len(e.input_ids))
        rows.append({"input_ids": ids, "labels": labels, "position_ids": pos, "seq_lens": lens})
    return rows


def pack_columns(ids: Any, labels: Any, bins: list[list[int]]) -> dict[str, Any]:
    """The rows of ``bins`` from examples held as Arrow list columns (``ids``, ``labels``), as Arrow list
    columns again: vectorised over tokens, so a chunk of a large corpus packs without Python lists. A
    ``supervised`` count per row lets training count a step's tokens without reading any row."""
    import numpy as np
    import pyarrow as pa

    order = np.fromiter((i for b in bins for i in b), dtype=np.int64)
    per_row = np.fromiter((len(b) for b in bins), dtype=np.int64, count=len(bins))
    taken_ids, taken_labels = ids.take(pa.array(order)), labels.take(pa.array(order))
    lengths = np.diff(np.asarray(taken_ids.offsets)).astype(np.int64)
    flat_ids = np.asarray(taken_ids.values, dtype=np.int32)
    flat_labels = np.asarray(taken_labels.values, dtype=np.int32)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    positions = (np.arange(len(flat_ids), dtype=np.int64) - np.repeat(starts, lengths)).astype(np.int32)
    example_offsets = np.concatenate([[0], np.cumsum(per_row)])  # rows -> examples
    token_offsets = np.concatenate([[0], np.cumsum(lengths)])[example_offsets]  # rows -> tokens

    def column(values, offsets):
        return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(values))

    # Per row, the tokens whose next token is supervised (what the loss counts): the row's supervised
    # labels but its first (a row starts with an example, whose first label is never supervised).
    supervised = flat_labels != -100
    row_starts = token_offsets[:-1]
    counts = np.add.reduceat(supervised.astype(np.int64), row_starts) - supervised[row_starts] if len(bins) else []
    return {
        "input_ids": column(flat_ids, token_offsets),
        "labels": column(flat_labels, token_offsets),
        "position_ids": column(positions, token_offsets),
        "seq_lens": column(lengths.astype(np.int32), example_offsets),
        "supervised": pa.array(np.asarray(counts, dtype=np.int32)),
    }
