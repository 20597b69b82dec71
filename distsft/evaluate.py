"""Token-weighted loss of a model directory on a data set, without DeepSpeed (one process, one device)."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from distsft.config import Config
from distsft.data.collate import collate
from distsft.data.prepare import prepare
from distsft.errors import DistsftError
from distsft.loss import token_loss_sum


@torch.no_grad()
def evaluate_model(model: Any, rows: Any, pad_id: int, attn: str, batch_size: int, device: torch.device) -> dict:
    loss_sum, tokens = 0.0, 0
    for i in range(0, len(rows), batch_size):
        chunk = [rows[j] for j in range(i, min(i + batch_size, len(rows)))]
        batch = {k: v.to(device) for k, v in collate(chunk, pad_id, attn, model.dtype).items()}
        loss, n = token_loss_sum(model, batch)
        loss_sum, tokens = loss_sum + loss.item(), tokens + n
    return {"loss": loss_sum / max(tokens, 1), "tokens": tokens}


def evaluate_dir(cfg: Config, model_dir: str) -> dict[str, Any]:
    """Evaluate ``data.eval_path`` when set, else all of ``data.path``, with the model's own tokenizer."""
    from transformers import AutoModelForCausalLM

    from distsft.model import load_tokenizer, resolve_attn, resolve_dtype

    model_cfg = dataclasses.replace(cfg.model, path=model_dir, tokenizer=None)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    attn = resolve_attn(model_cfg, device)
    tokenizer = load_tokenizer(model_cfg)
    target = cfg.data.eval_path or cfg.data.path
    data_cfg = dataclasses.replace(cfg.data, path=target, eval_path=None, eval_fraction=0.0)
    data = prepare(data_cfg, tokenizer, seed=cfg.train.seed)
    if not len(data.train):
        raise DistsftError("eval: no rows to evaluate")
    model = AutoModelForCausalLM.from_pretrained(
        model_dir,
        dtype=resolve_dtype(model_cfg, device),
        attn_implementation=attn,
        trust_remote_code=model_cfg.trust_remote_code,
    ).to(device)
    model.eval()
    return evaluate_model(model, data.train, tokenizer.pad_token_id, attn, cfg.train.micro_batch_size, device)
