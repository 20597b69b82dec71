"""One optimizer step and its figures: the micro-batches' forward and backward, clipping, the step clock,
and reading the pending steps' records (the only host sync, every ``train.log_every`` steps)."""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from distsft.config import BatchPlan
from distsft.errors import DistsftError
from distsft.training.loss import LossKernel, token_loss_sum
from distsft.training.profiling import phase


def peak_memory_mb(device: torch.device) -> float:
    """Peak accelerator memory on GPU; peak resident host memory (what ZeRO-3 saves on CPU) otherwise."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    from distsft.host import peak_rss_mb

    return peak_rss_mb()


def inject_fault(rank: int, step: int) -> None:
    """Failure injection for tests: ``DISTSFT_FAIL_AT=RANK:STEP[:MARKER]`` makes that rank raise at that
    step, ``DISTSFT_STALL_AT=...`` stops it there (SIGSTOP: alive, silent, in the middle of the group);
    with a marker file either happens once (the marker is created), so a restarted run can finish. Several
    specs are separated by commas; at most one fires per call, the first whose marker is not there yet."""
    specs = [
        (var, spec) for var in ("DISTSFT_FAIL_AT", "DISTSFT_STALL_AT") for spec in os.environ.get(var, "").split(",")
    ]
    for var, spec in specs:
        if not spec:
            continue
        parts = spec.split(":", 2)
        if parts[:2] != [str(rank), str(step)]:
            continue
        if len(parts) == 3:
            marker = Path(parts[2])
            if marker.exists():
                continue
            marker.touch()
        if var == "DISTSFT_STALL_AT":
            import signal

            # One fault per visit of a step: the stop takes effect a moment after kill() returns, and a
            # second spec for the same step must wait for the next visit (after a restart), not fire now.
            os.kill(os.getpid(), signal.SIGSTOP)
            return
        raise RuntimeError(f"injected failure ({var}={spec})")


def poisoned(rank: int, step: int) -> bool:
    """Fault injection for tests: ``DISTSFT_NAN_AT=RANK:STEP`` makes that rank's gradients of that step NaN
    (a diverging run, without waiting for one)."""
    return f"{rank}:{step}" in os.environ.get("DISTSFT_NAN_AT", "").split(",")


class Diverged(DistsftError):
    """A non-finite loss or gradient norm: the weights after that step are not worth keeping."""


def divergence(records: list[dict[str, Any]], last_checkpoint: str | None) -> str | None:
    """What to say of the first record whose loss or gradient norm is not finite, or None. The loop asks
    where records are read, which is always before a checkpoint is written, so no checkpoint holds the
    weights a non-finite step produced, and none is rotated away by one that would."""
    for r in records:
        bad = [f"{k} {r[k]}" for k in ("loss", "grad_norm") if r.get(k) is not None and not math.isfinite(r[k])]
        if bad:
            return (
                f"step {r['step']}: {' and '.join(bad)}; the run stops without saving these weights (last "
                f"checkpoint: {last_checkpoint or 'none'}); lower train.lr or raise train.warmup_steps, then "
                "launch again to continue from that checkpoint"
            )
    return None


class HangWatch:
    """Every thread's Python stack into this rank's log when an optimizer step (with its save) runs longer
    than the collective timeout allows: a rank waiting in a collective on a stopped peer then says where it
    waits before the collective's own timeout ends it. faulthandler's watchdog is a C thread, so it writes
    even while this one is blocked inside gloo or NCCL without the GIL."""

    def __init__(self, timeout_s: float | None) -> None:
        # Just before the collective times out: the stacks must land before the process is torn down.
        self.after = None if timeout_s is None else max(1.0, timeout_s - min(5.0, timeout_s * 0.2))

    def arm(self) -> None:
        if self.after is not None:
            import faulthandler

            faulthandler.dump_traceback_later(self.after, repeat=False)

    def disarm(self) -> None:
        if self.after is not None:
            import faulthandler

            faulthandler.cancel_dump_traceback_later()


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


def train_step(
    engine: Any,
    batches: list[dict[str, Any]],
    scale: float,
    aux_coef: float,
    loss_kernel: LossKernel,
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
            parts = token_loss_sum(engine, b, aux_coef > 0, mode=loss_kernel, compute_dtype=compute_dtype)
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
    pending: list[PendingStep], clock: StepClock, plan: BatchPlan, aux_coef: float, device: torch.device, start: float
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
