"""The benchmark scripts keep running (their figures are printed, never asserted as timings)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO

pytestmark = pytest.mark.slow


def clean_env() -> dict[str, str]:
    """This process's environment without what an in-process launch earlier in the session left in it
    (``LOCAL_RANK`` for DeepSpeed): the benchmark's TRL run would take itself for a torchrun rank."""
    return {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "RANK", "WORLD_SIZE")}


def test_throughput_benchmark_runs_distsft_and_trl_on_the_same_supervised_tokens(tmp_path):
    pytest.importorskip("trl")
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "throughput.py"),
            "--bundled=60",
            "--long-tail=20",
            "--batch-examples=8",
            f"--workdir={tmp_path}",
            "--runs",
            "distsft-local",
            "trl-padding",
            "trl-packing",
        ],
        capture_output=True,
        text=True,
        timeout=900,
        env=clean_env(),
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    res, info = report["results"], report["info"]
    assert info["examples"] == 80
    # TRL trains on exactly the examples distsft prepared; distsft's epoch drops a final partial batch
    assert res["trl-padding"]["supervised_tokens"] == res["trl-packing"]["supervised_tokens"]
    assert res["trl-padding"]["supervised_tokens"] == info["supervised_tokens"]
    assert 0.8 * info["supervised_tokens"] <= res["distsft-local"]["supervised_tokens"] <= info["supervised_tokens"]
    for mode in ("distsft-local", "trl-padding", "trl-packing"):
        assert res[mode]["tokens_per_s"] > 0 and res[mode]["final_loss"] > 0
    assert "distsft-local / trl-padding:" in proc.stdout and "distsft-local / trl-packing:" in proc.stdout
