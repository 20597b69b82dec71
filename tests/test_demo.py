"""The README's main command, end to end, in fresh processes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import REPO

pytestmark = pytest.mark.slow


def metrics(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_demo_launch_learns_the_support_reply(tmp_path):
    """The README's main command, end to end in a fresh process (a local Ray instance with 2 CPU workers
    running DeepSpeed): train the demo, then chat with it."""
    run = subprocess.run(
        [sys.executable, "-m", "distsft", "launch", "--set", f"output_dir={tmp_path}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    rows = metrics(tmp_path)
    # one step's loss is one batch of 4 rows (it jumps around); its trend and the held-out loss fall 5x
    assert sum(r["loss"] for r in rows[-10:]) / 10 < rows[0]["loss"] / 5
    assert rows[-1]["eval_loss"] < rows[0]["loss"] / 5
    assert [r["step"] for r in rows] == list(range(1, len(rows) + 1))
    # the console is for a person: the run's own lines, no escape codes, no library or Ray internals
    console = run.stdout + run.stderr
    assert "\x1b" not in console
    noise_words = ("RayTrainWorker", "core_worker", "DeepSpeed", "accelerator", "built successfully", "Writing")
    for noise in (*noise_words, "Token authentication"):
        assert noise not in console, (noise, console[-3000:])
    lines = console.splitlines()
    for start in ("cluster:", "config:", "model:", "data:", "worker: rank 0 ", "worker: rank 1 ", "done:"):
        assert sum(line.startswith(start) for line in lines) == 1, (start, console[-3000:])
    assert len(lines) <= 60, len(lines)
    logs = tmp_path / "logs"
    assert {p.name for p in logs.iterdir()} == {"driver.log", "rank-0.log", "rank-1.log"}
    assert "done:" in (logs / "driver.log").read_text() and "rank 1 of 2" in (logs / "rank-1.log").read_text()
    gen = subprocess.run(
        [
            sys.executable,
            "-m",
            "distsft",
            "generate",
            "--model",
            str(tmp_path / "final"),
            "My internet connection is slow. Can you help me troubleshoot?",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert gen.returncode == 0, gen.stderr[-3000:]
    assert gen.stdout.strip().startswith("Let's start by restarting your router"), gen.stdout
