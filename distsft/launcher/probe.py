"""What ``distsft doctor`` asks of each node, run there as Ray tasks and actors: the versions installed,
what the host name resolves to, the interface of the node's Ray address, free disk where checkpoints
go, whether this node sees the files the others wrote to ``storage_path``, and one tiny all-reduce over
the backend the run will use, joined exactly as a training worker joins (``join_group``).

Each function returns plain data; the verdicts and their wording are the driver's (``doctor.py``).
"""

from __future__ import annotations

import os
import shutil
import socket
import time
from pathlib import Path
from typing import Any

PACKAGES = ("torch", "deepspeed", "transformers", "datasets", "ray", "distsft")
STAMPS = ".distsft-doctor"


def versions() -> dict[str, str]:
    """Python and the installed distributions that must agree between nodes (pip's metadata, no imports)."""
    import platform
    from importlib import metadata

    found = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def stamp_dir(storage_path: str, stamp: str) -> str | Path:
    from distsft.checkpoint import storage

    return storage.join(storage_path, STAMPS, stamp)


def describe_node(storage_path: str | None, stamp: str) -> dict[str, Any]:
    """This node's facts, and a file named after its address written under ``storage_path``."""
    import ray

    from distsft.host import interface_of

    ip = ray.util.get_node_ip_address()
    name = socket.gethostname()
    try:
        resolved = socket.gethostbyname(name)
    except OSError:
        resolved = None
    info: dict[str, Any] = {
        "ip": ip,
        "hostname": name,
        "resolves_to": resolved,
        "interface": interface_of(ip),
        "versions": versions(),
    }
    if storage_path:
        info["write_error"] = _write_stamp(storage_path, stamp, ip)
    info["disk"] = free_disk(storage_path)
    return info


def _write_stamp(storage_path: str, stamp: str, ip: str) -> str | None:
    from distsft.checkpoint import storage

    where = storage.join(stamp_dir(storage_path, stamp), ip)
    try:
        if storage.is_remote(where):
            storage.bucket(where).write_text(where, ip)
        else:
            Path(where).parent.mkdir(parents=True, exist_ok=True)
            Path(where).write_text(ip)
    except Exception as e:  # noqa: BLE001 - reported, not raised: one node's answer among many
        return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
    return None


def seen_stamps(storage_path: str, stamp: str) -> list[str] | str:
    """The node addresses whose files this node sees under ``storage_path`` (or why it sees none)."""
    from distsft.checkpoint import storage

    where = stamp_dir(storage_path, stamp)
    try:
        if storage.is_remote(where):
            return sorted(storage.bucket(where).files(where))
        return sorted(p.name for p in Path(where).iterdir()) if Path(where).is_dir() else []
    except Exception as e:  # noqa: BLE001
        return f"{type(e).__name__}: {e}"


def remove_stamps(storage_path: str, stamp: str) -> None:
    from distsft.checkpoint import storage

    where = stamp_dir(storage_path, stamp)
    if storage.is_remote(where):
        storage.bucket(where).delete(where)
    else:
        shutil.rmtree(where, ignore_errors=True)
        try:  # the parent too, when no other doctor run is using it
            Path(where).parent.rmdir()
        except OSError:
            pass


def free_disk(storage_path: str | None) -> dict[str, Any]:
    """Free bytes where this node's checkpoint bytes land: ``storage_path`` (its nearest existing
    directory), or the local staging area on the way to an object store."""
    from distsft.checkpoint import storage

    if storage_path and not storage.is_remote(storage_path):
        where = Path(storage_path)
        while not where.exists() and where != where.parent:
            where = where.parent
    else:
        where = storage.staging_dir()
    usage = shutil.disk_usage(where)
    return {"path": str(where), "free": usage.free, "device": os.stat(where).st_dev}


GPU_SETTINGS = (
    "PYTORCH_ALLOC_CONF",
    "PYTORCH_CUDA_ALLOC_CONF",
    "TORCH_NCCL_ASYNC_ERROR_HANDLING",
    "TORCH_NCCL_BLOCKING_WAIT",
    "NCCL_DEBUG",
)
"""The environment a GPU worker sees that changes what distsft chose (``doctor`` says which hold)."""


class ReduceProbe:
    """One worker of the doctor's all-reduce (a Ray actor on one node)."""

    def address(self) -> tuple[str, int]:
        from ray.train._internal.utils import get_address_and_port

        return get_address_and_port()

    def all_reduce(self, fields: dict[str, Any]) -> dict[str, Any]:
        """Join the group as a training worker does, add every rank's ``rank + 1``, leave the group."""
        import ray
        import torch
        import torch.distributed as dist

        from distsft.training.distributed import IFNAME_VARS, Rendezvous, join_group

        rv = Rendezvous(node_ip=ray.util.get_node_ip_address(), **fields)
        t0 = time.perf_counter()
        join_group(rv)
        device = torch.device("cuda", 0) if rv.backend == "nccl" else torch.device("cpu")
        total = torch.tensor([float(rv.rank + 1)], device=device)
        dist.all_reduce(total)
        took = time.perf_counter() - t0
        dist.destroy_process_group()
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        native_bf16 = bool(gpus) and torch.cuda.is_bf16_supported(including_emulation=False)
        return {
            "env": {k: os.environ[k] for k in GPU_SETTINGS if k in os.environ},
            "native_bf16": native_bf16,
            "ip": rv.node_ip,
            "interface": os.environ.get(IFNAME_VARS[1] if rv.backend == "nccl" else IFNAME_VARS[0]),
            "sum": total.item(),
            "seconds": took,
            "gpus": gpus,
            "gpu_name": torch.cuda.get_device_name(0) if gpus else None,
        }
