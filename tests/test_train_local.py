"""Local (single-process) training on real DeepSpeed (gloo on CPU): equivalences and the HF export."""

from __future__ import annotations

import json

import pytest
import torch
from raytest import run_cfg

from distsft.launcher.run import launch_local

pytestmark = pytest.mark.slow


def small_cfg(tmp_path, *overrides: str):
    return run_cfg(tmp_path, "train.micro_batch_size=4", "train.eval_every=0", *overrides)


def metrics(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def load_final(out):
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(out / "final", output_loading_info=True)
    return model, info


def test_metrics_schema_and_export_loads_every_key(tmp_path):
    cfg = small_cfg(tmp_path)
    launch_local(cfg, quiet=True)
    rows = metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        for key in ("step", "loss", "grad_norm", "lr", "tokens", "tokens_per_s", "elapsed_s"):
            assert key in r, key
        assert r["tokens"] > 0 and r["loss"] > 0 and r["grad_norm"] > 0
    assert (tmp_path / "config.yaml").is_file()
    model, info = load_final(tmp_path)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tmp_path / "final")
    assert tok.chat_template and tok.eos_token == "<|im_end|>"
    assert list((tmp_path / "final").glob("*.safetensors"))


@pytest.mark.parametrize("stage", [1, 3])
def test_zero_stages_give_the_same_weights_as_stage_2(tmp_path, stage):
    """One process: ZeRO partitions nothing away, so every stage must do the same fp32 math."""
    ref_out, out = tmp_path / "ref", tmp_path / "other"
    launch_local(small_cfg(ref_out, "train.zero_stage=2"), quiet=True)
    launch_local(small_cfg(out, f"train.zero_stage={stage}"), quiet=True)
    a, _ = load_final(ref_out)
    b, _ = load_final(out)
    for (name, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-5, msg=name)
    la = [r["loss"] for r in metrics(ref_out)]
    lb = [r["loss"] for r in metrics(out)]
    assert la == pytest.approx(lb, rel=1e-5)


# Packed = unpacked and micro-batch x accumulation splits: tests/test_verify.py, through `distsft verify`.


def test_compiled_model_takes_the_same_steps_as_eager(tmp_path):
    """``train.compile`` (DeepSpeed's engine.compile, dynamic shapes) changes speed, not the math."""
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    launch_local(small_cfg(eager, "train.max_steps=3"), quiet=True)
    launch_local(small_cfg(compiled, "train.max_steps=3", "train.compile=true"), quiet=True)
    for ra, rb in zip(metrics(eager), metrics(compiled), strict=True):
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-5)
        assert ra["grad_norm"] == pytest.approx(rb["grad_norm"], rel=1e-4)


def test_records_read_every_few_steps_are_the_records_read_every_step(tmp_path):
    """Losses stay on the device and are read only at logged steps; the numbers must not change."""
    every, sparse = tmp_path / "every", tmp_path / "sparse"
    launch_local(small_cfg(every, "train.max_steps=5", "train.log_every=1"), quiet=True)
    # steps 4 and 5 are read at the end, which is neither a logged step nor (without a final save) a save
    launch_local(small_cfg(sparse, "train.max_steps=5", "train.log_every=3", "checkpoint.final=false"), quiet=True)
    a, b = metrics(every), metrics(sparse)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4, 5]
    for ra, rb in zip(a, b, strict=True):
        for key in ("loss", "grad_norm", "lr", "tokens", "input_tokens", "flops"):
            assert ra[key] == pytest.approx(rb[key], rel=1e-9), key
        assert rb["step_time_s"] == pytest.approx(rb["data_wait_s"] + rb["fwd_bwd_s"] + rb["optimizer_s"], rel=1e-6)


def test_the_default_path_needs_no_compiler_and_a_failing_op_build_is_one_line(tmp_path):
    """With no working C/C++ compiler, the default run trains (DeepSpeed compiles nothing: torch's AdamW,
    no shared-memory inference op); a config that asks for DeepSpeed's FusedAdam fails in one line that
    names the op and the setting that avoids it."""
    import os
    import subprocess
    import sys

    from conftest import REPO

    env = {**os.environ, "CC": "/bin/false", "CXX": "/bin/false", "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext")}
    base = [sys.executable, "-m", "distsft", "launch", "--local", "--set", "train.max_steps=1"]
    base += ["--set", f"data.path={REPO / 'tests/fixtures/support_small.jsonl'}", "--set", "data.max_seq_len=256"]
    ok = subprocess.run([*base, "--set", f"output_dir={tmp_path / 'a'}"], env=env, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr[-2000:]
    fused = json.loads((REPO / "ds_configs" / "zero2.json").read_text())
    fused["optimizer"]["params"]["torch_adam"] = False
    (tmp_path / "fused.json").write_text(json.dumps(fused))
    cmd = [*base, "--set", f"output_dir={tmp_path / 'b'}", "--set", f"train.zero_stage={tmp_path / 'fused.json'}"]
    bad = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1, bad.stderr[-2000:]
    assert "could not build its fused_adam op" in bad.stderr and '"torch_adam" at "auto"' in bad.stderr


def test_no_step_runs_a_forward_pass_beyond_its_micro_batches(tmp_path, monkeypatch, capsys):
    """``train.cross_entropy: auto`` decides before the run: 3 steps x 2 micro-batches are 6 forward passes,
    and the engine line says which loss kernel runs and why."""
    from transformers import LlamaForCausalLM

    calls = []
    forward = LlamaForCausalLM.forward

    def counted(self, *args, **kwargs):
        calls.append(1)
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(LlamaForCausalLM, "forward", counted)
    launch_local(
        small_cfg(
            tmp_path,
            "train.max_steps=3",
            "train.grad_accum_steps=2",
            "train.micro_batch_size=1",
            "checkpoint.verify_export=false",  # its forward passes on probes are not training's
        )
    )
    assert len(calls) == 3 * 2
    assert "loss plain (logits of a micro-batch" in capsys.readouterr().out


def test_a_chosen_chat_template_trains_and_is_exported_with_the_tokenizer(tmp_path):
    """model.chat_template: TRL's Qwen2.5 training template (with {% generation %} markers) replaces the
    tokenizer's own; the rows are masked by its markers and final/ chats with it."""
    import os

    import trl
    from transformers import AutoTokenizer

    from distsft.data.formats import to_turns
    from distsft.data.tokenize import tokenize_turns
    from distsft.model.loading import load_tokenizer

    path = os.path.join(os.path.dirname(trl.__file__), "chat_templates", "qwen2_5_training.jinja")
    cfg = small_cfg(tmp_path, f"model.chat_template={path}")
    tok = load_tokenizer(cfg.model)
    turns = to_turns(json.loads(open(cfg.data.path).readline()))
    marked = tok.apply_chat_template(turns, return_dict=True, return_assistant_tokens_mask=True)
    ex = tokenize_turns(tok, turns)
    assert ex.labels[1:] == [
        t if m else -100 for t, m in zip(marked["input_ids"][1:], marked["assistant_masks"][1:], strict=False)
    ]
    launch_local(cfg, quiet=True)
    assert AutoTokenizer.from_pretrained(tmp_path / "final").chat_template == open(path).read()
