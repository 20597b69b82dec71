"""Turn a micro-batch of (packed) rows into model inputs that keep every example isolated.

No attention mask is built here. ``position_ids`` restart at 0 for every example, and transformers'
masking utilities read example boundaries from them (a position that does not follow its predecessor
starts a new example) and build, for each kind of layer, the mask the attention implementation wants:
a block-sparse document mask for flex_attention, a dense block-diagonal mask for sdpa and eager.
Sliding-window layers get the window inside each example, and the mask is made on the model's device,
not in host memory. ``distsft.model.traits`` refuses packing for models whose code does not build masks this way.

Varlen kernels (flash-attention) take no mask but the examples' cumulative lengths over the flattened
batch (``varlen=True``). transformers infers them from position ids only for a batch of one row; with
several rows it would run each row as one sequence, so the lengths are always given explicitly here.

Padding (rows of a micro-batch differ in width) gets positions 0, 1, ... after the row's last example,
so it forms a segment of its own that no real token attends to; its labels are -100.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from distsft.data.tokenize import IGNORE_INDEX


def collate(
    rows: Sequence[dict[str, list[int]]], pad_id: int, varlen: bool = False, multiple_of: int = 1
) -> dict[str, torch.Tensor | int]:
    """``multiple_of``: pad the width to a multiple of it (sequence parallelism slices rows evenly)."""
    width = max(len(r["input_ids"]) for r in rows)
    width = -(-width // multiple_of) * multiple_of
    n = len(rows)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((n, width), dtype=torch.long)
    for b, r in enumerate(rows):
        length = len(r["input_ids"])
        input_ids[b, :length] = torch.as_tensor(r["input_ids"])
        labels[b, :length] = torch.as_tensor(r["labels"])
        position_ids[b, :length] = torch.as_tensor(r["position_ids"])
        position_ids[b, length:] = torch.arange(width - length)
    batch: dict[str, torch.Tensor | int] = {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}
    if varlen:
        lengths = [n for r in rows for n in [*r["seq_lens"], width - len(r["input_ids"])] if n]
        cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
        cu[1:] = torch.tensor(lengths).cumsum(0)
        batch.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max(lengths), max_length_k=max(lengths))
    return batch


def supervised_tokens(rows: Sequence[dict[str, list[int]]]) -> int:
    """Tokens whose next token is supervised (what the loss counts), read from the rows on the host."""
    return sum(sum(1 for t in r["labels"][1:] if t != IGNORE_INDEX) for r in rows)
