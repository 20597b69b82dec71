"""The SFT objective, shared by training and evaluation."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from distsft.data.tokenize import IGNORE_INDEX


def token_loss_sum(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over supervised tokens, and their count.

    A sum, not a mean: the caller divides by the supervised-token count of the whole optimizer step (or
    eval set), which is what makes the loss independent of how rows are packed, batched or sharded.
    Labels are shifted here (Hugging Face convention: ``labels`` align with ``input_ids``).
    """
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs, use_cache=False).logits
    labels = batch["labels"][:, 1:]
    loss = F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return loss, int((labels != IGNORE_INDEX).sum())
