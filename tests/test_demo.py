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
    assert rows[-1]["loss"] < rows[0]["loss"] / 5
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
