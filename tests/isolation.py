"""The numerical proof that packing isolates examples: a packed batch must give exactly the loss, logits
and gradients of its examples run one by one."""

from __future__ import annotations

import torch

from distsft.data.collate import collate
from distsft.data.packing import pack
from distsft.data.tokenize import IGNORE_INDEX, Example
from distsft.model.traits import varlen
from distsft.training.loss import token_loss_sum


def make_examples(lengths: list[int], vocab: int = 500) -> list[Example]:
    out = []
    for i, n in enumerate(lengths):
        ids = [(i * 7 + j * 13) % (vocab - 3) + 3 for j in range(n)]
        labels = [IGNORE_INDEX] + ids[1:]
        out.append(Example(ids, labels))
    return out


def _forward(model, rows, device):
    batch = collate(rows, pad_id=0, varlen=varlen(model.config._attn_implementation))
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits
    return logits.float(), token_loss_sum(model, batch)


def packed_vs_alone(model, lengths: list[int], max_len: int, device="cpu"):
    """Run one packed row (plus a shorter, padded row) and then each example alone; returns
    ``(packed_loss, alone_loss, max logit difference, max relative gradient difference)``."""
    examples = make_examples(lengths, model.config.vocab_size)
    rows = pack(examples, max_len=max_len, seed=0)
    assert len(rows) == 1 and len(rows[0]["seq_lens"]) == len(lengths)
    row = rows[0]
    batch_rows = [row, pack(make_examples([5], model.config.vocab_size), max_len, 0)[0]]
    model.zero_grad()
    logits, parts = _forward(model, batch_rows, device)
    parts.loss_sum.backward()
    packed_grads = {k: p.grad.detach().clone() for k, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    alone_loss, logit_diff, start = 0.0, 0.0, 0
    for length in row["seq_lens"]:
        alone = {
            "input_ids": row["input_ids"][start : start + length],
            "labels": row["labels"][start : start + length],
            "position_ids": list(range(length)),
            "seq_lens": [length],
        }
        single_logits, single = _forward(model, [alone], device)
        logit_diff = max(logit_diff, (logits[0, start : start + length] - single_logits[0]).abs().max().item())
        single.loss_sum.backward()
        alone_loss += single.loss_sum.item()
        start += length
    _, pad = _forward(model, [batch_rows[1]], device)
    pad.loss_sum.backward()
    alone_loss += pad.loss_sum.item()
    grad_diff = 0.0
    for k, p in model.named_parameters():
        if k in packed_grads:
            scale = p.grad.abs().max().item() or 1.0
            grad_diff = max(grad_diff, (packed_grads[k] - p.grad).abs().max().item() / scale)
    return parts.loss_sum.item(), alone_loss, logit_diff, grad_diff
