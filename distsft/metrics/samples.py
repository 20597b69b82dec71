"""``samples.jsonl``: the greedy replies written at eval steps (``train.samples``), one line per prompt.

Rank 0's record of an eval step carries its samples; the record sink takes them out of the record (text
does not belong among the step's figures) and writes them here before the step's line reaches
``metrics.jsonl``, so whoever sees the line (the console, TensorBoard, W&B, MLflow) finds its samples
here. A resumed run keeps the samples of the steps it keeps, as ``metrics.jsonl`` does.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from distsft.host import write_atomic

SAMPLES_FILE = "samples.jsonl"


def read_samples(run_dir: str | Path, step: int | None = None) -> list[dict[str, Any]]:
    """The samples of ``step`` (default: every step), each ``{step, eval, prompt, reply}``."""
    path = Path(run_dir) / SAMPLES_FILE
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except ValueError:  # a line still being written
            continue
        if step is None or row.get("step") == step:
            out.append(row)
    return out


def latest_samples(run_dir: str | Path) -> list[dict[str, Any]]:
    """The samples of the last step that has any."""
    rows = read_samples(run_dir)
    last = max((r["step"] for r in rows), default=None)
    return [r for r in rows if r["step"] == last]


def excerpt(text: str, width: int) -> str:
    """``text`` on one line, cut to ``width`` characters."""
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 3] + "..."


def format_samples(rows: list[dict[str, Any]], width: int = 100) -> list[str]:
    """One line per sample: the end of its prompt, then its reply."""
    return [
        f"sample (step {r['step']}, {r['eval']}): ...{excerpt(r['prompt'][-40:], 40)} -> {excerpt(r['reply'], width)}"
        for r in rows
    ]


class SamplesLog:
    """Appends an eval step's samples to ``samples.jsonl``; cut back like ``metrics.jsonl`` on a resume."""

    def __init__(self, output_dir: str | Path, keep_through: int = 0) -> None:
        self.path = Path(output_dir).resolve() / SAMPLES_FILE
        self.truncate(keep_through)

    def truncate(self, keep_through: int) -> None:
        if not self.path.exists():
            return
        kept = [r for r in read_samples(self.path.parent) if r.get("step", 0) <= keep_through] if keep_through else []
        write_atomic(self.path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept))

    def append(self, step: int, samples: list[dict[str, Any]]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            for s in samples:
                f.write(json.dumps({"step": step, **s}, ensure_ascii=False) + "\n")
