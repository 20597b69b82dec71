"""Every family end to end on real DeepSpeed (one process): train, export, reload strict, generate; and
the router loss of mixture-of-experts models."""

from __future__ import annotations

import json

import pytest
from families import FAMILIES, MOES, family_config, save_family
from raytest import metrics, run_cfg

from distsft.launcher.run import launch_local

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {name: save_family(name, root / name) for name in FAMILIES}


def family_cfg(out, model, *overrides):
    base = ["model.tokenizer=demo", "train.max_steps=3", "train.micro_batch_size=2", "data.max_seq_len=128"]
    return run_cfg(out, f"model.path={model}", *base, *overrides)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_family_trains_exports_reloads_strict_and_generates(name, models, tmp_path):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from distsft.model.generate import generate

    launch_local(family_cfg(tmp_path, models[name]), quiet=True)
    rows = metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3] and all(r["loss"] > 0 for r in rows)
    assert all(("aux_loss" in r) == (name in MOES) for r in rows)
    final = tmp_path / "final"
    model, info = AutoModelForCausalLM.from_pretrained(final, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    expected = family_config(name)
    with safe_open(str(final / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    if expected.tie_word_embeddings:  # one copy on disk, tied again at load
        assert "lm_head.weight" not in keys and "model.embed_tokens.weight" in keys
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    else:
        assert "lm_head.weight" in keys
    for key in ("tie_word_embeddings", "sliding_window", "final_logit_softcapping", "layer_types"):
        assert getattr(model.config, key, None) == getattr(expected, key, None), key
    assert isinstance(generate(str(final), "My internet is slow.", max_new_tokens=4), str)


def test_moe_router_loss_trains_but_stays_out_of_loss_and_eval_loss(models, tmp_path):
    """Same first step with the router loss at 0 and at 10: the language-model loss is identical (the
    weights are), the gradient is not (the router loss is really added); eval_loss is the plain LM loss
    of the updated model, as `distsft eval` computes it."""
    from raytest import SMALL

    from distsft.training.evaluate import evaluate_dir

    one = ["train.max_steps=1", f"data.eval_path={SMALL}"]
    off, on = tmp_path / "off", tmp_path / "on"
    launch_local(family_cfg(off, models["mixtral"], *one, "train.router_aux_loss_coef=0"), quiet=True)
    cfg = family_cfg(on, models["mixtral"], *one, "train.router_aux_loss_coef=10")
    launch_local(cfg, quiet=True)
    (a,), (b,) = metrics(off), metrics(on)
    assert "aux_loss" not in a and b["aux_loss"] > 0
    assert b["loss"] == pytest.approx(a["loss"], rel=1e-6)
    assert abs(b["grad_norm"] - a["grad_norm"]) > 1e-3 * a["grad_norm"]
    assert b["eval_loss"] == pytest.approx(evaluate_dir(cfg, str(on / "final"))["loss"], rel=1e-5)


def test_moe_lm_loss_normalisation_is_exact_across_accumulation_splits(models, tmp_path):
    """The router loss is a per-forward mean, so it depends on the split; the LM loss must not."""
    a, b = tmp_path / "a", tmp_path / "b"
    one = ["train.max_steps=1", "train.router_aux_loss_coef=0.1"]
    launch_local(family_cfg(a, models["qwen3-moe"], *one, "train.micro_batch_size=4"), quiet=True)
    launch_local(
        family_cfg(b, models["qwen3-moe"], *one, "train.micro_batch_size=1", "train.grad_accum_steps=4"), quiet=True
    )
    (ra,), (rb,) = metrics(a), metrics(b)
    assert ra["tokens"] == rb["tokens"] and ra["loss"] == pytest.approx(rb["loss"], rel=1e-6)


def test_the_console_names_the_family_and_its_attention(models, tmp_path, capsys):
    launch_local(family_cfg(tmp_path, models["gemma2"], "train.max_steps=1"), quiet=True)
    out = capsys.readouterr().out
    assert "model: Gemma2ForCausalLM (gemma2); attention eager; tied embeddings; sliding window 16" in out
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps_run"] == 1


def test_an_unsupported_explicit_attention_fails_before_any_work(models, tmp_path, cli):
    code, _, err = cli(
        "launch",
        "--local",
        "--set",
        f"model.path={models['gemma2']}",
        "--set",
        "model.tokenizer=demo",
        "--set",
        "model.attn_implementation=sdpa",
        "--set",
        f"output_dir={tmp_path}",
    )
    assert code == 2 and err.count("\n") == 1
    assert "Gemma2ForCausalLM does not support it; it supports eager, flex_attention, flash_attention_2" in err
    assert not (tmp_path / "metrics.jsonl").exists()
