"""Turn a micro-batch of (packed) rows into model inputs that keep every example isolated.

Position ids alone do not isolate packed examples in every attention implementation and mode, so for
``sdpa`` and ``eager`` we pass an explicit 4D block-diagonal causal mask (transformers uses a 4D mask
as given). ``flash_attention_2`` gets no mask: transformers turns restarting ``position_ids`` into
varlen cumulative sequence lengths, which isolates examples without materialising a mask.

Padding tokens form their own segment (attending only to earlier padding), so no query row is fully
masked (which would give NaNs in sdpa); their labels are -100, so they never reach the loss.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from distsft.data.tokenize import IGNORE_INDEX


def collate(
    rows: Sequence[dict[str, list[int]]],
    pad_id: int,
    attn_implementation: str = "sdpa",
    dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    width = max(len(r["input_ids"]) for r in rows)
    n = len(rows)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((n, width), dtype=torch.long)
    segments = torch.full((n, width), -1, dtype=torch.long)
    for b, r in enumerate(rows):
        length = len(r["input_ids"])
        input_ids[b, :length] = torch.tensor(r["input_ids"])
        labels[b, :length] = torch.tensor(r["labels"])
        position_ids[b, :length] = torch.tensor(r["position_ids"])
        position_ids[b, length:] = torch.arange(width - length)
        segments[b, :length] = torch.repeat_interleave(torch.arange(len(r["seq_lens"])), torch.tensor(r["seq_lens"]))
    batch = {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}
    if attn_implementation.startswith("flash_attention"):
        return batch
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    allowed = (segments[:, :, None] == segments[:, None, :]) & causal  # (n, query, key)
    if attn_implementation == "sdpa":
        mask = allowed
    else:  # eager (and other additive-mask implementations)
        mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
    batch["attention_mask"] = mask[:, None, :, :]
    return batch
