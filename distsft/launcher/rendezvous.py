"""How Ray Train's workers find each other: rank 0's node IP and a free port on it, announced to every
worker before the training function starts; the joining itself is the worker's (``training/distributed.py``
``join_group``).

Ray Train's own ``TorchConfig`` joins the group in its controller's start-up, where a failure (gloo bound
to a loopback address, a port a firewall drops) is a controller error that is not counted toward
``max_failures`` and reaches the console as a Ray traceback. Here start-up only announces; a worker that
cannot join fails as a worker, within the rendezvous timeout, with one line, and is restarted like any
other failure.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ray.train.torch import TorchConfig
from ray.train.torch.config import _set_torch_distributed_env_vars, _TorchBackend

from distsft.training.distributed import RENDEZVOUS_ENV, Rendezvous


@dataclass
class RendezvousConfig(TorchConfig):
    """``TorchConfig`` whose backend announces the rendezvous instead of joining it."""

    rendezvous_timeout_s: float = 60.0
    collective_timeout_s: float = 600.0
    upload_timeout_s: float = 3600.0

    @property
    def backend_cls(self) -> type:
        return _AnnouncingBackend


class _AnnouncingBackend(_TorchBackend):
    def on_start(self, worker_group: Any, backend_config: RendezvousConfig) -> None:
        from ray.train._internal.utils import get_address_and_port

        address, port = worker_group.execute_single(0, get_address_and_port)
        worker_group.execute(_set_torch_distributed_env_vars)  # LOCAL_RANK, RANK, ... as torchrun sets them
        for rank in range(len(worker_group)):
            fields = {
                "backend": backend_config.backend,
                "rank": rank,
                "world_size": len(worker_group),
                "address": address,
                "port": port,
                "rendezvous_timeout_s": backend_config.rendezvous_timeout_s,
                "collective_timeout_s": backend_config.collective_timeout_s,
                "upload_timeout_s": backend_config.upload_timeout_s,
            }
            worker_group.execute_single(rank, _announce, fields)

    def on_shutdown(self, worker_group: Any, backend_config: RendezvousConfig) -> None:
        """Leave the group, waiting a few seconds at most: after a failure a stopped or hung rank never
        answers, and Ray's own wait (30s) would only delay the restart; the workers are killed next."""
        import ray
        from ray.train.torch.config import _shutdown_torch

        futures = worker_group.execute_async(_shutdown_torch, destroy_process_group=len(worker_group) > 1)
        try:
            ray.get(futures, timeout=SHUTDOWN_TIMEOUT_S)
        except ray.exceptions.RayError:  # a timeout, or a worker already gone with its node
            pass


SHUTDOWN_TIMEOUT_S = 5.0


def _announce(fields: dict[str, Any]) -> None:
    import os

    import ray

    os.environ[RENDEZVOUS_ENV] = Rendezvous(node_ip=ray.util.get_node_ip_address(), **fields).to_env()
