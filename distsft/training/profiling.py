"""Where a step's time goes: torch.profiler over chosen steps, summarised by the loop's own phases.

The loop marks its phases (``phase("data")``, ``"forward"``, ``"backward"``, ``"optimizer"``); with
``logging.profile_steps: [first, last]`` rank 0 runs those steps under torch.profiler and writes a Chrome
trace (open it in https://ui.perfetto.dev) and ``summary.txt``: time per phase per step, on the host and,
on a GPU, on the device, then the operators that took the most time. Outside those steps the marks cost
nothing measurable.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch

PHASES = ("data", "forward", "backward", "optimizer")
SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")
"""The CUDA runtime calls that make the host wait for the device (``.item()``, a blocking copy to the host,
a data-dependent shape, ``torch.cuda.synchronize()``)."""


def phase(name: str):
    return torch.profiler.record_function(f"distsft.{name}")


class StepProfiler:
    def __init__(self, steps: tuple[int, int] | None, out_dir: Path, rank: int, cuda: bool) -> None:
        self.first, self.last = steps or (0, -1)
        self.enabled = steps is not None and rank == 0
        self.out_dir, self.cuda = out_dir, cuda
        self.prof: Any = None

    def step_begins(self, step: int) -> None:
        """``step`` is 1-based."""
        if self.enabled and step == self.first:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if self.cuda:
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.prof = torch.profiler.profile(activities=activities, record_shapes=False, with_stack=False)
            self.prof.__enter__()

    def step_ends(self, step: int) -> str | None:
        """Finishes the profile after its last step; returns the summary's path then."""
        if self.prof is None or step != self.last:
            return None
        if self.cuda:
            torch.cuda.synchronize()
        self.prof.__exit__(None, None, None)
        prof, self.prof = self.prof, None
        self.out_dir.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(self.out_dir / "trace-rank0.json"))
        text = summarize(prof, self.last - self.first + 1, self.cuda)
        (self.out_dir / "summary.txt").write_text(text)
        return str(self.out_dir / "summary.txt")

    def close(self) -> None:
        if self.prof is not None:
            with contextlib.suppress(Exception):
                self.prof.__exit__(None, None, None)


def summarize(prof: Any, steps: int, cuda: bool) -> str:
    events = prof.key_averages()
    by_name = {e.key: e for e in events}
    lines = [f"profiled {steps} step(s); milliseconds per step", ""]
    header = f"{'phase':<12}{'host':>10}" + (f"{'device':>10}" if cuda else "")
    lines.append(header)
    for name in PHASES:
        e = by_name.get(f"distsft.{name}")
        if e is None:
            continue
        row = f"{name:<12}{e.cpu_time_total / 1e3 / steps:>10.1f}"
        if cuda:
            row += f"{_device_time(e) / 1e3 / steps:>10.1f}"
        lines.append(row)
    if cuda:
        # The one cudaDeviceSynchronize that closes the profile (step_ends) is not the steps'.
        syncs = sum(e.count for e in events if e.key in SYNC_CALLS) - 1
        lines.append(f"host syncs (cudaStream/Device/EventSynchronize): {syncs / steps:.1f} per step")
    sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    lines += ["", events.table(sort_by=sort, row_limit=25, max_name_column_width=60)]
    return "\n".join(lines) + "\n"


def _device_time(event: Any) -> float:
    for attr in ("device_time_total", "cuda_time_total"):
        value = getattr(event, attr, None)
        if value is not None:
            return float(value)
    return 0.0
