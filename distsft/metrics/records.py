"""Every rank's per-step records into one ``metrics.jsonl``: complete, in order, never behind a checkpoint.

Workers hand their records to a ``RecordSink`` without waiting for it (on Ray an actor call, which
returns at once; locally a plain call). The sink merges a step when every rank's record of it has
arrived and appends the merged line (``merge``). Before a checkpoint is saved every rank waits until the
sink has its records (``RecordSender.wait``), so a checkpoint never covers a step whose
record is not written, and a launcher killed at any moment leaves at least the records of the latest
complete checkpoint. A run that continues from step N keeps exactly the records of steps 1..N (the run
whose weights it continues) and appends from N + 1: at launch by truncating the file, and after a
worker-group restart when the first record of the new group says where it resumed from.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from distsft.host import write_atomic
from distsft.metrics.jsonl import MetricsLog
from distsft.metrics.samples import SamplesLog

SAMPLES = "samples"
"""The field of rank 0's record that carries an eval step's samples: written to ``samples.jsonl`` by the sink,
never to ``metrics.jsonl``."""

WORKERS_FILE = "workers.json"
"""Where each rank runs (node, device, pid), rewritten as workers start or restart; the console follows it."""


class RecordSink:
    """The coordinator's end: runs on the driver's node (a Ray actor, or in the launcher's process)."""

    def __init__(
        self, output_dir: str, world_size: int, keep_through: int, on_record: Callable[[dict], None] | None = None
    ) -> None:
        self.log = MetricsLog(output_dir, keep_through=keep_through, on_record=on_record)
        self.samples = SamplesLog(output_dir, keep_through=keep_through)
        self.world_size = world_size
        self.resumed_from = keep_through
        self.pending: dict[int, dict[int, dict[str, Any]]] = {}
        self.placement: dict[int, dict[str, Any]] = {}
        self.last_step = keep_through
        self.summary: dict[str, Any] = {}

    def hello(self, rank: int, where: dict[str, Any]) -> None:
        """A worker (re)started: where it runs, for ``workers.json`` and the console."""
        self.placement[rank] = where
        placed = {str(k): v for k, v in sorted(self.placement.items())}
        write_atomic(self.log.path.parent / WORKERS_FILE, json.dumps(placed, indent=1))

    def put(self, rank: int, records: list[dict[str, Any]]) -> int:
        """Take one rank's records (in step order); returns the last step written to the file."""
        for rec in records:
            start = rec.get("resumed_from", self.resumed_from)
            if start != self.resumed_from:  # a restarted worker group continues from an earlier checkpoint
                self.log.truncate(start)
                self.samples.truncate(start)
                self.pending = {s: r for s, r in self.pending.items() if s <= start}
                self.resumed_from = self.last_step = start
            self.pending.setdefault(rec["step"], {})[rank] = rec
        for step in sorted(self.pending):
            if step <= self.last_step:  # a step the file already has (sent twice): the first one stays
                del self.pending[step]
                continue
            if len(self.pending[step]) < self.world_size:
                break  # ranks deliver in step order, so no later step can be complete either
            by_rank = self.pending.pop(step)
            merged = merge([by_rank[r] for r in sorted(by_rank)])
            samples = merged.pop(SAMPLES, None)
            if samples:  # before the step's line: whoever reads the line finds them
                self.samples.append(step, samples)
            self.log.append(merged)
            self.last_step = step
        return self.last_step

    def finish(self, summary: dict[str, Any]) -> None:
        """Rank 0's summary of the run (what ``training.loop.train`` returns), for the driver."""
        self.summary = summary

    def run_summary(self) -> dict[str, Any]:
        return self.summary


class RecordSender:
    """A worker's end: buffers records and sends them every ``log_every`` steps without waiting;
    ``wait()`` blocks until the sink has them (before a checkpoint, and at the end)."""

    def __init__(self, send: Callable[[list[dict[str, Any]]], Any], wait_for: Callable[[list[Any]], None]) -> None:
        self.send, self.wait_for = send, wait_for
        self.buffer: list[dict[str, Any]] = []
        self.in_flight: list[Any] = []

    def report(self, record: dict[str, Any]) -> None:
        self.buffer.append(record)

    def flush(self) -> None:
        if self.buffer:
            self.in_flight.append(self.send(list(self.buffer)))
            self.buffer.clear()

    def wait(self) -> None:
        self.flush()
        if self.in_flight:
            self.wait_for(self.in_flight)
            self.in_flight.clear()


def local_sender(sink: RecordSink) -> RecordSender:
    """``--local``: the sink is in this process; a record is written when it is sent."""
    return RecordSender(lambda records: sink.put(0, records), lambda refs: None)


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
