"""``cluster/slurm/distsft.sbatch`` on a real SLURM: Debian's slurmctld and two slurmd, one in each of
two host namespaces (``tests/hosts.py``), with munge authentication, started by the test as root.

One job trains on both hosts; ``scancel --batch --signal=TERM`` stops it with a checkpoint (the launcher
on Ray finishes its step, saves and exits 0); the same ``sbatch`` again resumes it to the end. The
weights equal one process's uninterrupted run: this also stands for "two hosts equal one process". The
time limit's USR1, which requeues the job instead, is the same stop plus ``scontrol requeue``: that branch
of the script is ``test_slurm_script.py``.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import REPO
from hosts import SETS, Hosts, differences, needs_root
from raytest import metrics

SCRIPT = REPO / "cluster" / "slurm" / "distsft.sbatch"
DAEMONS = ("slurmctld", "slurmd", "munged", "sbatch", "scancel", "squeue")

pytestmark = [
    pytest.mark.slow,
    needs_root,
    pytest.mark.skipif(not all(map(shutil.which, DAEMONS)), reason="slurm-wlm and munge are not installed"),
]


class Slurm:
    """A SLURM cluster whose nodes ``h0``, ``h1`` are the hosts' namespaces; the controller runs on h0."""

    def __init__(self, hosts: Hosts, root: Path) -> None:
        self.hosts, self.dir = hosts, root
        self.jobs: list[str] = []
        self.munged: subprocess.Popen | None = None
        try:
            self._start()
        except BaseException:
            self.close()
            raise

    def _start(self) -> None:
        hosts, root = self.hosts, self.dir
        for d in ("state", *(f"spool-h{i}" for i in range(hosts.n))):
            (root / d).mkdir(parents=True)
        key, self.socket = root / "munge.key", root / "munge.socket"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        self.munged = subprocess.Popen(
            ["munged", "-F", "--force", f"--socket={self.socket}", f"--key-file={key}",
             f"--pid-file={root / 'munged.pid'}", f"--log-file={root / 'munged.log'}",
             f"--seed-file={root / 'munged.seed'}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        self.conf = root / "slurm.conf"
        self.conf.write_text(self._conf())
        (root / "cgroup.conf").write_text("CgroupPlugin=cgroup/v1\n")
        self.env = {"SLURM_CONF": str(self.conf)}
        self._wait_for(self.socket.exists, "munged's socket")
        hosts.popen(0, ["slurmctld", "-D", "-i", "-f", str(self.conf)], env=self._env(0), stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL)  # fmt: skip
        for i in range(hosts.n):
            # `ip netns exec` mounts a fresh /sys, without cgroups: slurmd needs them, so its host mounts them
            # (in the mount namespace of that host's processes, gone with them)
            cgroups = (
                "mount -t tmpfs none /sys/fs/cgroup && for c in freezer cpuset memory devices; do "
                "mkdir -p /sys/fs/cgroup/$c && mount -t cgroup -o $c none /sys/fs/cgroup/$c; done"
            )
            slurmd = f"{cgroups} && exec slurmd -D -N h{i} -f {self.conf}"
            hosts.popen(i, ["sh", "-c", slurmd], env=self._env(i),
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        self._wait_for(lambda: self.idle() == hosts.n, f"{hosts.n} idle slurmd")

    def _conf(self) -> str:
        d, ip, n = self.dir, self.hosts.ip, self.hosts.n
        nodes = [f"NodeName=h{i} NodeAddr={ip(i)} CPUs=2 Boards=1 SocketsPerBoard=1 CoresPerSocket=2 "
                 "ThreadsPerCore=1 RealMemory=2000 State=UNKNOWN" for i in range(n)]  # fmt: skip
        return "\n".join([
            "ClusterName=distsft-test", f"SlurmctldHost={socket.gethostname()}({ip(0)})",
            "SlurmUser=root", "SlurmdUser=root", "MailProg=/bin/true",
            "AuthType=auth/munge", "CredType=cred/munge", f"AuthInfo=socket={self.socket},cred_expire=10",
            f"StateSaveLocation={d / 'state'}", f"SlurmdSpoolDir={d / 'spool-%n'}",
            f"SlurmctldPidFile={d / 'slurmctld.pid'}", f"SlurmdPidFile={d / 'slurmd-%n.pid'}",
            f"SlurmctldLogFile={d / 'slurmctld.log'}", f"SlurmdLogFile={d / 'slurmd-%n.log'}",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU", "MpiDefault=none", "ReturnToService=2",
            "SlurmdParameters=config_overrides", "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none", "KillWait=30", *nodes,
            f"PartitionName=test Nodes={','.join(f'h{i}' for i in range(n))} Default=YES MaxTime=INFINITE State=UP",
            "",
        ])  # fmt: skip

    def _env(self, i: int, **extra: str) -> dict[str, str]:
        env = self.hosts.env(i, **self.env, **extra)
        for var in ("RAY_AUTH_TOKEN", "RAY_ADDRESS"):  # the job makes its own token and Ray
            env.pop(var, None)
        return env

    def cmd(self, *args: str, **env: str) -> subprocess.CompletedProcess:
        return self.hosts.run(0, list(args), env=self._env(0, **env), capture_output=True, text=True, timeout=60,
                              cwd=self.dir)  # fmt: skip

    def idle(self) -> int:
        out = self.cmd("sinfo", "-h", "-o", "%T %D").stdout.split()
        return sum(int(n) for state, n in zip(out[::2], out[1::2], strict=True) if state == "idle")

    def running(self, job: str) -> bool:
        return bool(self.cmd("squeue", "-h", "-j", job, "-o", "%T").stdout.strip())

    def _wait_for(self, ready, what: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            assert time.monotonic() < deadline, f"no {what} within {timeout}s: {self.logs()}"
            time.sleep(0.5)

    def logs(self) -> str:
        return "\n".join(f"{p.name}: {p.read_text()[-2000:]}" for p in sorted(self.dir.glob("*.log")))

    def close(self) -> None:
        for job in self.jobs:  # the script's default Ray directories, /tmp/ray-JOBID-NODE
            for i in range(self.hosts.n):
                shutil.rmtree(f"/tmp/ray-{job}-h{i}", ignore_errors=True)
        if self.munged is not None and self.munged.poll() is None:
            self.munged.kill()
            self.munged.wait(timeout=30)


@pytest.fixture
def slurm(tmp_path):
    hosts = Hosts(2, tmp_path / "hosts")
    try:
        cluster = Slurm(hosts, tmp_path / "slurm")
        try:
            yield cluster
        finally:
            cluster.close()
    finally:
        hosts.close()


def submit(slurm: Slurm, out: Path, cluster: Path, **env: str) -> str:
    sets = [a for s in [f"output_dir={out}", *SETS] for a in ("--set", s)]
    # --gpus-per-node=0: these nodes have no GPUs (the option overrides the script's #SBATCH line, as a user's would)
    run = slurm.cmd("sbatch", "--parsable", "--nodes=2", "--gpus-per-node=0", str(SCRIPT), "--cluster", str(cluster),
                    *sets, DISTSFT_ENV=sys.prefix, **env)  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    slurm.jobs.append(run.stdout.strip().split(";")[0])
    return slurm.jobs[-1]


def wait_for(what, timeout: float = 600, every: float = 0.5) -> float:
    t0 = time.monotonic()
    while not what():
        assert time.monotonic() - t0 < timeout, f"not within {timeout}s"
        time.sleep(every)
    return time.monotonic() - t0


def _steps(out: Path) -> list[int]:
    try:
        return [r["step"] for r in metrics(out)]
    except (OSError, ValueError):
        return []


def _stopped_at(text: str) -> list[int]:
    return [int(part.split(";")[0]) for part in text.split("stopped at step ")[1:]]


def test_sbatch_trains_checkpoints_on_scancel_and_resumes_on_resubmit(slurm, host_reference, tmp_path):
    out, shared = tmp_path / "run", tmp_path / "shared"
    cluster = tmp_path / "cluster.yaml"
    spec = {"address": "auto", "num_nodes": 2, "workers_per_node": 1, "resources_per_worker": {"cpus": 1},
            "placement_strategy": "STRICT_SPREAD", "storage_path": str(shared), "placement_timeout_s": 120}  # fmt: skip
    cluster.write_text(yaml.safe_dump(spec))
    log = lambda job: (slurm.dir / f"distsft-{job}.out").read_text()  # noqa: E731
    t0 = time.monotonic()
    job = submit(slurm, out, cluster)
    to_step = wait_for(lambda: len(_steps(out)) >= 1)
    assert slurm.cmd("scancel", "--batch", "--signal=TERM", job).returncode == 0
    stopped = wait_for(lambda: not slurm.running(job))
    text = log(job)
    assert text.count("doctor: all 7 checks passed") == 1 and "launch ended with status 0" in text, text[-4000:]
    (step,) = _stopped_at(text)
    assert step < 6 and _steps(out) == list(range(1, step + 1)), text[-4000:]

    t1 = time.monotonic()
    again = submit(slurm, out, cluster, DISTSFT_DOCTOR="0")
    wait_for(lambda: not slurm.running(again))
    last = log(again)
    assert "resuming from" in last and f"(step {step})" in last, last[-4000:]
    assert "launch ended with status 0" in last, last[-4000:]
    loss, weights = differences(host_reference, out)
    placed = json.loads((out / "workers.json").read_text())
    print(f"\nslurm: first step {to_step:.0f}s after sbatch; TERM -> stopped at step {step}, job ended "
          f"{stopped:.0f}s later; resubmitted job {time.monotonic() - t1:.0f}s to the end; in all "
          f"{time.monotonic() - t0:.0f}s; loss {loss:.2e}, weights {weights:.2e} against one process")  # fmt: skip
    assert sorted(w["node"] for w in placed.values()) == [slurm.hosts.ip(0), slurm.hosts.ip(1)]
    assert "127.0.0.1" not in (out / "logs" / "rank-1.log").read_text()
    assert loss < 1e-5 and weights < 1e-5
