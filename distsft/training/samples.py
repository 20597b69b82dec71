"""Samples during training: greedy replies of the engine's model to a few prompts, at eval steps.

Every rank generates every prompt, one at a time (batch one, as ``distsft generate`` does, so a reply
at the last step is the reply of the exported model). Under ZeRO-3 a forward pass is a collective (each
layer's weights are gathered from every rank), so ranks must run the same number of them: transformers'
``synced_gpus`` keeps a rank that met its stop token stepping until every rank has (TRL's
``unwrap_model_for_generation`` relies on the same), and giving every rank the same prompts means none
generates alone. Only rank 0's replies are reported. Packed-attention kernels that need the collator's
example lengths (``distsft_varlen``) are swapped for sdpa while generating: one unpadded sequence needs
no lengths.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

import torch

from distsft.data.prompts import Prompt
from distsft.model.attention import NAME as VARLEN
from distsft.model.generate import stop_ids


@torch.no_grad()
def generate_samples(
    engine: Any,
    prompts: list[Prompt],
    tokenizer: Any,
    max_new_tokens: int,
    device: torch.device,
    autocast: torch.dtype | None,
    synced: bool,
) -> tuple[list[dict[str, str]], float]:
    """``([{eval, prompt, reply}], seconds)``; every rank must call it with the same prompts."""
    start = time.perf_counter()
    engine.eval()
    module = engine.module
    stops = stop_ids(module, tokenizer)
    out = []
    with plain_attention(module), torch.autocast(device.type, dtype=autocast or torch.float32, enabled=bool(autocast)):
        for p in prompts:
            ids = torch.tensor([p.ids], dtype=torch.long, device=device)
            seq = module.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=stops,
                pad_token_id=tokenizer.pad_token_id,
                synced_gpus=synced,
            )
            reply = tokenizer.decode(seq[0, ids.shape[1] :], skip_special_tokens=True).strip()
            out.append({"eval": p.source, "prompt": tokenizer.decode(p.ids), "reply": reply})
    engine.train()
    return out, time.perf_counter() - start


@contextlib.contextmanager
def plain_attention(module: Any) -> Iterator[None]:
    """sdpa in place of the varlen kernel (which reads example lengths only the collator gives)."""
    config = getattr(module, "config", None)
    was = getattr(config, "_attn_implementation", None)
    if was == VARLEN:
        config._attn_implementation = "sdpa"
    try:
        yield
    finally:
        if was == VARLEN:
            config._attn_implementation = was
