"""The training loop: run unchanged by ``--local`` (world size 1) and by every Ray worker.

Loss normalisation is exact: the loss of an optimizer step is the sum of token losses over every
supervised token of the global batch, divided by their global count. Every rank knows that count
without asking the others (the sampler makes the global batch a function of the step, and the rows'
counts are computed once), and back-propagates ``sum_of_token_losses * (grad_accum * world_size) /
global_count`` per micro-batch; DeepSpeed divides by ``grad_accum`` in ``backward`` and averages
gradients over ranks, which cancels the factor.

The hot loop never waits for the device inside a step: inputs for the next step are collated on a
thread into pinned memory (``distsft/batches.py``), losses stay on the device, and records are read
(one host sync and one all-reduce for all pending steps) only where a figure is logged, every
``train.log_every`` steps, before a checkpoint or an eval, and at the end. A stop request (SIGTERM,
Ctrl-C) is honoured at those points too.
"""

from __future__ import annotations

import functools
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
from distsft.checkpoint import storage
from distsft.config import Config
from distsft.data.collate import collate
from distsft.data.sampler import total_steps
from distsft.model.flops import flops_model, peak_flops
from distsft.model.loading import base_path, count_parameters, load_model, load_tokenizer, model_plan, resolve_dtype
from distsft.model.traits import varlen
from distsft.training import sequence_parallel
from distsft.training.batches import Prefetcher, RowTable
from distsft.training.engine import build_engine, init_distributed, plan_precision, render_ds_config
from distsft.training.loss import token_loss_sum
from distsft.training.profiling import StepProfiler, phase
from distsft.training.tiling import tile_mlps


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
    """Sends the records ``report`` buffered, without waiting (every rank, at the same steps)."""
    wait: Callable[[], None] = lambda: None
    """Returns once every record sent is written: before a checkpoint (which must never get ahead of the
    records it covers) and at the end."""


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


class StepClock:
    """Where a step's time goes: waiting for inputs, forward + backward, the optimizer. On a GPU the marks
    are CUDA events, read only when records are (so timing adds no sync); on a CPU, wall-clock times."""

    MARKS = ("start", "data", "fwd_bwd", "optimizer")

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.marks: dict[str, Any] = {}

    def mark(self, name: str) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks[name] = event
        else:
            self.marks[name] = time.perf_counter()

    def take(self) -> dict[str, Any]:
        marks, self.marks = self.marks, {}
        return marks

    def split(self, marks: dict[str, Any]) -> dict[str, float]:
        """Seconds per phase (after the device has passed the last mark)."""

        def between(a: str, b: str) -> float:
            if self.cuda:
                return marks[a].elapsed_time(marks[b]) / 1e3
            return marks[b] - marks[a]

        return {
            "step_time_s": between("start", "optimizer"),
            "data_wait_s": between("start", "data"),
            "fwd_bwd_s": between("data", "fwd_bwd"),
            "optimizer_s": between("fwd_bwd", "optimizer"),
        }


@dataclass
class PendingStep:
    """A finished step whose device-side figures have not been read yet."""

    record: dict[str, Any]
    sums: torch.Tensor
    """This rank's (loss sum, router-loss sum) on the device; summed over ranks when read."""
    grad_norm: Any
    marks: dict[str, Any]


def train(cfg: Config, train_rows: Any, eval_rows: Any, ctx: WorkerContext) -> dict[str, Any]:
    # DeepSpeed calls torch.distributed APIs that torch now marks deprecated, once per bucket per step.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    device = pick_device(ctx.local_rank)
    init_distributed(device)
    seed_everything(cfg.train.seed)
    plan = cfg.batch_plan(ctx.world_size)
    sp = sequence_parallel.new_groups(plan.sequence_parallel)
    steps = total_steps(len(train_rows), plan, cfg.train.max_steps, cfg.train.epochs)
    precision = plan_precision(cfg, device, resolve_dtype(cfg.model, device), ctx.world_size)
    traits, attn = model_plan(cfg.model, device, precision.compute)
    sequence_parallel.check(plan.sequence_parallel, traits, attn)
    aux_coef = router_aux_coef(cfg, traits)
    tokenizer = load_tokenizer(cfg.model)

    ds_config = render_ds_config(cfg, plan, precision, device, traits.hidden_size or None)
    weights = precision.weights
    runs_attn = sequence_parallel.register(sp, attn) if sp else attn
    tiles = (cfg.train.micro_batch_size * cfg.data.max_seq_len // plan.sequence_parallel, traits.hidden_size)

    def build_model() -> Any:
        model = load_model(cfg.model, weights, runs_attn, cfg.train.seed, cfg.lora)
        if cfg.model.tiled_mlp and not tile_mlps(model, *tiles) and ctx.rank == 0:
            print("model.tiled_mlp: this model has no dense MLP to tile (its experts are not tiled)", flush=True)
        return model

    engine, _hf_ds = build_engine(cfg, ds_config, build_model, total_steps=steps)
    adapters = cfg.lora.r > 0
    n_params = count_parameters(engine.module)
    fm = flops_model(engine.module, n_params)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    peak = peak_flops(device_name, cfg.logging.peak_tflops)
    table = RowTable(train_rows, flops_of=fm.per_example)
    # Sequence parallelism needs every row's example lengths (the whole row's), whatever the kernel.
    lengths = varlen(attn) or sp is not None
    shard = functools.partial(sequence_parallel.shard_batch, size=sp.size, rank=sp.rank) if sp else None
    feed = Prefetcher(
        table, plan, ctx.rank, cfg.train.seed, tokenizer.pad_token_id, lengths, device.type == "cuda", shard
    )

    def to_device(rows: list[dict]) -> dict[str, Any]:
        batch = collate(rows, tokenizer.pad_token_id, lengths, plan.sequence_parallel)
        batch = shard(batch) if shard else batch
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    root = ctx.checkpoint_dir or Path(cfg.output_dir) / "checkpoints"
    root = root if storage.is_remote(root) else Path(root)  # an s3:// URI is no path
    start_step = 0
    resume_from = checkpoint.pick_resume(cfg.checkpoint.resume, root, ctx.run_meta.get("run_id", ""))
    if resume_from is not None:
        start_step = checkpoint.load(engine, resume_from, frozen_base=adapters)
        if ctx.rank == 0:
            print(f"resumed from {resume_from} at step {start_step}", flush=True)
    hf_parts = [engine.module.config, tokenizer, getattr(engine.module, "generation_config", None)]
    if adapters:
        hf_parts.append(AdapterConfig(engine.module, base_path(cfg.model, cfg.train.seed)))
    meta = {**ctx.run_meta, "config": cfg.to_dict()}

    def save(step: int) -> None:
        parts = [p for p in hf_parts if p is not None]
        checkpoint.save(engine, root, step, meta, cfg.checkpoint.keep_last, parts, frozen_base=adapters)

    if ctx.rank == 0:
        print(describe_engine(ds_config, precision, plan, attn, cfg.model.tiled_mlp), flush=True)
    clock = StepClock(device)
    # DeepSpeed without ZeRO leaves clipping to the loop (the norm stays on the device); ZeRO clips itself
    without_zero = ds_config.get("zero_optimization", {}).get("stage", 0) == 0 and ds_config["gradient_clipping"] == 0
    clip = cfg.train.max_grad_norm if without_zero else None
    pending: list[PendingStep] = []
    loss_mode = cross_entropy_mode(cfg, ds_config)
    start = time.perf_counter()
    summary: dict[str, Any] = {
        "steps": steps,
        "parameters": n_params,
        "start_step": start_step,
        "device": device_name,
        "attention": attn,
    }
    profiler = StepProfiler(
        cfg.logging.profile_steps, Path(cfg.output_dir) / "profile", ctx.rank, device.type == "cuda"
    )
    try:
        for step in range(start_step, steps):
            engine.train()
            profiler.step_begins(step + 1)
            clock.mark("start")
            with phase("data"):
                inputs = feed.get(step, then=step + 1 if step + 1 < steps else None)
                batches = inputs.to_device(device)
            clock.mark("data")
            if step == start_step and loss_mode == "fused?":
                loss_mode = settle_fused(engine, batches[0], precision.compute, device)
            scale = plan.grad_accum_steps * plan.world_size / max(inputs.global_supervised, 1)
            lr = engine.get_lr()[0]  # the rate this step's update uses; the scheduler moves on in step()
            inject_fault(ctx.rank, step + 1)
            sums, norm = train_step(engine, batches, scale, aux_coef, loss_mode, precision.compute, clock, clip)
            grad_norm = norm if clip is not None else engine.get_global_grad_norm()
            record = {
                "step": step + 1,
                "lr": lr,
                "tokens": inputs.global_supervised,
                "input_tokens": inputs.global_tokens,
                "flops": inputs.global_flops,
                "peak_flops": peak,
                "world_size": ctx.world_size,
                "peak_mem_mb": peak_memory_mb(device),
                "rank": ctx.rank,
                "resumed_from": start_step,
            }
            pending.append(PendingStep(record, sums, grad_norm, clock.take()))
            summary_file = profiler.step_ends(step + 1)
            if summary_file:
                print(f"profile of steps {profiler.first}-{profiler.last}: {summary_file}", flush=True)
            done, every = step + 1, cfg.checkpoint.every_steps
            every_eval = cfg.train.eval_every and done % cfg.train.eval_every == 0
            wants_eval = bool(len(eval_rows)) and (every_eval or done == steps)  # the last step always has one
            saves = (done == steps and cfg.checkpoint.final) or bool(every and done % every == 0)
            if not (done % cfg.train.log_every == 0 or wants_eval or saves or done == steps):
                continue
            records = read_pending(pending, clock, plan, aux_coef, device, start)
            pending.clear()
            if wants_eval:
                records[-1]["eval_loss"] = evaluate(engine, eval_rows, plan, ctx.rank, to_device, device)
            for record in records:
                ctx.report(record)
            ctx.flush()
            summary["last"] = records[-1]
            stop = stop_requested(ctx, device)
            if stop or saves:
                ctx.wait()
                save(done)
            if stop:
                summary["stopped_at"] = done
                return summary
    finally:
        feed.close()
        profiler.close()
    if len(eval_rows) and "last" in summary:
        summary["eval_loss"] = summary["last"].get("eval_loss")
    ctx.wait()
    return summary


def train_step(
    engine: Any,
    batches: list[dict[str, Any]],
    scale: float,
    aux_coef: float,
    loss_mode: str,
    compute_dtype: torch.dtype,
    clock: StepClock,
    clip: float | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One optimizer step over this rank's micro-batches: (loss sum, router-loss sum) on the device, and the
    gradient norm when the loop clips. Nothing here waits for the device."""
    sums = torch.zeros(2, dtype=torch.float32, device=batches[0]["input_ids"].device)
    norm = None
    for i, b in enumerate(batches):
        last = i == len(batches) - 1
        with phase("forward"):
            parts = token_loss_sum(engine, b, aux_coef > 0, mode=loss_mode, compute_dtype=compute_dtype)
            objective = parts.loss_sum * scale
            sums[0] += parts.loss_sum.detach()
            if parts.aux is not None:
                # DeepSpeed divides by grad_accum and averages over ranks: the step adds the coefficient
                # times the mean router loss over every micro-batch of the global batch.
                objective = objective + aux_coef * parts.aux
                sums[1] += parts.aux.detach().float()
        with phase("backward"):
            engine.backward(objective)
        if last:
            clock.mark("fwd_bwd")
        with phase("optimizer"):
            if last and clip is not None:
                norm = clip_gradients(engine, clip)
            engine.step()  # the optimizer runs at the last micro-batch only
    clock.mark("optimizer")
    return sums, norm


def describe_engine(ds_config: dict[str, Any], precision: Any, plan: Any, attn: str, tiled_mlp: bool) -> str:
    stage = ds_config.get("zero_optimization", {}).get("stage", 0)
    amp = f", {str(precision.compute).removeprefix('torch.')} autocast" if precision.autocast else ""
    zero = "without ZeRO" if stage == 0 else f"ZeRO stage {stage}"
    weights = str(precision.weights).removeprefix("torch.")
    line = f"engine: DeepSpeed {zero} x {plan.world_size}, {weights} weights{amp}, attention {attn}"
    if plan.sequence_parallel > 1:
        line += f" (Ulysses sequence parallel {plan.sequence_parallel} x data parallel {plan.data_parallel})"
    return line + (", tiled MLP" if tiled_mlp else "")


@dataclass
class AdapterConfig:
    """Saved with every LoRA checkpoint: the adapter's config, naming the base it trains on."""

    model: Any
    base: str

    def save_pretrained(self, out: Path) -> None:
        from distsft.model.lora import save_adapter_config

        save_adapter_config(self.model, out, self.base)


def clip_gradients(engine: Any, max_norm: float) -> torch.Tensor:
    """Clip to ``max_norm`` (0: only measure) and return the global norm, all on the device (DeepSpeed
    without ZeRO would read the norm back to the host). Squares are summed in fp64, so the norm does not
    depend on how the gradients were summed (1 worker x 4 micro-batches or 2 x 2)."""
    grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
    norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, 2, dtype=torch.float64)))
    if max_norm > 0:
        torch._foreach_mul_(grads, (max_norm / (norm + 1e-6)).clamp(max=1.0).to(grads[0].dtype))
    return norm


def read_pending(
    pending: list[PendingStep], clock: StepClock, plan: Any, aux_coef: float, device: torch.device, start: float
) -> list[dict[str, Any]]:
    """The pending steps' records, complete: one all-reduce and one host sync for all of them."""
    sums = torch.stack([p.sums for p in pending])
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(sums)
    norms = [p.grad_norm for p in pending]
    sums = sums.tolist()  # the sync: the device has finished every pending step
    elapsed = time.perf_counter() - start
    out = []
    for p, (loss_sum, aux_sum), norm in zip(pending, sums, norms, strict=True):
        record = dict(p.record)
        record["loss"] = loss_sum / max(record["tokens"], 1)
        record["grad_norm"] = float(norm) if norm is not None else None
        if aux_coef > 0:
            record["aux_loss"] = aux_sum / (plan.grad_accum_steps * plan.world_size)
        record.update(clock.split(p.marks))
        record["elapsed_s"] = elapsed
        out.append(record)
    return out


def cross_entropy_mode(cfg: Config, ds_config: dict[str, Any]) -> str:
    """``train.cross_entropy``; ``auto``: fused where the whole output layer is on every rank (ZeRO 0-2,
    confirmed on the first batch), chunked under ZeRO-3 and with ``train.compile``."""
    mode = cfg.train.cross_entropy
    if mode != "auto":
        return mode
    if ds_config.get("zero_optimization", {}).get("stage") == 3 or cfg.train.compile:
        return "chunked"
    return "fused?"


def settle_fused(engine: Any, batch: dict[str, Any], dtype: torch.dtype, device: torch.device) -> str:
    """The fused loss only where it computes this model's loss (every rank must agree)."""
    from distsft.training.loss import fused_matches

    ok = fused_matches(engine, batch, rtol=1e-4 if dtype == torch.float32 else 2e-2, compute_dtype=dtype)
    (votes,) = all_sum([0.0 if ok else 1.0], device)
    return "fused" if votes == 0 else "chunked"


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
def evaluate(engine: Any, rows: list[dict], plan: Any, rank: int, to_device, device) -> float:
    """Token-weighted loss over every eval row; rows are dealt round-robin so data-parallel groups share the
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
            sums += torch.stack([parts.loss_sum.double(), parts.tokens.double()])
        else:
            token_loss_sum(engine, to_device([rows[0]]), mode="chunked")
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(sums)
    total, tokens = sums.tolist()
    engine.train()
    return total / max(tokens, 1.0)
