"""kill -9 at the worst moments, on real processes: the launcher, and a save in progress. (SIGTERM to the
launcher on Ray, a checkpointed stop and a resume, is the SLURM test's ``scancel``.)"""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest
import torch
from conftest import REPO
from hosts import SETS
from raytest import final_weights, metrics

from distsft import checkpoint

pytestmark = pytest.mark.slow


def launch_cmd(out, *extra: str, local: bool = True) -> list[str]:
    """The multi-host tests' run (``hosts.SETS``: 6 steps of 4 rows, a checkpoint every 2), so that the
    one-process run of it (``host_reference``) is the uninterrupted run; each step on the console."""
    sets = [f"output_dir={out}", *SETS, "train.log_every=1", *extra]
    cmd = [sys.executable, "-m", "distsft", "launch", *(a for s in sets for a in ("--set", s))]
    return cmd + (["--local"] if local else [])


def ray_processes() -> set[int]:
    """Live Ray processes; zombies (exited, waiting for a PID 1 that does not reap) hold nothing."""
    out = subprocess.run(["ps", "-eo", "pid=,stat=,args="], capture_output=True, text=True).stdout
    live = set()
    for line in out.splitlines():
        pid, stat, args = line.split(None, 2)
        if not stat.startswith("Z") and any(
            k in args for k in ("ray::", "raylet", "gcs_server", "dashboard", "RayTrainWorker")
        ):
            live.add(int(pid))
    return live


def _args(pid: int) -> str:
    try:
        return open(f"/proc/{pid}/cmdline", "rb").read().decode(errors="replace")
    except OSError:
        return ""


def assert_private_and_secret_free(private: list[Path], others: list[Path], secrets: list[str]) -> None:
    """Each of ``private`` is a directory only its user can enter (0700), and no file under it or under
    ``others`` holds any of ``secrets``."""
    for d in private:
        assert stat.S_IMODE(d.stat().st_mode) == 0o700, f"{d}: mode {stat.S_IMODE(d.stat().st_mode):o}"
    files = [p for d in private + others for p in d.rglob("*") if p.is_file() and not p.is_symlink()]
    assert len(files) > 20  # Ray's logs, the run's files: there is something to search
    for path in files:
        data = path.read_bytes()
        for s in secrets:
            assert s.encode() not in data, f"a secret is in {path}"


def assert_same_weights(a, b, atol=1e-6):
    wa, wb = final_weights(a), final_weights(b)
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=atol, msg=k)


def test_kill_9_during_a_save_falls_back_to_the_previous_checkpoint(host_reference, tmp_path):
    crashed = tmp_path / "crashed"
    died = subprocess.run(
        launch_cmd(crashed), cwd=REPO, capture_output=True, timeout=300, env={**os.environ, "DISTSFT_KILL_IN_SAVE": "4"}
    )
    assert died.returncode == -signal.SIGKILL
    root = crashed / "checkpoints"
    assert (root / ".tmp-step-00000004").is_dir()  # shards written, no manifest
    assert checkpoint.find_latest(root).name == "step-00000002"
    again = subprocess.run(launch_cmd(crashed), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "step-00000002 (step 2)" in again.stdout
    # steps 3-4 of the killed launch are dropped (their checkpoint never completed) and run again
    assert [r["step"] for r in metrics(crashed)] == [1, 2, 3, 4, 5, 6]
    assert not (root / ".tmp-step-00000004").exists()
    assert_same_weights(host_reference, crashed)


def test_kill_9_of_the_ray_launcher_leaves_nothing_behind_and_the_rerun_matches(host_reference, tmp_path):
    """Also what a killed launch leaves on a shared machine: the cluster file's secrets (one named a
    secret by ``secret_env``) in no file and no process's command line, Ray's session directory and the
    caches private to the user, and the session directory removed by the next launch."""
    killed = tmp_path / "killed"
    secret, phrase = f"hf_{uuid.uuid4().hex}", uuid.uuid4().hex
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text(
        f"env: {{HF_TOKEN: {secret}, DEPLOY_PHRASE: {phrase}, NCCL_IB_DISABLE: 1}}\nsecret_env: [DEPLOY_PHRASE]\n"
    )
    shared_tmp = Path(tempfile.mkdtemp(prefix="k", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    env = {**os.environ, "TMPDIR": str(shared_tmp), "DISTSFT_CACHE": str(tmp_path / "cache")}
    cmd = [*launch_cmd(killed, local=False), "--cluster", str(cluster)]
    before = ray_processes()
    proc = subprocess.Popen(
        cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True, env=env
    )
    deadline = time.monotonic() + 300
    for line in proc.stdout:
        if line.startswith("step 3/"):
            break
        assert time.monotonic() < deadline
    cmdlines = [_args(pid) for pid in ray_processes() - before]
    proc.kill()  # SIGKILL: no handler, no cleanup code runs
    proc.wait(timeout=30)
    for _ in range(60):  # the workers notice the launcher's death and stop (one may finish a save meanwhile)
        if not any("RayTrainWorker" in _args(pid) for pid in ray_processes() - before):
            break
        time.sleep(1)
    last_ckpt = checkpoint.read_manifest(checkpoint.find_latest(killed / "checkpoints"))["step"]
    assert last_ckpt >= 2
    # What SIGKILL left running (in this container: Ray's agents, whose raylet lingers as an unreaped
    # zombie) must not survive the next launch of the same command, which stops it before starting.
    lingering = ray_processes() - before
    (session,) = shared_tmp.glob("distsft-ray-*")
    assert_private_and_secret_free([session, tmp_path / "cache"], [killed], [secret, phrase])
    assert cmdlines and not any(secret in c or phrase in c for c in cmdlines)
    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert not session.exists()  # the killed launch's session directory, removed with its processes
    shutil.rmtree(shared_tmp, ignore_errors=True)
    if lingering:
        assert "leftover Ray processes of an earlier launch" in again.stdout, again.stdout[-2000:]
    time.sleep(5)
    assert not (ray_processes() - before), subprocess.run(["ps", "-ef"], capture_output=True, text=True).stdout
    assert f"(step {last_ckpt})" in again.stdout
    # the killed launch's records up to its checkpoint are kept; the rerun logs from the step after it
    assert [r["step"] for r in metrics(killed)] == [1, 2, 3, 4, 5, 6]  # every step exactly once
    assert_same_weights(host_reference, killed, atol=1e-5)  # 2 workers x 2 micro-batches against 1 x 4
