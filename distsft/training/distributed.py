"""The process group: joining it, and the few collectives the loop itself runs (its records' sums and the
stop decision). DeepSpeed's own collectives are DeepSpeed's."""

from __future__ import annotations

import os
import random
import socket
from collections.abc import Sequence

import numpy as np
import torch
import torch.distributed as dist

from distsft.config.cluster import backend_for


def pick_device(local_rank: int) -> torch.device:
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def init_distributed(device: torch.device) -> None:
    """Join the process group: Ray Train has already made one on workers; ``--local`` makes a 1-rank group.

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
        os.environ.setdefault("LOCAL_RANK", "0")  # DeepSpeed reads it; harmless to inherit
        torch.distributed.init_process_group(
            backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1
        )
    deepspeed.init_distributed(dist_backend=backend, verbose=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def all_sum(values: Sequence[float], device: torch.device) -> list[float]:
    t = torch.tensor(list(values), dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t.tolist()


def agree(rank0_says: bool, rank: int, device: torch.device) -> bool:
    """Rank 0's answer on every rank (a collective), so all of them act on the same step."""
    (flag,) = all_sum([1.0 if rank == 0 and rank0_says else 0.0], device)
    return flag > 0
