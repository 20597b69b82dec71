"""The training loop: run unchanged by ``--local`` (world size 1) and by every Ray worker.

Loss normalisation is exact: the loss of an optimizer step is the sum of token losses over every
supervised token of the global batch, divided by their global count. Each rank counts its supervised
tokens for the whole step up front and all-reduces the count, then back-propagates
``sum_of_token_losses * (grad_accum * world_size) / global_count`` per micro-batch; DeepSpeed divides by
``grad_accum`` in ``backward`` and averages gradients over ranks, which cancels the factor.
"""

from __future__ import annotations

import os
import random
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from distsft import checkpoint
from distsft.config import Config
from distsft.data.collate import collate, supervised_tokens
from distsft.data.sampler import rank_micro_batches, step_rows, total_steps
from distsft.engine import build_engine, init_distributed, render_ds_config
from distsft.flops import flops_model, peak_flops, rows_flops
from distsft.loss import token_loss_sum
from distsft.model import count_parameters, load_model, load_tokenizer, model_plan, resolve_dtype
from distsft.traits import varlen


@dataclass
class WorkerContext:
    """What the loop needs to know about where it runs; the launcher fills it in."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    report: Callable[[dict[str, Any]], None] = lambda record: None
    """Receives this rank's per-step record; the coordinator merges records across ranks."""
    checkpoint_dir: str | None = None
    """Where checkpoints live (default ``output_dir/checkpoints``); every rank must see the same path."""
    should_stop: Callable[[], bool] = lambda: False
    """Asked on rank 0 after every step; True saves a checkpoint of that step and ends the run."""
    run_meta: dict[str, Any] = field(default_factory=dict)
    """Recorded in every checkpoint's manifest: run id, data fingerprint (what resume compares)."""
    flush: Callable[[], None] = lambda: None
    """Sends records ``report`` buffered; called by every rank at the same steps (before saves, at the end)."""


def pick_device(local_rank: int) -> torch.device:
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def peak_memory_mb(device: torch.device) -> float:
    """Peak accelerator memory on GPU; peak resident host memory (what ZeRO-3 saves on CPU) otherwise."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def inject_fault(rank: int, step: int) -> None:
    """Failure injection for tests: ``DISTSFT_FAIL_AT=RANK:STEP[:MARKER]`` makes that rank raise at that
    step; with a marker file it fails only once (the marker is created), so a restarted run can finish."""
    spec = os.environ.get("DISTSFT_FAIL_AT")
    if not spec:
        return
    parts = spec.split(":", 2)
    if parts[:2] != [str(rank), str(step)]:
        return
    if len(parts) == 3:
        marker = Path(parts[2])
        if marker.exists():
            return
        marker.touch()
    raise RuntimeError(f"injected failure (DISTSFT_FAIL_AT={spec})")


def all_sum(values: Sequence[float], device: torch.device) -> list[float]:
    t = torch.tensor(list(values), dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t.tolist()


def train(cfg: Config, train_rows: list[dict], eval_rows: list[dict], ctx: WorkerContext) -> dict[str, Any]:
    # DeepSpeed calls torch.distributed APIs that torch now marks deprecated, once per bucket per step.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")
    device = pick_device(ctx.local_rank)
    init_distributed(device)
    seed_everything(cfg.train.seed)
    plan = cfg.batch_plan(ctx.world_size)
    steps = total_steps(len(train_rows), plan, cfg.train.max_steps, cfg.train.epochs)
    dtype = resolve_dtype(cfg.model, device)
    traits, attn = model_plan(cfg.model, device.type)
    aux_coef = router_aux_coef(cfg, traits)
    tokenizer = load_tokenizer(cfg.model)

    ds_config = render_ds_config(cfg, plan, dtype, device, traits.hidden_size or None)
    engine, _hf_ds = build_engine(
        cfg, ds_config, lambda: load_model(cfg.model, dtype, attn, cfg.train.seed), total_steps=steps
    )
    n_params = count_parameters(engine.module)
    fm = flops_model(engine.module, n_params)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    peak = peak_flops(device_name, cfg.logging.peak_tflops)

    def to_device(rows: list[dict]) -> dict[str, Any]:
        batch = collate(rows, tokenizer.pad_token_id, varlen=varlen(attn))
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    root = Path(ctx.checkpoint_dir or Path(cfg.output_dir) / "checkpoints")
    start_step = 0
    resume_from = checkpoint.pick_resume(cfg.checkpoint.resume, root, ctx.run_meta.get("run_id", ""))
    if resume_from is not None:
        start_step = checkpoint.load(engine, resume_from)
        if ctx.rank == 0:
            print(f"resumed from {resume_from} at step {start_step}", flush=True)
    hf_parts = [engine.module.config, tokenizer, getattr(engine.module, "generation_config", None)]
    meta = {**ctx.run_meta, "config": cfg.to_dict()}

    def save(step: int) -> None:
        checkpoint.save(engine, root, step, meta, cfg.checkpoint.keep_last, [p for p in hf_parts if p is not None])

    start = time.perf_counter()
    summary: dict[str, Any] = {
        "steps": steps,
        "parameters": n_params,
        "start_step": start_step,
        "device": device_name,
        "attention": attn,
    }
    for step in range(start_step, steps):
        engine.train()
        t0 = time.perf_counter()
        micro = rank_micro_batches(step_rows(len(train_rows), plan, step, cfg.train.seed), plan, ctx.rank)
        micro_rows = [[train_rows[i] for i in mb] for mb in micro]
        batches = [to_device(rows) for rows in micro_rows]
        local_sup = sum(supervised_tokens(rows) for rows in micro_rows)
        local_tokens = sum(len(r["input_ids"]) for rows in micro_rows for r in rows)
        local_flops = sum(rows_flops(fm, rows) for rows in micro_rows)
        (global_sup,) = all_sum([local_sup], device)
        scale = plan.grad_accum_steps * plan.world_size / max(global_sup, 1.0)
        lr = engine.get_lr()[0]  # the rate this step's update uses; the scheduler moves on in step()
        loss_sum, aux_sum = 0.0, 0.0
        inject_fault(ctx.rank, step + 1)
        for b in batches:
            parts = token_loss_sum(engine, b, router_loss=aux_coef > 0)
            objective = parts.loss_sum * scale
            if parts.aux is not None:
                # DeepSpeed divides by grad_accum and averages over ranks: the step adds the coefficient
                # times the mean router loss over every micro-batch of the global batch.
                objective = objective + aux_coef * parts.aux
                aux_sum += parts.aux.item()
            engine.backward(objective)
            engine.step()
            loss_sum += parts.loss_sum.item()
        step_time = time.perf_counter() - t0
        g_loss, g_tokens, g_flops, g_aux = all_sum([loss_sum, local_tokens, local_flops, aux_sum], device)
        grad_norm = engine.get_global_grad_norm()
        record = {
            "step": step + 1,
            "loss": g_loss / max(global_sup, 1.0),
            "grad_norm": float(grad_norm) if grad_norm is not None else None,
            "lr": lr,
            "tokens": int(global_sup),
            "input_tokens": int(g_tokens),
            "flops": g_flops,
            "peak_flops": peak,
            "world_size": ctx.world_size,
            "step_time_s": step_time,
            "elapsed_s": time.perf_counter() - start,
            "peak_mem_mb": peak_memory_mb(device),
            "rank": ctx.rank,
        }
        if aux_coef > 0:
            record["aux_loss"] = g_aux / (plan.grad_accum_steps * plan.world_size)
        every_eval = cfg.train.eval_every and (step + 1) % cfg.train.eval_every == 0
        if eval_rows and (every_eval or step + 1 == steps):  # the last step always has an eval loss
            record["eval_loss"] = evaluate(engine, eval_rows, plan.micro_batch_size, ctx, to_device, device)
        ctx.report(record)
        summary["last"] = record
        done, every = step + 1, cfg.checkpoint.every_steps
        stop = stop_requested(ctx, device)
        if stop or done == steps or (every and done % every == 0):
            ctx.flush()
            save(done)
        if stop:
            summary["stopped_at"] = done
            return summary

    if eval_rows and "last" in summary:
        summary["eval_loss"] = summary["last"]["eval_loss"]
    ctx.flush()
    return summary


def router_aux_coef(cfg: Config, traits: Any) -> float:
    """The router loss weight: the config's, else the model's own; 0 for models without a router loss."""
    if not traits.router_loss:
        return 0.0
    coef = cfg.train.router_aux_loss_coef
    return traits.router_aux_loss_coef if coef is None else coef


def stop_requested(ctx: WorkerContext, device: torch.device) -> bool:
    """Rank 0 decides and every rank follows, so all of them save the same step (a collective)."""
    (flag,) = all_sum([1.0 if ctx.rank == 0 and ctx.should_stop() else 0.0], device)
    return flag > 0


@torch.no_grad()
def evaluate(engine: Any, rows: list[dict], micro_batch: int, ctx: WorkerContext, to_device, device) -> float:
    """Token-weighted loss over every eval row; rows are dealt round-robin so ranks share the work.

    Every rank runs the same number of forward passes (a rank short of rows repeats an empty-label batch),
    because ZeRO-3 forwards are collectives.
    """
    engine.eval()
    mine = list(range(ctx.rank, len(rows), ctx.world_size))
    n_batches = -(-len(rows) // (ctx.world_size * micro_batch))
    loss_sum, count = 0.0, 0
    for i in range(n_batches):
        chunk = mine[i * micro_batch : (i + 1) * micro_batch]
        if chunk:
            parts = token_loss_sum(engine, to_device([rows[j] for j in chunk]))
            loss_sum, count = loss_sum + parts.loss_sum.item(), count + int(parts.tokens)
        else:
            token_loss_sum(engine, to_device([rows[0]]))
    total, tokens = all_sum([loss_sum, count], device)
    engine.train()
    return total / max(tokens, 1.0)
