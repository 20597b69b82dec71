"""The driver's view of a run: merge per-rank step records into one line of ``metrics.jsonl``.

One schema for every launch mode: ``--local`` hands a single record per step, a Ray run hands one per
rank; the merged record is token-weighted where it averages and takes the slowest worker's time for
throughput, because the slowest worker sets the pace of a synchronous step.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any


def merge(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Fields that every rank computed identically (loss, grad norm, lr, token counts) come from rank 0."""
    first = min(records, key=lambda r: r.get("rank", 0))
    times = [r["step_time_s"] for r in records]
    slowest = max(times)
    drop = ("rank", "step_time_s", "node", "node_id", "pid", "peak_flops", "world_size", "resumed_from")
    merged = {k: v for k, v in first.items() if k not in drop}
    merged["step_time_s"] = slowest
    if "flops" in first:
        # Model FLOP/s per device over the slowest worker's time: a synchronous step takes that long for all.
        per_device = first["flops"] / (slowest * first.get("world_size", len(records))) if slowest > 0 else 0.0
        merged["tflops_per_device"] = per_device / 1e12
        peak = first.get("peak_flops")
        merged["mfu"] = per_device / peak if peak else None
    if "peak_mem_mb" in first:
        merged["peak_mem_mb"] = max(r["peak_mem_mb"] for r in records)
    merged["tokens_per_s"] = first["tokens"] / slowest if slowest > 0 else 0.0
    merged["input_tokens_per_s"] = first["input_tokens"] / slowest if slowest > 0 else 0.0
    if len(records) > 1:
        if "peak_mem_mb" in first:
            merged["peak_mem_mb_by_rank"] = [r["peak_mem_mb"] for r in sorted(records, key=lambda r: r["rank"])]
        merged["fastest_worker_s"] = min(times)
        merged["slowest_worker_rank"] = max(records, key=lambda r: r["step_time_s"]).get("rank", 0)
    return merged


def format_record(rec: dict[str, Any], total_steps: int | None) -> str:
    total = f"/{total_steps}" if total_steps else ""
    gn = rec.get("grad_norm")
    parts = [
        f"step {rec['step']}{total}",
        f"loss {rec['loss']:.4f}",
        *([f"aux_loss {rec['aux_loss']:.4f}"] if "aux_loss" in rec else []),
        f"grad_norm {gn:.3f}" if gn is not None else "grad_norm -",
        f"lr {rec['lr']:.2e}",
        f"tok/s {rec['tokens_per_s']:.0f}",
    ]
    if rec.get("mfu") is not None:
        parts.append(f"mfu {rec['mfu']:.1%}")
    if "eval_loss" in rec:
        parts.append(f"eval_loss {rec['eval_loss']:.4f}")
    return "  ".join(parts)


def should_print(rec: dict[str, Any], total_steps: int | None, log_every: int) -> bool:
    return rec["step"] % log_every == 0 or rec["step"] == total_steps or "eval_loss" in rec


METRICS_FILE = "metrics.jsonl"


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Complete records of ``metrics.jsonl`` (a line still being written is skipped)."""
    p = Path(path)
    if p.is_dir():
        p = p / METRICS_FILE
    if not p.is_file():
        return []
    out = []
    for line in p.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return out


class MetricsLog:
    """Appends merged records to ``metrics.jsonl`` and hands each to ``on_record`` (the driver's display).

    A resumed run keeps the records up to the step it resumes from (``keep_through``), so the file, and the
    loss curve drawn from it, covers the whole run; records past that step are dropped because the run
    does those steps again.
    """

    def __init__(
        self,
        output_dir: str | Path,
        keep_through: int = 0,
        on_record: Callable[[dict[str, Any]], None] | None = None,
    ):
        self.path = Path(output_dir).resolve() / METRICS_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= keep_through] if keep_through else []
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
        os.replace(tmp, self.path)
        self.on_record = on_record

    def truncate(self, keep_through: int) -> None:
        """Keep the records of steps up to ``keep_through`` (a restarted run continues after it)."""
        kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= keep_through]
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
        os.replace(tmp, self.path)

    def log(self, records: list[dict[str, Any]] | dict[str, Any]) -> dict[str, Any]:
        rec = merge(records if isinstance(records, list) else [records])
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(rec) + "\n")
        if self.on_record is not None:
            self.on_record(rec)
        return rec
