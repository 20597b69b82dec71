"""Training on real Ray Train workers running real DeepSpeed (gloo on CPU): equivalence with the
single-process run, failure reporting and placement errors."""

from __future__ import annotations

import json
import time

import pytest
from raytest import assert_same_run, cluster, metrics, run_cfg, with_env

from distsft.errors import DistsftError
from distsft.launch import launch_local, launch_ray

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_instance():
    import ray

    ray.init(num_cpus=4, dashboard_host="127.0.0.1", logging_level="WARNING")
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """1 worker x grad accumulation 4, no Ray: what every split of the same global batch must reproduce."""
    out = tmp_path_factory.mktemp("ref")
    launch_local(run_cfg(out, "train.micro_batch_size=1", "train.grad_accum_steps=4"), quiet=True)
    return out


@pytest.mark.parametrize(
    "stage,workers",
    [(1, 2), (2, 2), (2, 4), (3, 2), (3, 4)],
)
def test_workers_times_accumulation_give_the_same_steps(ray_instance, reference, tmp_path, stage, workers):
    """Packed rows hold unequal token counts per rank; the loss is still the global token mean."""
    cfg = run_cfg(
        tmp_path, "train.micro_batch_size=1", f"train.grad_accum_steps={4 // workers}", f"train.zero_stage={stage}"
    )
    launch_ray(cfg, cluster(workers), quiet=True)
    assert_same_run(reference, tmp_path)
    rows = metrics(tmp_path)
    assert all("fastest_worker_s" in r and r["peak_mem_mb"] > 0 for r in rows)
    placement = json.loads((tmp_path / "workers.json").read_text())
    assert sorted(placement) == [str(r) for r in range(workers)]


def test_a_failing_worker_stops_the_run_with_its_rank_node_and_traceback(ray_instance, tmp_path):
    cfg = run_cfg(tmp_path, "train.micro_batch_size=1", "train.grad_accum_steps=2")
    with pytest.raises(DistsftError) as e:
        launch_ray(cfg, with_env(cluster(2), DISTSFT_FAIL_AT="1:2"), quiet=True)
    msg = str(e.value)
    assert "rank 1 on node" in msg and "injected failure" in msg and "Traceback" in msg


def test_unsatisfiable_placement_fails_fast_naming_what_is_missing(ray_instance, tmp_path):
    cfg = run_cfg(tmp_path)
    t0 = time.monotonic()
    with pytest.raises(DistsftError) as e:
        launch_ray(cfg, cluster(8, placement_timeout_s=3), quiet=True)
    assert time.monotonic() - t0 < 60
    msg = str(e.value)
    assert "cannot place 8 workers" in msg and "CPU=1" in msg and "CPU=4" in msg
