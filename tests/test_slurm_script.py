"""The stop paths of ``cluster/slurm/distsft.sbatch``, run by bash with SLURM's and Ray's commands
replaced by stand-ins that record what they are asked (``srun`` tasks that wait for TERM, a launcher that
checkpoints on TERM): the time limit's USR1 stops the launcher, then Ray, then requeues the job; a TERM
stops the same way and does not requeue. The whole script on a real SLURM is ``test_slurm.py``."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import REPO

SCRIPT = REPO / "cluster" / "slurm" / "distsft.sbatch"

STANDINS = {
    "scontrol": """case "$1 $2" in
  "show hostnames") tr , '\\n' <<<"$3" ;;
  "show node") echo "NodeName=$3 NodeAddr=127.0.0.1 State=IDLE" ;;
  *) echo "scontrol $*" >>"$CALLS" ;;
esac""",
    "srun": """trap 'echo "srun stopped" >>"$CALLS"; exit 0' TERM
echo "srun started" >>"$CALLS"
while :; do sleep 0.05; done""",
    "python": """cat >/dev/null  # the wait for every node to join: they all have
echo "distsft: 2 Ray node(s) up: 127.0.0.1, 127.0.0.1\"""",
    "distsft": """echo "distsft $*" >>"$CALLS"
if [[ "$1" == doctor ]]; then echo "doctor: all 7 checks passed"; exit 0; fi
trap 'echo "launcher stopped" >>"$CALLS"; echo "stopped at step 3; checkpoint step-00000003"; exit 0' TERM
while :; do sleep 0.05; done""",
}


def run_script(tmp_path: Path, sig: signal.Signals) -> tuple[int, list[str], str]:
    bin_dir = tmp_path / "env" / "bin"
    bin_dir.mkdir(parents=True)
    for name, body in STANDINS.items():
        (bin_dir / name).write_text(f"#!/bin/bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    calls = tmp_path / "calls"
    calls.touch()
    env = {
        "PATH": os.environ["PATH"], "HOME": str(tmp_path), "CALLS": str(calls), "DISTSFT_ENV": str(tmp_path / "env"),
        "SLURM_JOB_ID": "42", "SLURM_JOB_NODELIST": "n0,n1", "RAY_AUTH_TOKEN": "secret-token",
    }  # fmt: skip
    proc = subprocess.Popen(
        ["bash", str(SCRIPT), "--cluster", "c.yaml", "--set", "train.max_steps=9"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path,
    )  # fmt: skip
    deadline = time.monotonic() + 30
    while "distsft launch" not in calls.read_text():
        assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()[0]
        time.sleep(0.05)
    proc.send_signal(sig)  # what `scancel --batch --signal=...` and `--signal=B:USR1@300` do: the batch shell
    out, _ = proc.communicate(timeout=30)
    return proc.returncode, calls.read_text().splitlines(), out


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM], ids=["time-limit", "scancel"])
def test_a_stop_reaches_the_launcher_then_ray_and_only_the_time_limit_requeues(tmp_path, sig):
    code, calls, out = run_script(tmp_path, sig)
    assert code == 0, out
    # a Ray node per node, the doctor and the launch with the script's arguments (the doctor: its options)
    args = "--cluster c.yaml --set train.max_steps=9"
    doctor, launch = f"distsft doctor {args}", f"distsft launch {args}"
    assert sorted(calls[:4]) == sorted(["srun started", "srun started", doctor, launch]), calls
    assert calls.index(doctor) < calls.index(launch), calls  # the srun tasks start in the background
    # the launcher checkpoints first; Ray (both srun tasks) stops only after it has exited
    assert calls[4:7] == ["launcher stopped", "srun stopped", "srun stopped"], calls
    assert calls[7:] == (["scontrol requeue 42"] if sig == signal.SIGUSR1 else []), calls
    assert "launch ended with status 0" in out and "secret-token" not in out
    assert ("requeueing job 42" in out) == (sig == signal.SIGUSR1), out


def test_the_script_asks_slurm_for_the_gpus_its_cluster_file_uses():
    """Without a GPU request SLURM gives the job no GPUs (and Ray on its nodes finds none): the script's
    ``#SBATCH --gpus-per-node`` is what the cluster file it is written for uses on a node."""
    import re

    from distsft.config.cluster import load_cluster

    asked = re.findall(r"^#SBATCH --gpus-per-node=(\d+)$", SCRIPT.read_text(), re.M)
    cluster = load_cluster(SCRIPT.parent / "cluster.yaml")
    assert asked == [str(int(cluster.workers_per_node * cluster.resources_per_worker.gpus))]
