"""The fine-tuned model beside its base: one row per task and metric, as a table and as JSON.

lm-eval reports each metric under ``"<metric>,<filter>"`` with its standard error under
``"<metric>_stderr,<filter>"``; a row keeps the metric's name (with the filter when it is not lm-eval's
default ``none``), both models' values, the difference, and both standard errors. The table shows the
fine-tuned model's stderr: the same examples are scored for both, so it is the scale a delta is read against.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

STDERR = "_stderr"


@dataclass(frozen=True)
class Row:
    task: str
    metric: str
    tuned: float
    base: float | None
    stderr: float | None
    """The fine-tuned model's standard error (None where lm-eval computed none)."""
    base_stderr: float | None
    samples: int

    @property
    def delta(self) -> float | None:
        return None if self.base is None else self.tuned - self.base

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "delta": self.delta}


def metrics(task_results: dict[str, Any]) -> dict[str, tuple[float, float | None]]:
    """``{"acc": (value, stderr), ...}`` from one task's lm-eval results (non-numeric entries skipped)."""
    out = {}
    for key, value in task_results.items():
        name, sep, filt = key.partition(",")
        if not sep or name.endswith(STDERR) or not isinstance(value, (int, float)):
            continue
        stderr = task_results.get(f"{name}{STDERR},{filt}")
        label = name if filt == "none" else f"{name} ({filt})"
        out[label] = (float(value), float(stderr) if isinstance(stderr, (int, float)) else None)
    return out


def compare(tuned: dict[str, Any], base: dict[str, Any] | None) -> list[Row]:
    """Rows for every task and metric of ``tuned`` (``runner.run_tasks`` output), with ``base``'s beside."""
    rows = []
    for task, results in tuned["results"].items():
        base_metrics = metrics(base["results"].get(task, {})) if base else {}
        samples = int(tuned.get("n-samples", {}).get(task, {}).get("effective", 0))
        for metric, (value, stderr) in metrics(results).items():
            b, b_err = base_metrics.get(metric, (None, None))
            rows.append(Row(task, metric, value, b, stderr, b_err, samples))
    return rows


def _num(x: float | None, sign: bool = False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:+.4f}" if sign else f"{x:.4f}"


def table(rows: list[Row]) -> str:
    """A plain-text table: task, metric, n, base, fine-tuned, delta, stderr."""
    head = ("task", "metric", "n", "base", "fine-tuned", "delta", "stderr")
    body = [
        (r.task, r.metric, str(r.samples), _num(r.base), _num(r.tuned), _num(r.delta, sign=True), _num(r.stderr))
        for r in rows
    ]
    widths = [max(len(cells[i]) for cells in [head, *body]) for i in range(len(head))]

    def line(cells: tuple[str, ...]) -> str:  # task and metric left-aligned, numbers right-aligned
        aligned = (c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True)))
        return "  ".join(aligned)

    return "\n".join([line(head), "  ".join("-" * w for w in widths), *map(line, body)])
