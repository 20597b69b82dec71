"""Many hosts for real: Ray nodes in network namespaces, each with its own address (``tests/hosts.py``),
token authentication on, checkpoints on a directory they share. Against one process's run of the same
config: two hosts; a host whose interface is named wrong; a rank that stops mid-collective; and hosts
killed mid-run, one replaced and one not (the run shrinks to one worker, resharded).

The tests share one set of hosts and run in file order: the kill test ends with one host left.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from conftest import REPO
from hosts import Hosts, needs_root
from raytest import SMALL, final_weights, metrics

from distsft.config import load_config
from distsft.launcher.run import launch_local

pytestmark = [pytest.mark.slow, needs_root]

SETS = [f"data.path={SMALL}", "data.max_seq_len=256", "data.eval_fraction=0", "train.max_steps=6",
        "train.micro_batch_size=1", "train.global_batch_size=4", "train.lr=1e-4", "train.warmup_steps=0",
        "train.zero_stage=2", "checkpoint.every_steps=2", "logging.plot=false",
        "logging.tensorboard=false"]  # fmt: skip


@pytest.fixture(scope="module")
def hosts(tmp_path_factory):
    h = Hosts(3, tmp_path_factory.mktemp("hosts"))
    try:
        h.start_ray(0)
        h.start_ray(1)
        yield h
    finally:
        h.close()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The same config in one process (one worker, accumulation 4)."""
    out = tmp_path_factory.mktemp("one-process")
    launch_local(load_config(None, [f"output_dir={out}", *SETS]), quiet=True)
    return out


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


def launch(hosts: Hosts, out: Path, cluster: str, timeout: float = 600):
    cmd = [sys.executable, "-m", "distsft", "launch", "--cluster", cluster, "--set", f"output_dir={out}"]
    cmd += [a for s in SETS for a in ("--set", s)]
    return hosts.run(0, cmd, cwd=REPO, env=hosts.env(0), capture_output=True, text=True, timeout=timeout)


def differences(a: Path, b: Path) -> tuple[float, float]:
    """Largest relative loss difference per step, and largest absolute final-weight difference."""
    ma, mb = metrics(a), metrics(b)
    assert [r["step"] for r in ma] == [r["step"] for r in mb] == [1, 2, 3, 4, 5, 6]
    assert [r["tokens"] for r in ma] == [r["tokens"] for r in mb]
    loss = max(abs(x["loss"] - y["loss"]) / abs(x["loss"]) for x, y in zip(ma, mb, strict=True))
    wa, wb = final_weights(a), final_weights(b)
    assert wa.keys() == wb.keys()
    return loss, max((wa[k] - wb[k]).abs().max().item() for k in wa)


def test_two_hosts_equal_one_process(hosts, reference, tmp_path):
    out = tmp_path / "run"
    t0 = time.monotonic()
    run = launch(hosts, out, cluster_file(tmp_path, hosts))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    placed = json.loads((out / "workers.json").read_text())
    assert sorted(w["node"] for w in placed.values()) == [hosts.ip(0), hosts.ip(1)]
    loss, weights = differences(reference, out)
    print(f"\ntwo hosts vs one process: loss {loss:.2e} (relative, max over steps), weights {weights:.2e}; "
          f"launch {time.monotonic() - t0:.0f}s")  # fmt: skip
    assert loss < 1e-5 and weights < 1e-5
    logs = (out / "logs" / "rank-1.log").read_text()
    assert "127.0.0.1" not in logs


def test_an_interface_that_cannot_reach_rank_0_is_one_line_and_counts_toward_max_failures(hosts, tmp_path):
    """gloo bound to loopback (as the host name's address would make it) cannot be reached from another
    host: each attempt fails within the rendezvous timeout, and the run ends after max_failures."""
    out = tmp_path / "run"
    cluster = cluster_file(tmp_path, hosts, env={"GLOO_SOCKET_IFNAME": "lo"}, rendezvous_timeout_s=20)
    t0 = time.monotonic()
    run = launch(hosts, out, cluster)
    took = time.monotonic() - t0
    assert run.returncode != 0
    err = run.stderr.strip().splitlines()[-1]
    print(f"\nbad interface: exit {run.returncode} after {took:.0f}s: {err[:400]}")
    assert "over interface lo" in err and "GLOO_SOCKET_IFNAME" in err and hosts.ip(0) in err, err
    assert "Traceback" not in run.stderr and "\x1b[" not in run.stderr
    attempts = sum(log.read_text().count("over interface lo") for log in (out / "logs").glob("rank-*.log"))
    assert attempts >= 2  # the first attempt and the one restart max_failures: 1 allows


def test_a_rank_stopped_mid_collective_fails_the_step_dumps_the_stacks_and_the_run_recovers(hosts, reference, tmp_path):
    out = tmp_path / "run"
    marker = tmp_path / "stalled"
    cluster = cluster_file(tmp_path, hosts, collective_timeout_s=15, env={"DISTSFT_STALL_AT": f"1:3:{marker}"})
    seen: dict[str, float] = {}
    watch = threading.Thread(target=_watch_stall, args=(marker, out, seen), daemon=True)
    watch.start()
    run = launch(hosts, out, cluster)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    watch.join(timeout=5)
    loss, weights = differences(reference, out)
    logs = {p.name: p.read_text() for p in (out / "logs").glob("rank-*.log")}
    stacks = [name for name, text in logs.items() if "most recent call first" in text]
    print(f"\nstall: stacks {seen.get('stacks', -1):.1f}s after it in {stacks}, next step "
          f"{seen.get('step', -1):.1f}s after it; loss {loss:.2e}, weights {weights:.2e}")  # fmt: skip
    assert "rank-0.log" in stacks and "distributed" in logs["rank-0.log"]
    assert loss < 1e-5 and weights < 1e-5


def _watch_stall(marker: Path, out: Path, seen: dict[str, float]) -> None:
    deadline = time.monotonic() + 600
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    t0 = marker.stat().st_mtime if marker.exists() else time.time()
    log = out / "logs" / "rank-0.log"
    while time.monotonic() < deadline and "step" not in seen:
        if "stacks" not in seen and log.is_file() and "most recent call first" in log.read_text():
            seen["stacks"] = time.time() - t0
        if any(r["step"] == 3 for r in _records(out)):
            seen["step"] = time.time() - t0
        time.sleep(0.2)


def _records(out: Path) -> list[dict]:
    try:
        return metrics(out)
    except (OSError, ValueError):
        return []


def test_hosts_killed_mid_run_one_replaced_one_not_every_step_once_and_the_uninterrupted_weights(
    hosts, reference, tmp_path
):
    """SIGKILL of every process of a host at step 3 while a third host joins: the run goes on on two
    workers; at step 5 the same with no replacement: after replacement_timeout_s it goes on on one worker
    (min_workers: 1), the ZeRO-2 checkpoint of two workers resharded to one."""
    out = tmp_path / "run"
    first, second = tmp_path / "stall-1", tmp_path / "stall-2"
    cluster = cluster_file(
        tmp_path, hosts, min_workers=1, replacement_timeout_s=30, max_failures=2,
        env={"DISTSFT_STALL_AT": f"1:3:{first},1:5:{second}"},
    )  # fmt: skip
    seen: dict[str, float] = {}

    def kill_hosts() -> None:
        _wait(first)
        seen["kill-1"] = time.time()
        hosts.kill(1)  # the stalled rank's host: raylet, workers, everything
        hosts.start_ray(2)  # the replacement
        _wait(second)
        seen["kill-2"] = time.time()
        hosts.kill(2)

    killer = threading.Thread(target=kill_hosts, daemon=True)
    killer.start()
    times: dict[int, float] = {}
    poll = threading.Thread(target=_step_times, args=(out, times), daemon=True)
    poll.start()
    run = launch(hosts, out, cluster, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    loss, weights = differences(reference, out)
    restarts = [line for line in run.stdout.splitlines() if line.startswith("restart ")]
    replaced, shrunk = times.get(3, 0) - seen.get("kill-1", 0), times.get(5, 0) - seen.get("kill-2", 0)
    print(f"\nkilled hosts: loss {loss:.2e}, weights {weights:.2e}; step 3 came {replaced:.0f}s after the first "
          f"kill (replaced), step 5 {shrunk:.0f}s after the second (not replaced)")  # fmt: skip
    print("  " + "\n  ".join(restarts))
    assert len(restarts) == 2, run.stdout[-3000:]
    assert "with 2 of 2 workers from step 2" in restarts[0]
    assert "with 1 of 2 workers from step 4" in restarts[1]
    assert "resharding" in run.stdout
    # the console says what happened in lines of ours: no Ray notices, converter chatter or colour codes
    assert "(raylet)" not in run.stdout + run.stderr and "\x1b[" not in run.stdout + run.stderr
    assert "Universal" not in run.stdout + run.stderr
    assert loss < 1e-5 and weights < 1e-5


def _wait(marker: Path, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.2)


def _step_times(out: Path, times: dict[int, float]) -> None:
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline and 6 not in times:
        for r in _records(out):
            times.setdefault(r["step"], time.time())
        time.sleep(0.2)
