"""Resume on any number of workers (``checkpoint/reshard.py``): a run that fails after its checkpoint of
step 2 on two Ray workers, goes on to step 4 on one process and fails again, and ends on four workers (or
a shorter chain of sizes) is the run one process makes uninterrupted: loss per step and final weights,
optimizer state included (``train.global_batch_size`` keeps the rows per step; the data order is a
function of the step)."""

from __future__ import annotations

import os

import pytest
import torch
from raytest import final_weights, metrics, run_cfg

from distsft.config.cluster import ClusterConfig, WorkerResources
from distsft.launcher.run import launch_local, launch_ray

pytestmark = pytest.mark.slow


def cfg(out, *extra: str):
    return run_cfg(out, "train.max_steps=6", "checkpoint.every_steps=2", "train.micro_batch_size=1",
                   "train.global_batch_size=4", "logging.plot=false", "logging.tensorboard=false", *extra)  # fmt: skip


def run_on(n: int, config, fail_at: str) -> dict:
    """``n`` workers on the module's Ray instance, or one process without Ray; ``fail_at``: a rank and step
    that raise (``DISTSFT_FAIL_AT``)."""
    if n == 1:
        os.environ["DISTSFT_FAIL_AT"] = fail_at
        try:
            return launch_local(config, quiet=True)
        finally:
            del os.environ["DISTSFT_FAIL_AT"]
    cluster = ClusterConfig(
        num_nodes=1, workers_per_node=n, resources_per_worker=WorkerResources(cpus=1), env={"DISTSFT_FAIL_AT": fail_at}
    )
    return launch_ray(config, cluster, quiet=True)


@pytest.mark.parametrize(
    "sizes, extra",
    [
        # ZeRO 2 shrinks 2 -> 1 in tests/test_multihost.py (a host lost); growing from one worker is the
        # same conversion under every stage, and runs here under ZeRO 3
        ([2, 1, 4], ["train.zero_stage=3"]),
        ([2, 1], ["train.zero_stage=1", "lora.r=8", "train.lr=1e-3"]),
    ],
    ids=["zero3", "zero1-lora"],
)
def test_a_run_resumed_on_other_worker_counts_is_the_uninterrupted_run(ray_instance, tmp_path, sizes, extra):
    ref, out = tmp_path / "uninterrupted", tmp_path / "run"
    launch_local(cfg(ref, *extra), quiet=True)
    for i, n in enumerate(sizes):
        last = i == len(sizes) - 1
        if last:
            assert run_on(n, cfg(out, *extra), "")["workers"] == n
            continue
        with pytest.raises(Exception, match="injected failure"):  # noqa: B017 - a worker's, or this process's
            run_on(n, cfg(out, *extra), f"0:{2 * i + 3}")  # fails after its checkpoint of step 2i+2
    ma, mb = metrics(ref), metrics(out)
    assert [r["step"] for r in mb] == [1, 2, 3, 4, 5, 6]
    ranks = [len(r.get("peak_mem_mb_by_rank") or [None]) for r in mb]  # who ran each step
    assert ranks[::2] == [sizes[min(i, len(sizes) - 1)] for i in range(3)], ranks
    loss = max(abs(a["loss"] - b["loss"]) / a["loss"] for a, b in zip(ma, mb, strict=True))
    wa, wb = final_weights(ref, "final"), final_weights(out, "final")
    weights = max((wa[k] - wb[k]).abs().max().item() for k in wa)
    print(f"\n{'->'.join(map(str, sizes))} workers {extra}: loss {loss:.1e} (relative), weights {weights:.1e}")
    assert loss < 1e-5
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-5, msg=k)
