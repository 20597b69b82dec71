"""The training loop: run unchanged by ``--local`` (world size 1) and by every Ray worker.

``train`` is two parts: a ``Run`` is set up once (device, process group, model, DeepSpeed engine, input
pipeline, the resume point, the loss kernel), then ``Run.run_steps`` runs the steps.

Loss normalisation is exact: the loss of an optimizer step is the sum of token losses over every
supervised token of the global batch, divided by their global count. Every rank knows that count
without asking the others (the sampler makes the global batch a function of the step, and the rows'
counts are computed once), and back-propagates ``sum_of_token_losses * (grad_accum * world_size) /
global_count`` per micro-batch; DeepSpeed divides by ``grad_accum`` in ``backward`` and averages
gradients over ranks, which cancels the factor.

The hot loop never waits for the device inside a step: inputs for the next step are collated on a
thread into pinned memory (``batches.py``), losses stay on the device, and records are read (one host
sync and one all-reduce for all pending steps, ``step.py``) only where a figure is logged, every
``train.log_every`` steps, before a checkpoint or an eval, and at the end. A stop request (SIGTERM,
SLURM's USR1, Ctrl-C) reaches every rank within two steps through an asynchronous all-reduce of a host
flag (``StopPoll``), and makes that step a read point that saves and ends the run.

This package never imports the launcher: what it needs from where it runs comes in a ``WorkerContext``.
"""

from __future__ import annotations

import functools
import math
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from distsft import checkpoint
from distsft.checkpoint import Location, ResumePlan
from distsft.config import BatchPlan, Config
from distsft.data.collate import collate
from distsft.data.prompts import Prompt, prompts_from_file, prompts_from_rows
from distsft.data.sampler import total_steps
from distsft.metrics.records import SAMPLES
from distsft.model.flops import flops_model, peak_flops
from distsft.model.loading import (
    base_path,
    count_parameters,
    load_model,
    load_tokenizer,
    resolve_dtype,
    traits_and_attention,
)
from distsft.model.traits import ModelTraits, varlen
from distsft.training import sequence_parallel
from distsft.training.batches import Prefetcher, RowTable
from distsft.training.distributed import (
    StopPoll,
    agree,
    collective_timeout_s,
    init_distributed,
    pick_device,
    seed_everything,
    upload_group,
)
from distsft.training.engine import (
    DeepSpeedPlan,
    Precision,
    build_engine,
    choose_precision,
    deepspeed_plan,
    render_ds_config,
)
from distsft.training.evaluate import DEFAULT, evaluate
from distsft.training.loss import LossChoice, add_loss_targets, choose_loss_kernel, head_fusable
from distsft.training.profiling import StepProfiler, phase
from distsft.training.samples import generate_samples
from distsft.training.step import (
    Diverged,
    HangWatch,
    PendingStep,
    StepClock,
    divergence,
    inject_fault,
    peak_memory_mb,
    poisoned,
    read_pending,
    train_step,
)
from distsft.training.tiling import tile_mlps


@dataclass
class WorkerContext:
    """What the loop needs to know about where it runs; the launcher fills it in."""

    checkpoint_dir: Location
    """Where checkpoints live; every rank must see the same place (a shared directory or a bucket)."""
    resume: ResumePlan
    """The driver's decision: this launch's id and the checkpoint it continues from."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    report: Callable[[dict[str, Any]], None] = lambda record: None
    """Receives this rank's per-step record; the record sink merges records across ranks."""
    should_stop: Callable[[], bool] = lambda: False
    """Asked on rank 0 where records are read; True saves a checkpoint of that step and ends the run."""
    flush: Callable[[], None] = lambda: None
    """Sends the records ``report`` buffered, without waiting (every rank, at the same steps)."""
    wait: Callable[[], None] = lambda: None
    """Returns once every record sent is written: before a checkpoint (which must never get ahead of the
    records it covers) and at the end."""


class Run:
    """One worker's run: ``__init__`` sets it up once (device, process group, model, DeepSpeed engine,
    input pipeline, the resume point, the loss kernel); ``run_steps`` runs the optimizer steps."""

    def __init__(self, cfg: Config, train_rows: Any, evals: dict[str, Any], ctx: WorkerContext) -> None:
        # DeepSpeed calls torch.distributed APIs that torch now marks deprecated, once per bucket per step.
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")
        os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
        self.cfg, self.ctx, self.evals = cfg, ctx, evals
        self.device = device = pick_device(ctx.local_rank)
        init_distributed(device)
        seed_everything(cfg.train.seed)
        self.plan = plan = cfg.batch_plan(ctx.world_size)
        sp = sequence_parallel.new_groups(plan.sequence_parallel)
        self.steps = total_steps(len(train_rows), plan, cfg.train.max_steps, cfg.train.epochs)
        ds = deepspeed_plan(cfg, ctx.world_size)
        self.precision = choose_precision(cfg, device, resolve_dtype(cfg.model, device), ds)
        traits, attn = traits_and_attention(cfg.model, device, self.precision.compute)
        sequence_parallel.check(plan.sequence_parallel, traits, attn)
        tokenizer = load_tokenizer(cfg.model)
        tokens_per_micro_batch = cfg.train.micro_batch_size * cfg.data.max_seq_len // plan.sequence_parallel
        self.engine, self._keep_alive = _engine(
            cfg,
            ctx,
            ds,
            plan,
            self.precision,
            device,
            traits,
            attn,
            sp,
            tokens_per_micro_batch,
            self.steps,
            len(tokenizer),
        )  # the ZeRO-3 config that transformers holds by a weak reference lives as long as the engine
        self.clip = cfg.train.max_grad_norm if ds.loop_clips else None
        self.aux_coef = router_aux_coef(cfg, traits)

        # Sequence parallelism needs every row's example lengths (the whole row's), whatever the kernel.
        lengths = varlen(attn) or sp is not None
        shard = functools.partial(sequence_parallel.shard_batch, size=sp.size, rank=sp.rank) if sp else None
        n_params = count_parameters(self.engine.module)
        table = RowTable(train_rows, flops_of=flops_model(self.engine.module, n_params).per_example)
        pad = tokenizer.pad_token_id
        self.feed = Prefetcher(table, plan, ctx.rank, cfg.train.seed, pad, lengths, device.type == "cuda", shard)

        def to_device(rows: list[dict]) -> dict[str, Any]:
            batch = collate(rows, pad, lengths, plan.sequence_parallel)
            batch = add_loss_targets(shard(batch) if shard else batch)
            return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

        self.to_device = to_device
        resume_from = ctx.resume.for_worker(ctx.checkpoint_dir)
        self.start_step = 0
        if resume_from is not None:
            self.start_step = checkpoint.resume_engine(
                self.engine, resume_from, cfg.lora.r > 0, ctx.world_size, ds.layout, ds.stage
            )
        if resume_from is not None and ctx.rank == 0:
            print(f"resumed from {resume_from} at step {self.start_step}", flush=True)
        self.loss = choose_loss_kernel(
            cfg.train.cross_entropy,
            zero_stage=ds.stage,
            compiled=cfg.train.compile,
            tokens_per_micro_batch=tokens_per_micro_batch,
            vocab_size=traits.vocab_size,
            device_memory=_memory_bytes(device),
            head_fusable=head_fusable(self.engine.module, traits.rescales_logits),
        )
        if ctx.rank == 0:
            print(describe_engine(ds, self.precision, plan, attn, cfg.model.tiled_mlp, self.loss), flush=True)
        device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else None
        self.peak_flops = peak_flops(device_name, cfg.logging.peak_tflops)
        profile_dir = Path(cfg.output_dir) / "profile"
        self.profiler = StepProfiler(cfg.logging.profile_steps, profile_dir, ctx.rank, device.type == "cuda")
        self.best_by = best_metric(cfg)
        self.save = _saver(cfg, ctx, self.engine, tokenizer, self.best_by)
        # the best so far, from the checkpoints' signed manifests: a resumed run goes on comparing with it
        best = checkpoint.best_checkpoint(ctx.checkpoint_dir, self.best_by) if resume_from and self.best_by else None
        self.best = best.value if best else math.inf
        self.tokenizer, self.prompts = tokenizer, self._prompts(tokenizer, sp is not None)
        self.synced = ds.stage == 3 and ctx.world_size > 1
        self.stop_poll = StopPoll(ctx.should_stop, ctx.rank, ctx.world_size)
        self.last_saved = f"step {self.start_step}" if resume_from is not None else None
        self.summary: dict[str, Any] = {
            "steps": self.steps,
            "parameters": n_params,
            "start_step": self.start_step,
            "device": device_name,
            "attention": attn,
            "loss_kernel": self.loss.kernel,
            # what the final export is written in: the training's compute dtype, as a hub checkpoint would be
            "dtype": {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(self.precision.compute, "fp32"),
        }

    def _prompts(self, tokenizer: Any, sequence_parallel: bool) -> list[Prompt]:
        """What samples answer: ``train.samples.path``'s prompts, else the eval sets' first ones."""
        samples = self.cfg.train.samples
        if not samples.count or not self.evals:
            return []
        if sequence_parallel:  # a sequence is split across the group's ranks: generation would need the same
            if self.ctx.rank == 0:
                print("train.samples: off under sequence parallelism", flush=True)
            return []
        if samples.path:
            return prompts_from_file(samples.path, tokenizer, samples.count)
        unique: dict[int, tuple[str, Any]] = {}
        for key, rows in self.evals.items():  # a set under two names goes by its own (eval_loss/<name>)
            unique[id(rows)] = (key, rows)
        return prompts_from_rows(dict(unique.values()), samples.count)

    def _evaluate(self, record: dict[str, Any]) -> dict[str, float]:
        """Every eval set's loss (a set under two names is evaluated once), then the samples, into ``record``;
        returns the losses by metric."""
        scores: dict[str, float] = {}
        done: dict[int, float] = {}
        for key, rows in self.evals.items():
            if id(rows) not in done:
                done[id(rows)] = evaluate(self.engine, rows, self.plan, self.ctx.rank, self.to_device, self.device)
            scores[key] = done[id(rows)]
        record["eval_loss"] = scores[DEFAULT]
        record.update({k: v for k, v in scores.items() if k != DEFAULT})  # eval_loss/<name>
        if self.prompts:
            autocast = self.precision.compute if self.precision.autocast else None
            samples, seconds = generate_samples(
                self.engine,
                self.prompts,
                self.tokenizer,
                self.cfg.train.samples.max_new_tokens,
                self.device,
                autocast,
                self.synced,
            )
            record["samples_s"] = seconds
            if self.ctx.rank == 0:  # the record sink writes them to samples.jsonl, not metrics.jsonl
                record[SAMPLES] = samples
        return scores

    def close(self) -> None:
        self.feed.close()
        self.profiler.close()

    def run_steps(self) -> dict[str, Any]:
        """The optimizer steps from ``start_step``; returns the summary (``stopped_at`` on a stop request)."""
        clock = StepClock(self.device)
        pending: list[PendingStep] = []
        start = time.perf_counter()
        watch = HangWatch(collective_timeout_s())
        try:
            summary = self._steps(clock, pending, start, watch)
        finally:
            watch.disarm()
        self.stop_poll.close()
        return summary

    def _steps(self, clock: StepClock, pending: list[PendingStep], start: float, watch: HangWatch) -> dict[str, Any]:
        cfg, ctx, engine, plan, summary = self.cfg, self.ctx, self.engine, self.plan, self.summary
        for step in range(self.start_step, self.steps):
            done = step + 1
            watch.arm()
            engine.train()
            self.profiler.step_begins(done)
            clock.mark("start")
            with phase("data"):
                inputs = self.feed.get(step, then=done if done < self.steps else None)
                batches = inputs.to_device(self.device)
            clock.mark("data")
            scale = plan.grad_accum_steps * plan.world_size / max(inputs.global_supervised, 1)
            scale = math.nan if poisoned(ctx.rank, done) else scale
            lr = engine.get_lr()[0]  # the rate this step's update uses; the scheduler moves on in step()
            inject_fault(ctx.rank, done)
            compute = self.precision.compute
            sums, norm = train_step(engine, batches, scale, self.aux_coef, self.loss.kernel, compute, clock, self.clip)
            record = {
                "step": done,
                "lr": lr,
                "tokens": inputs.global_supervised,
                "input_tokens": inputs.global_tokens,
                "flops": inputs.global_flops,
                "peak_flops": self.peak_flops,
                "world_size": ctx.world_size,
                "peak_mem_mb": peak_memory_mb(self.device),
                "rank": ctx.rank,
                "resumed_from": self.start_step,
            }
            grad_norm = norm if self.clip is not None else engine.get_global_grad_norm()
            pending.append(PendingStep(record, sums, grad_norm, clock.take()))
            profile = self.profiler.step_ends(done)
            if profile:
                print(f"profile of steps {self.profiler.first}-{self.profiler.last}: {profile}", flush=True)
            every, every_eval, last = cfg.checkpoint.every_steps, cfg.train.eval_every, done == self.steps
            wants_eval = bool(self.evals) and (bool(every_eval and done % every_eval == 0) or last)
            saves = (last and cfg.checkpoint.final) or bool(every and done % every == 0)
            stopping = self.stop_poll.poll()  # a stop request within two steps, whatever log_every is
            if not (done % cfg.train.log_every == 0 or wants_eval or saves or last or stopping):
                continue
            records = read_pending(pending, clock, plan, self.aux_coef, self.device, start)
            pending.clear()
            scores = self._evaluate(records[-1]) if wants_eval else {}
            # a new best is saved at once (every rank sees the same all-reduced losses): its weights exist
            new_best = self.best_by in scores and scores[self.best_by] < self.best
            if new_best:
                self.best = scores[self.best_by]
            for r in records:
                ctx.report(r)
            ctx.flush()
            diverged = divergence(records, self.last_saved)
            if diverged:
                ctx.wait()  # the records up to that step are written first
                raise Diverged(diverged)
            summary["last"] = records[-1]
            stop = stopping or agree(ctx.should_stop(), ctx.rank, self.device)  # every rank: the same step
            if stop or saves or new_best:
                ctx.wait()
                self.save(done, scores)
                self.last_saved = f"step {done}"
            if stop:
                summary["stopped_at"] = done
                return summary
        if self.evals and "last" in summary:
            summary["eval_loss"] = summary["last"].get("eval_loss")
        ctx.wait()
        return summary


def train(cfg: Config, train_rows: Any, evals: dict[str, Any], ctx: WorkerContext) -> dict[str, Any]:
    """Train on this worker's share of ``train_rows``; returns the run's summary (the same on every rank).
    ``evals``: the eval sets by metric (``evaluate.eval_sets``)."""
    run = Run(cfg, train_rows, evals, ctx)
    try:
        return run.run_steps()
    finally:
        run.close()


def _engine(
    cfg: Config,
    ctx: WorkerContext,
    ds: DeepSpeedPlan,
    plan: BatchPlan,
    precision: Precision,
    device: torch.device,
    traits: ModelTraits,
    attn: str,
    sp: sequence_parallel.SequenceGroup | None,
    tokens_per_micro_batch: int,
    steps: int,
    vocab_size: int,
) -> tuple[Any, Any]:
    """The model (LoRA, tiled MLPs, the sequence-parallel attention wrapper) inside its DeepSpeed engine."""
    ds_config = render_ds_config(cfg, ds, plan, precision, device, traits.hidden_size or None)
    runs_attn = sequence_parallel.register(sp, attn) if sp else attn

    def build_model() -> Any:
        model = load_model(cfg.model, precision.weights, runs_attn, cfg.train.seed, cfg.lora, vocab_size)
        if precision.autocast:  # what trains is held in fp32 (peft upcasts its adapters; whole layers too)
            for p in model.parameters():
                if p.requires_grad and p.dtype != torch.float32:
                    p.data = p.data.float()
        tiled = cfg.model.tiled_mlp and tile_mlps(model, tokens_per_micro_batch, traits.hidden_size)
        if cfg.model.tiled_mlp and not tiled and ctx.rank == 0:
            print("model.tiled_mlp: this model has no dense MLP to tile (its experts are not tiled)", flush=True)
        return model

    return build_engine(cfg, ds, ds_config, build_model, total_steps=steps)


def best_metric(cfg: Config) -> str | None:
    """The metric ``checkpoint.best_by`` names (``eval_loss`` or ``eval_loss/<name>``)."""
    by = cfg.checkpoint.best_by
    return None if by is None else DEFAULT if by == DEFAULT else f"{DEFAULT}/{by}"


def _saver(
    cfg: Config, ctx: WorkerContext, engine: Any, tokenizer: Any, best_by: str | None
) -> Callable[[int, dict[str, float]], None]:
    """``save(step, scores)``: a complete checkpoint of the engine, with what export needs beside the weights,
    and the step's eval losses in its (signed) manifest, which is where the best checkpoint is read from."""
    adapters = cfg.lora.r > 0
    meta = {**ctx.resume.manifest_meta(), "config": cfg.to_dict()}

    def write_hf(out: Path) -> None:  # model config, generation config, tokenizer; a LoRA run's adapter config
        module = engine.module
        for part in (module.config, tokenizer, generation_config(module, tokenizer)):
            if part is not None:
                part.save_pretrained(out)
        if adapters:
            from distsft.model.lora import save_adapter_config

            save_adapter_config(module, out, base_path(cfg.model, cfg.train.seed))

    def save(step: int, scores: dict[str, float]) -> None:
        evals = {"evals": scores, "best_by": best_by} if scores and best_by else {"evals": scores} if scores else {}
        checkpoint.save(
            engine,
            ctx.checkpoint_dir,
            step,
            {**meta, **evals},
            cfg.checkpoint.keep_last,
            write_hf,
            adapters,
            upload_group,
            best_by=best_by,
        )

    return save


def generation_config(module: Any, tokenizer: Any) -> Any:
    """The model's generation config, stopping at the chat template's end-of-turn token as well as EOS
    (a base model's config knows only EOS; its new ``<|im_end|>`` ends every trained reply)."""
    import copy

    from distsft.model.loading import end_of_turn_id

    gen = getattr(module, "generation_config", None)
    eot = end_of_turn_id(tokenizer)
    if gen is None or eot is None:
        return gen
    ids = gen.eos_token_id if isinstance(gen.eos_token_id, list) else [gen.eos_token_id]
    if eot in ids:
        return gen
    gen = copy.deepcopy(gen)
    gen.eos_token_id = [i for i in ids if i is not None] + [eot]
    return gen


def _memory_bytes(device: torch.device) -> int:
    """The memory the loss kernel is chosen against: the GPU's, or this machine's."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def describe_engine(
    ds: DeepSpeedPlan, precision: Precision, plan: BatchPlan, attn: str, tiled_mlp: bool, loss: LossChoice
) -> str:
    amp = f", {str(precision.compute).removeprefix('torch.')} autocast" if precision.autocast else ""
    weights = str(precision.weights).removeprefix("torch.")
    if precision.autocast and precision.weights != torch.float32:
        weights = f"{weights} frozen base, float32 adapter"
    line = f"engine: DeepSpeed {ds.describe()} x {plan.world_size}, {weights} weights{amp}, attention {attn}"
    if plan.sequence_parallel > 1:
        line += f" (Ulysses sequence parallel {plan.sequence_parallel} x data parallel {plan.data_parallel})"
    line += ", tiled MLP" if tiled_mlp else ""
    return line + f", loss {loss.kernel} ({loss.why})"


def router_aux_coef(cfg: Config, traits: ModelTraits) -> float:
    """The router loss weight: the config's, else the model's own; 0 for models without a router loss."""
    if not traits.router_loss:
        return 0.0
    coef = cfg.train.router_aux_loss_coef
    return traits.router_aux_loss_coef if coef is None else coef
