"""The SFT objective, shared by training and evaluation."""

from __future__ import annotations

import functools
import inspect
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from distsft.data.tokenize import IGNORE_INDEX


class LossParts(NamedTuple):
    loss_sum: torch.Tensor
    """Summed next-token cross-entropy over the supervised tokens (fp32)."""
    tokens: torch.Tensor
    """How many tokens it sums over (a device tensor: reading it is the caller's choice of host sync)."""
    aux: torch.Tensor | None
    """The router's load-balancing loss of this forward (a mean over its tokens), when asked for."""


def token_loss_sum(model: Any, batch: dict[str, torch.Tensor], router_loss: bool = False) -> LossParts:
    """Summed next-token cross-entropy over supervised tokens, their count, and the router loss if asked.

    A sum, not a mean: the caller divides by the supervised-token count of the whole optimizer step (or
    eval set), which is what makes the loss independent of how rows are packed, batched or sharded.
    Labels are shifted here (Hugging Face convention: ``labels`` align with ``input_ids``).

    Only positions whose next token is supervised go through the output projection and the softmax: prompt
    tokens need hidden states (later tokens attend to them) but no logits. With large vocabularies the
    ``tokens x vocab`` logits (upcast to fp32 for the loss) are the largest activation of the step, so this
    saves time and memory in proportion to the prompt share of the data. A model's final-logit
    soft-capping (Gemma-2) is applied by the model to exactly these logits.
    """
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    if router_loss:
        inputs["output_router_logits"] = True
    labels = batch["labels"][:, 1:]
    keep = labels != IGNORE_INDEX
    if selects_logits(model):
        positions = torch.zeros_like(batch["labels"], dtype=torch.bool)
        positions[:, :-1] = keep
        out = model(**inputs, use_cache=False, logits_to_keep=positions)
        logits = out.logits  # (supervised, vocab)
        target = labels[keep]
    else:
        out = model(**inputs, use_cache=False)
        logits = out.logits[:, :-1].flatten(0, 1)
        target = labels.flatten()
    loss = F.cross_entropy(logits.float(), target, ignore_index=IGNORE_INDEX, reduction="sum")
    return LossParts(loss, keep.sum(), getattr(out, "aux_loss", None) if router_loss else None)


def selects_logits(model: Any) -> bool:
    """Whether the model takes a boolean ``logits_to_keep`` mask (transformers models that slice through
    ``slice_logits_to_keep``, which recent releases use for nearly every causal LM)."""
    module = getattr(model, "module", model)  # a DeepSpeed engine wraps the model
    return _selects_logits(type(module))


@functools.cache
def _selects_logits(cls: type) -> bool:
    if "logits_to_keep" not in inspect.signature(cls.forward).parameters:
        return False
    # Older releases (and a few models) slice with ``hidden[:, slice]``, which takes no boolean mask.
    return hasattr(inspect.getmodule(cls), "slice_logits_to_keep")
