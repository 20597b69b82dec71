"""Hosts as network namespaces on one machine: each with its own address on one switch (198.51.100.0/24,
a bridge in a namespace of its own, one veth pair per host), its own Ray node and its own private
directories (home, temp, cache), so that only what a test shares on purpose (``storage_path``) is shared.

The host name resolves to loopback here as on most distributions, so anything that binds to "this host"
instead of the node's address fails as it would on a real cluster. Needs root (CI runs as root); tests
skip without it. Every namespace and process made here is removed by name and pid when the test ends.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest
import yaml
from raytest import RAY, SMALL, final_weights, metrics

SUBNET = "198.51.100"
PORT = 6379

SETS = [f"data.path={SMALL}", "data.max_seq_len=256", "data.eval_fraction=0", "train.max_steps=6",
        "train.micro_batch_size=1", "train.global_batch_size=4", "train.lr=1e-4", "train.warmup_steps=0",
        "train.zero_stage=2", "checkpoint.every_steps=2", "logging.plot=false",
        "logging.tensorboard=false"]  # fmt: skip


def can_make_hosts() -> bool:
    return os.geteuid() == 0 and shutil.which("ip") is not None


needs_root = pytest.mark.skipif(not can_make_hosts(), reason="network namespaces need root and iproute2")


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


class Hosts:
    """``n`` hosts ``h0..h{n-1}`` at 198.51.100.10, .11, ...; ``h0`` runs the Ray head."""

    def __init__(self, n: int, root: Path) -> None:
        self.tag = f"ds{uuid.uuid4().hex[:6]}"
        self.n, self.root = n, root
        self.token = secrets.token_hex(16)
        self.made: list[str] = []
        self.procs: list[subprocess.Popen] = []
        # A directory at the same path on every host but private to each (``ip netns exec`` binds
        # /etc/netns/NS/* over /etc/*): a storage path that is not shared.
        self.private = Path("/etc") / f"{self.tag}-private"
        try:
            self._make()
        except BaseException:
            self.close()
            raise

    def _make(self) -> None:
        self.private.mkdir()
        switch = f"{self.tag}-sw"
        self._netns(switch)
        _ip("-n", switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", switch, "link", "set", "br0", "up")
        for i in range(self.n):
            ns = self.ns(i)
            self._netns(ns)
            host_end, switch_end = f"{self.tag}h{i}", f"{self.tag}s{i}"
            _ip("link", "add", host_end, "type", "veth", "peer", "name", switch_end)
            _ip("link", "set", host_end, "netns", ns)
            _ip("link", "set", switch_end, "netns", switch)
            _ip("-n", switch, "link", "set", switch_end, "master", "br0")
            _ip("-n", switch, "link", "set", switch_end, "up")
            _ip("-n", ns, "addr", "add", f"{self.ip(i)}/24", "dev", host_end)
            _ip("-n", ns, "link", "set", host_end, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            (Path("/etc/netns") / ns / self.private.name).mkdir(parents=True)
            for d in ("home", "tmp", "cache"):
                (self.dir(i) / d).mkdir(parents=True, exist_ok=True)
            self.ray_dir(i).mkdir()

    def _netns(self, name: str) -> None:
        _ip("netns", "add", name)
        self.made.append(name)

    def ns(self, i: int) -> str:
        return f"{self.tag}-h{i}"

    def ip(self, i: int) -> str:
        return f"{SUBNET}.{10 + i}"

    def dir(self, i: int) -> Path:
        return self.root / f"h{i}"

    def ray_dir(self, i: int) -> Path:
        """Ray's temp dir on host ``i``: short, as Ray's own /tmp/ray is. Its socket paths must fit
        AF_UNIX's 107 bytes: under pytest's base temp, a second node on the same host (``plasma_store.1``
        beside the first's) with a five-digit head pid ran one byte over, and that ``ray start`` failed."""
        return Path("/tmp") / f"{self.tag}-ray{i}"

    @property
    def address(self) -> str:
        return f"{self.ip(0)}:{PORT}"

    def env(self, i: int, **extra: str) -> dict[str, str]:
        """The host's environment: its own home, temp and cache; the cluster's token."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "DISTSFT_"))}
        env.update(
            HOME=str(self.dir(i) / "home"),
            TMPDIR=str(self.dir(i) / "tmp"),
            DISTSFT_CACHE=str(self.dir(i) / "cache"),
            RAY_AUTH_MODE="token",
            RAY_AUTH_TOKEN=self.token,
            # a lost node is noticed in seconds, not Ray's default half minute
            RAY_health_check_period_ms="1000",
            RAY_health_check_timeout_ms="1000",
            RAY_health_check_failure_threshold="3",
        )
        env.update(extra)
        return env

    def run(self, i: int, cmd: list[str], **kw) -> subprocess.CompletedProcess:
        return subprocess.run(["ip", "netns", "exec", self.ns(i), *cmd], **kw)

    def popen(self, i: int, cmd: list[str], **kw) -> subprocess.Popen:
        p = subprocess.Popen(["ip", "netns", "exec", self.ns(i), *cmd], start_new_session=True, **kw)
        self.procs.append(p)
        return p

    def start_ray(self, i: int, cpus: int = 1, **env: str) -> None:
        """``ray start`` on host ``i``: the head on h0, a node joining it elsewhere."""
        head = ["--head", f"--port={PORT}", "--dashboard-host=127.0.0.1"]
        where = head if i == 0 else [f"--address={self.address}"]
        cmd = [RAY, "start", *where, f"--node-ip-address={self.ip(i)}", f"--num-cpus={cpus}",
               f"--temp-dir={self.ray_dir(i)}", "--object-store-memory=300000000",
               "--disable-usage-stats"]  # fmt: skip
        run = self.run(i, cmd, env=self.env(i, **env), capture_output=True, text=True, timeout=180)
        assert run.returncode == 0, f"ray start on {self.ip(i)} failed: " + "\n".join(run.stderr.splitlines()[-6:])

    def pids(self, i: int) -> list[int]:
        out = subprocess.run(["ip", "netns", "pids", self.ns(i)], capture_output=True, text=True, timeout=30)
        return [int(p) for p in out.stdout.split()]

    def kill(self, i: int) -> float:
        """SIGKILL every process of host ``i`` (its raylet and workers included): the host is gone."""
        for _ in range(5):
            pids = self.pids(i)
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.2)
        return time.monotonic()

    def close(self) -> None:
        for i in range(self.n):
            self.kill(i)
        for p in self.procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for name in reversed(self.made):
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)
            shutil.rmtree(Path("/etc/netns") / name, ignore_errors=True)
        shutil.rmtree(self.private, ignore_errors=True)
        for i in range(self.n):
            shutil.rmtree(self.ray_dir(i), ignore_errors=True)


def cluster_file(tmp_path: Path, hosts: Hosts, **extra) -> str:
    spec = {
        "address": hosts.address,
        "num_nodes": 2,
        "workers_per_node": 1,
        "resources_per_worker": {"cpus": 1},
        "placement_strategy": "STRICT_SPREAD",
        "storage_path": str(tmp_path / "shared"),
        "placement_timeout_s": 60,
        "max_failures": 1,
        **extra,
    }
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


def differences(a: Path, b: Path, steps: int = 6) -> tuple[float, float]:
    """Largest relative loss difference per step, and largest absolute final-weight difference."""
    ma, mb = metrics(a), metrics(b)
    assert [r["step"] for r in ma] == [r["step"] for r in mb] == list(range(1, steps + 1))
    assert [r["tokens"] for r in ma] == [r["tokens"] for r in mb]
    loss = max(abs(x["loss"] - y["loss"]) / abs(x["loss"]) for x, y in zip(ma, mb, strict=True))
    wa, wb = final_weights(a), final_weights(b)
    assert wa.keys() == wb.keys()
    return loss, max((wa[k] - wb[k]).abs().max().item() for k in wa)
