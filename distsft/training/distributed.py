"""The process group: joining it, and the few collectives the loop itself runs (its records' sums and the
stop decision). DeepSpeed's own collectives are DeepSpeed's."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from distsft.config.cluster import backend_for
from distsft.errors import DistsftError

ALLOC_VARS = ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")
EXPANDABLE = "expandable_segments:True"


def pick_device(local_rank: int) -> torch.device:
    if torch.cuda.is_available():
        settings = allocator_settings(os.environ)
        if settings:
            torch.cuda.memory._set_allocator_settings(settings)
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def allocator_settings(env: dict[str, str] | os._Environ) -> str | None:
    """PyTorch's caching allocator with expandable segments, unless the environment configures it: packed
    rows change width from step to step, and fixed-size segments then fragment (PyTorch's own advice for
    varying shapes). None where the user's setting stands."""
    return None if any(env.get(v) for v in ALLOC_VARS) else EXPANDABLE


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def init_distributed(device: torch.device) -> None:
    """Join the process group: the rendezvous the launcher's Ray backend announced (``join_group``), or, for
    ``--local``, a 1-rank group.

    The local group is made with an explicit loopback address instead of ``MASTER_*`` environment
    variables, so nothing leaks into child processes (which would then fight over the same port).
    """
    import deepspeed
    import deepspeed.ops

    # DeepSpeed compiles a shared-memory all-reduce for CPU *inference* when it starts (a C++ build on a
    # fresh machine, and a log line); training all-reduces through torch.distributed and never uses it.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    backend = backend_for(device.type == "cuda")
    if not torch.distributed.is_initialized():
        if RENDEZVOUS_ENV in os.environ:
            join_group(Rendezvous.from_env())
        else:
            os.environ.setdefault("LOCAL_RANK", "0")  # DeepSpeed reads it; harmless to inherit
            torch.distributed.init_process_group(
                backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1
            )
    deepspeed.init_distributed(dist_backend=backend, verbose=False)


RENDEZVOUS_ENV = "DISTSFT_RENDEZVOUS"
IFNAME_VARS = ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")


@dataclass(frozen=True)
class Rendezvous:
    """Where and how a worker joins its group: set by the launcher's Ray backend on every worker, before
    the training function runs, so that joining is part of the worker's run (a failure there is a
    worker failure, restarted like any other)."""

    backend: str
    rank: int
    world_size: int
    address: str
    """Rank 0's node IP (its Ray address)."""
    port: int
    node_ip: str
    """This worker's node IP: its interface is the one gloo and NCCL use."""
    rendezvous_timeout_s: float
    collective_timeout_s: float
    upload_timeout_s: float = 3600.0

    def to_env(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_env(cls) -> Rendezvous:
        return cls(**json.loads(os.environ[RENDEZVOUS_ENV]))


def join_group(rv: Rendezvous) -> None:
    """Form the process group with bounds: the interface of this node's IP for gloo and NCCL (unless the
    cluster file's ``env`` names one), rank 0's address reached within ``rendezvous_timeout_s`` or one line
    that says what to change, and every collective bounded by ``collective_timeout_s``."""
    from datetime import timedelta

    from distsft.host import interface_of

    iface = interface_of(rv.node_ip)
    for var in IFNAME_VARS:
        if iface and not os.environ.get(var):
            os.environ[var] = iface
    named = os.environ.get(IFNAME_VARS[0]) or iface or "?"
    fix = (
        "check that the nodes reach each other on that address and port (firewall, security group), or name "
        "the interface that does in the cluster file's env (GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME); the "
        "cluster file's rendezvous_timeout_s bounds the wait"
    )
    if rv.rank != 0:
        _wait_for(
            rv.address,
            rv.port,
            rv.rendezvous_timeout_s,
            f"rank 0's rendezvous at {rv.address}:{rv.port} is not reachable over interface {named} within "
            f"{rv.rendezvous_timeout_s:g}s; {fix}",
        )
    try:
        dist.init_process_group(
            rv.backend,
            init_method=f"tcp://{rv.address}:{rv.port}",
            rank=rv.rank,
            world_size=rv.world_size,
            timeout=timedelta(seconds=rv.rendezvous_timeout_s),
        )
    except Exception as e:  # noqa: BLE001 - one line instead of gloo's or the store's traceback
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DistsftError(
            f"the process group at {rv.address}:{rv.port} could not be formed over interface {named}: {first}; {fix}"
        ) from None
    # Joining is bounded by the rendezvous timeout; from here every collective by the collective one: the
    # world group's, and that of every group made later (DeepSpeed clones the world group for ZeRO, and
    # new_group() takes torch's module default of 30 minutes, not the world group's timeout). The store's
    # too: NCCL makes its communicators at a group's first collective, after the model is loaded, and
    # exchanges their ids through the store, whose waits would otherwise stay bounded by the rendezvous
    # timeout (a rank loading a large model a minute after another failed with "wait timeout").
    from torch.distributed import distributed_c10d as c10d

    bound = timedelta(seconds=rv.collective_timeout_s)
    c10d._get_default_store().set_timeout(bound)
    c10d._set_pg_timeout(bound)
    c10d.default_pg_timeout = bound
    c10d.default_pg_nccl_timeout = bound
    os.environ.setdefault("LOCAL_RANK", "0")


def collective_timeout_s() -> float | None:
    """This worker's collective timeout (a launch on Ray), or None (``--local``: nothing to wait for)."""
    return Rendezvous.from_env().collective_timeout_s if RENDEZVOUS_ENV in os.environ else None


_upload_group: tuple[Any, Any] | None = None


def upload_group() -> Any:
    """A gloo group whose collectives wait up to the cluster's ``upload_timeout_s``: a rank that finished
    uploading its part of a checkpoint waits here for the slowest one, not in a collective bounded by the
    training timeout (a slow upload is not a hung rank). Made at the first save that needs it: every rank
    saves at the same step, so every rank makes it at the same point."""
    global _upload_group
    from datetime import timedelta

    world = dist.group.WORLD
    if _upload_group is None or _upload_group[0] is not world:  # a new group after a restart in-process
        bound = Rendezvous.from_env().upload_timeout_s if RENDEZVOUS_ENV in os.environ else 3600.0
        _upload_group = (world, dist.new_group(backend="gloo", timeout=timedelta(seconds=bound)))
    return _upload_group[1]


def _wait_for(address: str, port: int, timeout_s: float, message: str) -> None:
    """Until ``address:port`` accepts a TCP connection (rank 0 starts listening when it reaches the group),
    or raise ``message`` once ``timeout_s`` has passed."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((address, port), timeout=min(5.0, timeout_s)):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise DistsftError(message) from None
            time.sleep(0.5)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class StopPoll:
    """Rank 0's stop request (SIGTERM, SLURM's USR1, Ctrl-C) on every rank within two steps, whatever
    ``train.log_every`` is, with no device sync: every step, rank 0's answer (asked at most once a
    second: on Ray it is an actor call) enters an asynchronous all-reduce of a host tensor on a gloo group
    of its own, and the next step reads the result. Every rank reads the same exchange at the same step,
    so all of them stop at the same step."""

    def __init__(self, should_stop: Callable[[], bool], rank: int, world_size: int, every_s: float = 1.0) -> None:
        self.should_stop, self.rank, self.every_s = should_stop, rank, every_s
        self.group = dist.new_group(backend="gloo") if world_size > 1 else None
        self.pending: tuple[Any, torch.Tensor] | None = None
        self.asked = -float("inf")

    def poll(self) -> bool:
        """Whether a stop was requested (as of the previous step's exchange); starts this step's."""
        stop = False
        if self.pending is not None:
            work, flag = self.pending
            work.wait()  # a host tensor on gloo: waits for the other ranks' previous step, not for a device
            stop = bool(flag[0] > 0)
            self.pending = None
        mine = False
        if self.rank == 0 and time.monotonic() - self.asked >= self.every_s:
            self.asked = time.monotonic()
            mine = self.should_stop()
        if self.group is None:
            return stop or mine
        flag = torch.tensor([1.0 if mine else 0.0])
        self.pending = (dist.all_reduce(flag, group=self.group, async_op=True), flag)
        return stop

    def close(self) -> None:
        if self.pending is not None:  # every rank started it at the same step: every rank finishes it
            self.pending[0].wait()
            self.pending = None


def all_sum(values: Sequence[float], device: torch.device) -> list[float]:
    t = torch.tensor(list(values), dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t.tolist()


def agree(rank0_says: bool, rank: int, device: torch.device) -> bool:
    """Rank 0's answer on every rank (a collective), so all of them act on the same step."""
    (flag,) = all_sum([1.0 if rank == 0 and rank0_says else 0.0], device)
    return flag > 0
