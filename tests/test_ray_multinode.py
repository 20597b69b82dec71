"""Two Ray nodes on this machine (ray.cluster_utils.Cluster): workers land on both, results unchanged."""

from __future__ import annotations

import json

import pytest
from raytest import assert_same_run, cluster, run_cfg

from distsft.launcher.run import launch_local, launch_ray

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def two_nodes():
    import ray
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "dashboard_host": "127.0.0.1"})
    c.add_node(num_cpus=1)
    ray.init(address=c.address, logging_level="WARNING")
    yield c
    ray.shutdown()
    c.shutdown()


def test_workers_spread_over_two_nodes_match_the_single_process_run(two_nodes, tmp_path):
    ref, out = tmp_path / "ref", tmp_path / "ray"
    launch_local(run_cfg(ref, "train.micro_batch_size=2", "train.grad_accum_steps=1", "train.zero_stage=3"), quiet=True)
    cfg = run_cfg(out, "train.micro_batch_size=1", "train.grad_accum_steps=1", "train.zero_stage=3")
    launch_ray(
        cfg, cluster(1, nodes=2, placement_strategy="STRICT_SPREAD", storage_path=str(tmp_path / "shared")), quiet=True
    )
    placement = json.loads((out / "workers.json").read_text())
    assert len({w["node_id"] for w in placement.values()}) == 2, placement
    assert_same_run(ref, out)
