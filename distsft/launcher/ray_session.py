"""This launch's Ray: a cluster the cluster file names, or an instance started here that is this launch's
alone.

An instance started here lives in its own temporary directory, and the launcher points Ray's own address
lookups at it, so another Ray instance on the machine is never joined nor mistaken for it. Its processes
are noted in ``output_dir/.ray-local.json``, so a later launch can stop what a SIGKILL of this one left.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from distsft.config.cluster import ClusterConfig
from distsft.errors import DistsftError
from distsft.host import write_atomic

RAY_STATE = ".ray-local.json"
TEMP_PREFIX = "distsft-ray-"


class RaySession:
    """Ray for one launch, connected on first need (``ensure``) and, if this launch started it, stopped at
    the end; a Ray this process was already connected to (a test's, a notebook's) is used and left up."""

    def __init__(self, cluster: ClusterConfig, out: Path, verbose: bool) -> None:
        self.cluster, self.out, self.verbose = cluster, out, verbose
        self.started = False
        """Whether this session started or connected Ray (and so shuts it down)."""
        self.local = False
        """Whether the instance runs on this machine, started by this session."""
        self._temp: str | None = None

    def __enter__(self) -> RaySession:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Stop Ray if this session started (or connected) it; a no-op after that."""
        if self.started:
            self.shutdown()

    def ensure(self) -> None:
        """Connect to the cluster file's Ray, or start one here that is this launch's alone."""
        import ray

        if ray.is_initialized():
            return
        cluster, out = self.cluster, self.out
        kwargs: dict[str, Any] = {"log_to_driver": self.verbose, "logging_level": "INFO" if self.verbose else "ERROR"}
        if cluster.address in (None, "local"):
            _reap_killed_run(out)
            os.environ.pop("RAY_ADDRESS", None)  # never join an instance someone else started
            # Ray makes its session directory world-writable and its logs (runtime envs included) readable by
            # all; inside a directory of our own (0700) no other user of the machine reaches them.
            self._temp = tempfile.mkdtemp(prefix=TEMP_PREFIX)
            ray.init(
                num_cpus=cluster.num_cpus,
                dashboard_host=cluster.dashboard_host,
                _temp_dir=os.path.join(self._temp, "ray"),
                **kwargs,
            )
            self.started = self.local = True
            # Ray's own helpers (the state API that Ray Train's controller uses) find "the" local instance
            # through RAY_ADDRESS first; point them at ours, so a second instance on the machine is no puzzle.
            os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
            self.note_processes()
            return
        error = None
        with _captured_stderr(out / "logs" / "driver.log") as said:  # Ray's C++ client retries noisily
            try:
                ray.init(address=cluster.address, **kwargs)
            except Exception as e:  # noqa: BLE001
                error = e
        if error is not None:
            raise DistsftError(connect_error(cluster.address, error, said())) from None
        self.started = True

    def note_processes(self) -> None:
        """Record the Ray processes of an instance started here (workers come and go: called as they do)."""
        if self.local:
            record_ray_processes(self.out, self._temp)

    def shutdown(self) -> None:
        """Stop the Ray this launch started, and remove its session files (its logs are in output_dir/logs)."""
        import ray

        ray.shutdown()
        self.started = False
        (self.out / RAY_STATE).unlink(missing_ok=True)
        if self._temp:
            shutil.rmtree(self._temp, ignore_errors=True)
            self._temp = None


def connect_error(address: str, error: Exception, client_log: str = "") -> str:
    text = f"{type(error).__name__}: {error}"
    if "InvalidAuthToken" in client_log or "auth" in text.lower():
        return (
            f"cluster address {address}: the cluster refused this launcher's Ray token: set RAY_AUTH_TOKEN to "
            "the cluster's token (`ray get-auth-token` on the head node; or RAY_AUTH_TOKEN_PATH to a file "
            "holding it) and RAY_AUTH_MODE=token; see README 'Running on a cluster'"
        )
    return f"cluster address {address}: cannot connect to Ray: {text.splitlines()[0]}"


@contextlib.contextmanager
def _captured_stderr(log: Path):
    """The process's stderr (file descriptor 2, where C++ libraries write) into ``log`` while inside;
    yields a function that returns what was written."""
    import tempfile

    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        text: list[str] = []
        try:
            yield lambda: "".join(text)
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            text.append(tmp.read().decode(errors="replace"))
            log.parent.mkdir(parents=True, exist_ok=True)
            with open(log, "a", encoding="utf-8") as f:
                f.write(text[0])


def record_ray_processes(out: Path, temp: str | None = None) -> None:
    """Note the Ray processes this launcher started (its descendants, with their start times) and its
    session directory, so a later launch can stop and remove whatever a SIGKILL of this one leaves."""
    import psutil

    me = psutil.Process()
    procs = []
    for child in me.children(recursive=True):
        try:
            procs.append([child.pid, child.create_time()])
        except psutil.NoSuchProcess:
            pass
    write_atomic(out / RAY_STATE, json.dumps({"launcher_pid": me.pid, "processes": procs, "temp": temp}))


def _reap_killed_run(out: Path) -> None:
    """A launcher killed with SIGKILL cannot stop the Ray instance it started; most of it dies with it,
    but agents whose parent lingers as a zombie may not. The next launch in the same output_dir stops
    the processes the killed one recorded, and refuses to run beside a launcher that is still alive."""
    import psutil

    state = out / RAY_STATE
    if not state.is_file():
        return
    info = json.loads(state.read_text())
    pid = info.get("launcher_pid")
    if pid and psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE and pid != os.getpid():
        raise DistsftError(f"another launch (pid {pid}) is running in {out}; stop it first or use another output_dir")
    stale = []
    for pid, created in info.get("processes", []):
        try:
            proc = psutil.Process(pid)
            if abs(proc.create_time() - created) < 1e-3 and proc.status() != psutil.STATUS_ZOMBIE:
                stale.append(proc)  # the same process, not a new one that reused the pid
        except psutil.NoSuchProcess:
            pass
    for proc in stale:
        proc.kill()
    psutil.wait_procs(stale, timeout=10)
    if stale:
        print(f"stopped {len(stale)} leftover Ray processes of an earlier launch that was killed", flush=True)
    temp = info.get("temp")
    if temp and Path(temp).name.startswith(TEMP_PREFIX) and Path(temp).is_dir() and Path(temp).owner() == _me():
        shutil.rmtree(temp, ignore_errors=True)  # its session directory (logs, sockets): ours, by name and owner
    state.unlink(missing_ok=True)


def _me() -> str:
    import pwd

    return pwd.getpwuid(os.getuid()).pw_name
