"""Training on real Ray Train workers running real DeepSpeed (gloo on CPU): equivalence with the
single-process run, failure reporting and placement errors."""

from __future__ import annotations

import json
import time

import pytest
from raytest import assert_same_run, cluster, metrics, run_cfg, with_env

from distsft.errors import DistsftError
from distsft.launcher.run import launch_local, launch_ray

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """1 worker x grad accumulation 4, no Ray: what every split of the same global batch must reproduce."""
    out = tmp_path_factory.mktemp("ref")
    launch_local(run_cfg(out, "train.micro_batch_size=1", "train.grad_accum_steps=4"), quiet=True)
    return out


@pytest.mark.parametrize(
    "stage,workers",
    [(1, 2), (2, 2)],  # ZeRO 2 and 3 on 1, 2 and 4 workers: tests/test_reshard.py; SP x DP: test_sequence_parallel
)
def test_workers_times_accumulation_give_the_same_steps(ray_instance, reference, tmp_path, stage, workers):
    """Packed rows hold unequal token counts per rank; the loss is still the global token mean. The workers
    run the fused loss (what ``auto`` picks on GPUs for large vocabularies), whose backward passes through
    a tensor taken from a hook on the output layer rather than the engine's outputs; the one process runs
    the plain loss: ZeRO's gradient reduction must still see every micro-batch's gradients."""
    cfg = run_cfg(
        tmp_path,
        "train.micro_batch_size=1",
        f"train.grad_accum_steps={4 // workers}",
        f"train.zero_stage={stage}",
        "train.cross_entropy=fused",
    )
    launch_ray(cfg, cluster(workers), quiet=True)
    assert_same_run(reference, tmp_path)
    rows = metrics(tmp_path)
    assert all("fastest_worker_s" in r and r["peak_mem_mb"] > 0 for r in rows)
    placement = json.loads((tmp_path / "workers.json").read_text())
    assert sorted(placement) == [str(r) for r in range(workers)]
    # the driver followed the controller's metrics.jsonl into TensorBoard, and drew the curve at the end
    assert all(r["flops"] > 0 and r["tflops_per_device"] > 0 for r in rows)
    assert list(tmp_path.glob("events.out.tfevents.*")) and (tmp_path / "loss.png").is_file()
    assert json.loads((tmp_path / "summary.json").read_text())["supervised_tokens"] == sum(r["tokens"] for r in rows)


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


def test_zero_stage_0_on_two_workers_equals_one_process_and_the_summary_says_what_ran(
    ray_instance, reference, tmp_path
):
    """``train.zero_stage: 0`` is DeepSpeed without ZeRO on any number of workers (the loop clips, on the
    all-reduced gradients); a Ray run's summary.json holds what a local one does (parameters, device,
    attention, the loss kernel), not only the last record."""
    cfg = run_cfg(tmp_path, "train.micro_batch_size=1", "train.grad_accum_steps=2", "train.zero_stage=0")
    launch_ray(cfg, cluster(2), quiet=True)
    assert_same_run(reference, tmp_path)
    ray_summary = json.loads((tmp_path / "summary.json").read_text())
    local_summary = json.loads((reference / "summary.json").read_text())
    assert set(local_summary) <= set(ray_summary), set(local_summary) - set(ray_summary)
    for key in ("parameters", "device", "attention", "loss_kernel", "steps", "start_step"):
        assert ray_summary[key] == local_summary[key], key
    assert ray_summary["workers"] == 2 and local_summary["workers"] == 1
