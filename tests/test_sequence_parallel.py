"""Ulysses sequence parallelism: a row split over workers trains exactly as the whole row in one process."""

from __future__ import annotations

import json
import socket

import pytest
import torch

from distsft.config import load_config
from distsft.data.collate import collate
from distsft.errors import ConfigError
from distsft.training import sequence_parallel


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(world: int, cases, tmp_path) -> list[dict]:
    import sptest

    out = tmp_path / f"sp{world}.json"
    torch.multiprocessing.spawn(sptest.compare, args=(world, _port(), cases, str(out)), nprocs=world)
    return json.loads(out.read_text())


def _assert_equal(results: list[dict]) -> None:
    for r in results:
        assert r["grads"] and r["tokens"] == r["ref_tokens"], r
        assert abs(r["loss"] - r["ref_loss"]) <= 1e-5 * abs(r["ref_loss"]), r
        assert r["grad_rel"] <= 1e-5, r


@pytest.mark.slow
def test_rows_split_over_two_workers_give_the_whole_rows_loss_and_gradients(tmp_path):
    """Packed rows (examples longer than the sliding windows, a padded row) over 2 workers: grouped-query
    heads split, sliding windows (sdpa, eager), soft-capping (Gemma-2, eager), a mixture of experts, and a
    single key/value head replicated to both workers."""
    cases = [
        ("llama", "sdpa", {}),
        ("llama", "eager", {"num_key_value_heads": 1}),
        ("mistral", "sdpa", {}),
        ("qwen2-swa", "sdpa", {}),
        ("gemma2", "eager", {}),
        ("gemma3", "sdpa", {}),
        ("qwen3-moe", "sdpa", {}),
        ("phi3", "sdpa", {}),
    ]
    results = _spawn(2, cases, tmp_path)
    assert len(results) == len(cases)
    _assert_equal(results)


@pytest.mark.slow
def test_rows_split_over_four_workers_replicate_two_key_value_heads(tmp_path):
    _assert_equal(_spawn(4, [("llama", "sdpa", {}), ("mistral", "eager", {})], tmp_path))


def test_shard_batch_shifts_labels_before_the_split():
    rows = [{"input_ids": [5, 6, 7, 8, 9], "labels": [-100, -100, 7, 8, 9], "position_ids": [0, 1, 2, 0, 1],
             "seq_lens": [3, 2]}]  # fmt: skip
    batch = collate(rows, pad_id=0, varlen=True, multiple_of=2)
    assert batch["input_ids"].shape == (1, 6)  # padded to a multiple of the group size
    a, b = (sequence_parallel.shard_batch(batch, 2, r) for r in (0, 1))
    assert a["input_ids"].tolist() == [[5, 6, 7]] and b["input_ids"].tolist() == [[8, 9, 0]]
    # the last token of worker 0's slice predicts the first token of worker 1's
    assert a["shift_labels"].tolist() == [[-100, 7, 8]] and b["shift_labels"].tolist() == [[9, -100, -100]]
    assert a["cu_seq_lens_q"].tolist() == b["cu_seq_lens_q"].tolist() == [0, 3, 5, 6]  # the whole row's
    assert "labels" not in a


def test_sizes_that_do_not_divide_are_one_line_config_errors(tmp_path):
    from distsft.model.loading import traits_and_attention

    with pytest.raises(ConfigError, match=r"train.sequence_parallel: 3 does not divide data.max_seq_len = 512"):
        load_config(None, ["train.sequence_parallel=3", "data.max_seq_len=512"])
    cfg = load_config(None, ["train.sequence_parallel=2"])
    with pytest.raises(ConfigError, match=r"sequence_parallel = 2 does not divide the 3 worker\(s\)"):
        cfg.batch_plan(3)
    plan = cfg.batch_plan(4)
    assert plan.data_parallel == 2 and plan.global_batch == 2 * cfg.train.micro_batch_size * cfg.train.grad_accum_steps
    traits, attn = traits_and_attention(cfg.model, "cpu")  # the demo: 4 heads, 4 key/value heads
    with pytest.raises(ConfigError, match=r"= 8 does not divide the model's 4 attention heads"):
        sequence_parallel.check(8, traits, attn)
    with pytest.raises(ConfigError, match=r"attention paged_attention cannot run split sequences; these can: "):
        sequence_parallel.check(2, traits, "paged_attention")
    sequence_parallel.check(2, traits, attn)


# --- whole runs on Ray Train workers (real DeepSpeed, gloo) ---------------------------------------------
def _sp_cfg(out, *extra: str):
    from raytest import run_cfg

    return run_cfg(out, "train.max_steps=4", "train.micro_batch_size=1", *extra)


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """One process, grad accumulation 4, packed and unpacked: what every split must reproduce."""
    from distsft.launcher.run import launch_local

    out = {}
    for packing in ("true", "false"):
        out[packing] = tmp_path_factory.mktemp(f"ref-{packing}")
        launch_local(_sp_cfg(out[packing], "train.grad_accum_steps=4", *_data(packing)), quiet=True)
    return out


def _data(packing: str) -> list[str]:
    """The unpacked runs also hold out examples, so eval runs split over the workers too."""
    return [f"data.packing={packing}"] + (["data.eval_fraction=0.1"] if packing == "false" else [])


@pytest.mark.slow
@pytest.mark.parametrize(
    "workers,stage,packing,extra",
    [
        (2, 2, "true", ["model.gradient_checkpointing=true", "model.tiled_mlp=true"]),
        (2, 1, "true", []),
    ],
    ids=["sp2xdp1-zero2-checkpointed-tiled", "sp2xdp1-zero1"],
)
def test_sequence_parallel_runs_equal_one_process(ray_instance, references, tmp_path, workers, stage, packing, extra):
    """Loss, grad norm and final weights of SP 2 x DP (workers / 2) equal one process within 1e-5, with
    activation checkpointing and tiled MLPs on (which change nothing but memory); the export is an
    ordinary model directory (the attention wrapper is not in its config)."""
    from raytest import assert_same_run, cluster

    from distsft.launcher.run import launch_ray

    accum = 4 // (workers // 2)
    cfg = _sp_cfg(
        tmp_path, "train.sequence_parallel=2", f"train.grad_accum_steps={accum}", f"train.zero_stage={stage}",
        *_data(packing), *extra,
    )  # fmt: skip
    launch_ray(cfg, cluster(workers), quiet=True)
    assert_same_run(references[packing], tmp_path)
    config = json.loads((tmp_path / "final" / "config.json").read_text())
    assert sequence_parallel.NAME not in json.dumps(config)
    log = (tmp_path / "logs" / "rank-0.log").read_text()
    assert f"Ulysses sequence parallel 2 x data parallel {workers // 2}" in log
    assert ("tiled MLP" in log) == ("model.tiled_mlp=true" in extra)


@pytest.mark.slow
def test_sp2_x_dp2_under_zero3_restarted_after_a_failure_equals_one_process(ray_instance, references, tmp_path):
    """SP 2 x DP 2 on 4 workers, ZeRO-3, tiled MLPs, unpacked rows with held-out eval; rank 3 fails at
    step 3 (after checkpoint 2), Ray restarts the group, which resumes from the checkpoint: every step
    once, one process's losses, grad norms, final weights and eval loss within 1e-5."""
    from raytest import assert_same_run, cluster, metrics, with_env

    from distsft.launcher.run import launch_ray

    cfg = _sp_cfg(tmp_path, "train.sequence_parallel=2", "train.grad_accum_steps=2", "train.zero_stage=3",
                  "model.tiled_mlp=true", "checkpoint.every_steps=2", *_data("false"))  # fmt: skip
    marker = tmp_path / "failed-once"
    launch_ray(cfg, with_env(cluster(4, max_failures=1), DISTSFT_FAIL_AT=f"3:3:{marker}"), quiet=True)
    assert marker.exists()
    assert [r["step"] for r in metrics(tmp_path)] == [1, 2, 3, 4]
    log = (tmp_path / "logs" / "rank-0.log").read_text()
    assert "step-00000002 at step 2" in log  # resumed, not started again
    assert "Ulysses sequence parallel 2 x data parallel 2" in log and "tiled MLP" in log
    assert_same_run(references["false"], tmp_path)
    (ref,), (run,) = ([r["eval_loss"] for r in metrics(d) if "eval_loss" in r] for d in (references["false"], tmp_path))
    assert abs(ref - run) <= 1e-5 * ref, (ref, run)  # eval over split rows: the same token-weighted loss


@pytest.mark.parametrize("checkpointing,autocast", [(False, False), (True, False), (False, True)])
def test_tiled_mlps_give_the_untiled_loss_and_gradients(checkpointing, autocast):
    """Tiles of uneven size (37 tokens in 4 tiles), with and without activation checkpointing; under bf16
    autocast, the backward pass recomputes the tiles in bf16 as the forward pass ran them (autograd's thread
    has autocast off: recomputed in fp32, the gradients would belong to another forward)."""
    from isolation import make_examples
    from tinymodels import tiny_llama

    from distsft.data.packing import pack
    from distsft.model.loading import enable_activation_checkpointing
    from distsft.training.loss import token_loss_sum
    from distsft.training.tiling import tile_mlps

    rows = pack(make_examples([20, 17], 101), max_len=37, seed=0)
    batch = collate(rows, 0)
    results = []
    for tiled in (False, True):
        model = tiny_llama("sdpa", seed=3)
        if checkpointing:
            enable_activation_checkpointing(model)
        if tiled:
            assert tile_mlps(model, tokens_per_pass=37, hidden_size=10) == 2  # ceil(37 / 10) = 4 tiles
        model.train()
        dtypes = []  # of the MLP's output, in the forward pass and in the backward pass's recomputation
        model.model.layers[0].mlp.down_proj.register_forward_hook(lambda m, a, out, seen=dtypes: seen.append(out.dtype))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = token_loss_sum(model, batch).loss_sum
        loss.backward()
        results.append((loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters()}))
        assert set(dtypes) == {torch.bfloat16 if autocast else torch.float32}, dtypes
        assert checkpointing or len(dtypes) == (8 if tiled else 1)  # 4 tiles forward, 4 recomputed
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_b, loss_a, rtol=2e-3 if autocast else 1e-6, atol=0)
    for k in grads_a:
        if autocast:  # bf16 matmuls of other shapes round differently: the whole tensor's relative error
            assert (grads_b[k] - grads_a[k]).norm() <= 1e-2 * grads_a[k].norm(), k
        else:
            torch.testing.assert_close(grads_b[k], grads_a[k], rtol=1e-5, atol=1e-7, msg=k)
