"""``metrics.jsonl``: one merged record per optimizer step, the file every view of a run is drawn from
(console, TensorBoard, ``distsft report``, the summary and the loss curve)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from distsft.host import write_atomic

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
        self.on_record = on_record
        self.truncate(keep_through)

    def truncate(self, keep_through: int) -> None:
        """Keep the records of steps up to ``keep_through`` (a restarted run continues after it)."""
        kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= keep_through] if keep_through else []
        write_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept))

    def append(self, rec: dict[str, Any]) -> None:
        """One merged record (``distsft/metrics/records.py``'s ``merge``)."""
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(rec) + "\n")
        if self.on_record is not None:
            self.on_record(rec)
