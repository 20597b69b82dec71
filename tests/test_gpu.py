"""The paths only a GPU runs: bf16, PyTorch's varlen kernel, flex_attention, pinned-memory prefetch with
CUDA-event timing, torch's fused AdamW, and QLoRA's 4-bit layers on CUDA. Skipped without a GPU (CI has
none); run on a lent GPU machine (benchmarks/gpu_check.sh)."""

from __future__ import annotations

import pytest
import torch
from families import save_family
from raytest import metrics, run_cfg

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.mark.parametrize("name", ["llama", "mistral", "gemma2"])
def test_auto_attention_on_gpu_isolates_packed_examples(name, tmp_path):
    """Whatever `auto` picks on this GPU (varlen for Llama and Mistral's window, flex for Gemma-2's
    soft-capping), a packed batch equals its examples alone within bf16 rounding."""
    from families import family_model
    from isolation import packed_vs_alone

    from distsft.config import ModelConfig
    from distsft.model.loading import traits_and_attention

    shape = {"hidden_size": 128, "intermediate_size": 256, "head_dim": 32}  # flex needs head_dim >= 16
    path = save_family(name, tmp_path / name, **shape)
    _, attn = traits_and_attention(ModelConfig(path=str(path)), torch.device("cuda"), torch.bfloat16)
    assert attn == ("flex_attention" if name == "gemma2" else "distsft_varlen"), attn
    model = family_model(name, attn=attn, vocab_size=211, **shape).to("cuda", torch.bfloat16).train()
    packed, alone, logit_diff, _ = packed_vs_alone(model, [40, 23, 50, 9], max_len=128, device="cuda")
    assert packed == pytest.approx(alone, rel=2e-2)
    assert logit_diff < 0.1, logit_diff


def test_local_run_on_gpu_uses_the_fast_path_and_reads_its_figures(tmp_path):
    """bf16, distsft_varlen, the fused loss, torch's fused AdamW, pinned prefetch, CUDA-event phases."""
    from distsft.launcher.run import launch_local

    model = save_family("llama", tmp_path / "model", hidden_size=256, intermediate_size=512, head_dim=64)
    cfg = run_cfg(tmp_path / "run", f"model.path={model}", "model.tokenizer=demo", "train.max_steps=4",
                  "train.micro_batch_size=2", "train.log_every=2")  # fmt: skip
    summary = launch_local(cfg, quiet=True)
    assert summary["attention"] == "distsft_varlen"
    rows = metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for r in rows:
        assert r["fwd_bwd_s"] > 0 and r["optimizer_s"] > 0 and r["data_wait_s"] >= 0 and r["mfu"] is not None
    assert rows[-1]["loss"] < rows[0]["loss"] + 1.0


def test_qlora_on_gpu_trains_4bit_and_merges(tmp_path, cli):
    pytest.importorskip("bitsandbytes")
    from distsft.launcher.run import launch_local

    model = save_family("llama", tmp_path / "model", hidden_size=256, intermediate_size=512, head_dim=64)
    out = tmp_path / "run"
    cfg = run_cfg(out, f"model.path={model}", "model.tokenizer=demo", "train.max_steps=3", "lora.r=8",
                  "model.quantization=4bit", "train.lr=1e-3")  # fmt: skip
    launch_local(cfg, quiet=True)
    assert len(metrics(out)) == 3
    code, _, err = cli("export", str(out), "--merge", "--out", str(tmp_path / "merged"))
    assert code == 0, err


@pytest.mark.parametrize("core", ["distsft_varlen", "flex_attention"])
@pytest.mark.parametrize("name", ["llama", "mistral"])
def test_sequence_parallel_attention_runs_the_gpu_kernels_with_whole_row_lengths(core, name):
    """The Ulysses wrapper over a group of one (its exchanges are then the identity) hands the GPU kernels
    the whole rows' lengths (varlen) or document block mask (flex): the loss of packed rows equals the
    kernel's own within bf16 rounding. The CPU tests cover the exchanges; this covers the kernels."""
    import os
    import socket

    import torch.distributed as dist
    from families import family_model
    from sptest import rows_for

    from distsft.data.collate import collate
    from distsft.training import sequence_parallel
    from distsft.training.loss import token_loss_sum

    if not dist.is_initialized():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(s.getsockname()[1]))
        dist.init_process_group("nccl", rank=0, world_size=1, device_id=torch.device("cuda", 0))
    sp = sequence_parallel.SequenceGroup(1, 0, dist.group.WORLD)
    shape = {"hidden_size": 128, "intermediate_size": 256, "head_dim": 32, "vocab_size": 211}
    rows = rows_for(211, 112)
    losses = []
    for attn in (core, sequence_parallel.register(sp, core)):
        model = family_model(name, attn=attn, **shape).to("cuda", torch.bfloat16).train()
        if attn == core:  # the kernel as distsft runs it without sequence parallelism
            batch = collate(rows, 0, varlen=core == "distsft_varlen")
        else:
            batch = sequence_parallel.shard_batch(collate(rows, 0, varlen=True), 1, 0)
        batch = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        losses.append(token_loss_sum(model, batch).loss_sum.item())
    assert losses[1] == pytest.approx(losses[0], rel=1e-2), losses
