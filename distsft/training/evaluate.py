"""Held-out loss: inside a run, on the DeepSpeed engine over every rank (``evaluate``), and of a finished
model directory in one process without DeepSpeed (``distsft eval``: ``evaluate_dir``). Both are the
token-weighted mean of ``distsft/training/loss.py``."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from distsft.config import BatchPlan, Config
from distsft.data.collate import collate
from distsft.data.prepare import named_eval_config, prepare
from distsft.errors import DistsftError
from distsft.model.traits import varlen
from distsft.training.loss import token_loss_sum


@torch.no_grad()
def evaluate_model(model: Any, rows: Any, pad_id: int, batch_size: int, device: torch.device, attn: str) -> dict:
    loss_sum, tokens = 0.0, 0
    for i in range(0, len(rows), batch_size):
        chunk = [rows[j] for j in range(i, min(i + batch_size, len(rows)))]
        batch = collate(chunk, pad_id, varlen=varlen(attn))
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        parts = token_loss_sum(model, batch, mode="chunked")
        loss_sum, tokens = loss_sum + parts.loss_sum.item(), tokens + int(parts.tokens)
    return {"loss": loss_sum / max(tokens, 1), "tokens": tokens}


DEFAULT = "eval_loss"
"""The metric of the default eval set; a named set ``x`` of ``data.evals`` is logged as ``eval_loss/x``."""


def eval_sets(default_rows: Any, named: dict[str, Any]) -> dict[str, Any]:
    """``{metric: rows}`` of a run's eval sets, the default first: ``eval_loss`` is the default set
    (``data.eval_path`` or the ``eval_fraction`` hold-out), or without one the first named set, whose rows
    then appear under both names (and are evaluated once)."""
    sets = {DEFAULT: default_rows} if len(default_rows) else {}
    for name, rows in named.items():
        if not sets:
            sets[DEFAULT] = rows
        sets[f"{DEFAULT}/{name}"] = rows
    return sets


def evaluate_dir(cfg: Config, model_dir: str, eval_name: str | None = None) -> dict[str, Any]:
    """Evaluate ``data.eval_path`` when set, else all of ``data.path``, with the model's own tokenizer;
    ``eval_name``: the named set ``data.evals[eval_name]`` instead."""
    from distsft.model.loading import load_model, load_tokenizer, resolve_dtype, traits_and_attention
    from distsft.model.lora import adapter_base, is_adapter_dir, with_adapter
    from distsft.model.traits import check_training_fit

    adapter = model_dir if is_adapter_dir(model_dir) else None  # a LoRA run's final/: its base, then it
    base = adapter_base(adapter) if adapter else model_dir
    model_cfg = dataclasses.replace(
        cfg.model, path=base, tokenizer=model_dir, gradient_checkpointing=False, quantization="none"
    )
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    traits, attn = traits_and_attention(model_cfg, device)
    check_training_fit(traits, cfg.data.packing, None)
    tokenizer = load_tokenizer(model_cfg)
    if eval_name is not None and eval_name not in cfg.data.evals:
        raise DistsftError(f"--eval {eval_name}: not a name of data.evals ({', '.join(cfg.data.evals) or 'none'})")
    target = cfg.data.evals[eval_name] if eval_name else cfg.data.eval_path or cfg.data.path
    data_cfg = named_eval_config(cfg.data, target)
    data = prepare(data_cfg, tokenizer, seed=cfg.train.seed)
    if not len(data.train):
        raise DistsftError("eval: no rows to evaluate")
    model = load_model(model_cfg, resolve_dtype(model_cfg, device), attn, cfg.train.seed)
    if adapter:
        model = with_adapter(model, adapter)
    model = model.to(device).eval()
    return evaluate_model(model, data.train, tokenizer.pad_token_id, cfg.train.micro_batch_size, device, attn)


@torch.no_grad()
def evaluate(
    engine: Any, rows: Any, plan: BatchPlan, rank: int, to_device: Callable[[list[dict]], dict], device: torch.device
) -> float:
    """Token-weighted loss over every row of one eval set; rows are dealt round-robin so data-parallel groups share the
    work (the workers of a sequence-parallel group each take their slice of the same rows).

    Every rank runs the same number of forward passes (a rank short of rows repeats an empty-label batch),
    because ZeRO-3 forwards are collectives.
    """
    engine.eval()
    micro_batch, groups = plan.micro_batch_size, plan.data_parallel
    mine = list(range(plan.data_rank(rank), len(rows), groups))
    n_batches = -(-len(rows) // (groups * micro_batch))
    sums = torch.zeros(2, dtype=torch.float64, device=device)
    for i in range(n_batches):
        chunk = mine[i * micro_batch : (i + 1) * micro_batch]
        if chunk:
            parts = token_loss_sum(engine, to_device([rows[j] for j in chunk]), mode="chunked")
            sums[0] += parts.loss_sum.double()
            sums[1] += parts.tokens
        else:
            token_loss_sum(engine, to_device([rows[0]]), mode="chunked")
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(sums)
    total, tokens = sums.tolist()
    engine.train()
    return total / max(tokens, 1.0)
