"""``distsft verify --config``: a correct setup passes every invariant with its figures; each broken setup
we can build fails the check that is for it, naming the cause. The launches are real (DeepSpeed, gloo)."""

from __future__ import annotations

import json

import pytest
from raytest import SMALL

from distsft.training import step

pytestmark = pytest.mark.slow

TINY = [f"data.path={SMALL}", "data.max_seq_len=256", "data.eval_fraction=0", "train.lr=1e-4"]


def verify(cli, tmp_path, *args: str) -> tuple[int, str, list[dict]]:
    out = tmp_path / "v"
    tiny = [a for s in TINY for a in ("--set", s)]  # before the test's own: a later --set wins
    code, stdout, err = cli("verify", "--local", "--out", str(out), "--steps", "2", *tiny, *args)
    assert "Traceback" not in err, err
    print(f"\n$ distsft verify {' '.join(args)}\n{stdout}")  # the lines a user sees, for -s and failures
    return code, stdout, json.loads((out / "verify.json").read_text())


def test_a_correct_setup_holds_every_invariant_with_its_figures(cli, tmp_path):
    """Packed = one example per row, micro-batch 2 x accumulation 1 = 1 x 2 (what tests/test_train_local.py
    proved for these paths, now through the command a user runs), and masks that learn assistant text."""
    code, out, found = verify(cli, tmp_path, "--set", "train.micro_batch_size=2", "--set", f"output_dir={tmp_path}/r")
    assert code == 0, out
    verdicts = {o["name"]: o["verdict"] for o in found}
    assert verdicts == {"masks": "pass", "packing": "pass", "split": "pass", "sequence_parallel": "skipped"}, out
    by = {o["name"]: o for o in found}
    assert set(by["masks"]["figures"]["supervised_by_role"]) <= {"assistant", "template"}
    assert by["masks"]["figures"]["supervised_by_role"]["assistant"] > 0
    for name in ("packing", "split"):
        fig = by[name]["figures"]
        assert fig["tokens"]["a"] == fig["tokens"]["b"] and fig["tokens"]["a"][0] > 0
        assert max(fig["loss"]["rel_diff"]) <= 1e-5 and max(fig["grad_norm"]["rel_diff"]) <= 1e-4
        assert fig["weights"]["rel_l2"] <= 1e-5
    assert len(by["split"]["figures"]["loss"]["a"]) == 2 and len(by["packing"]["figures"]["loss"]["a"]) == 1
    assert "verify split: pass: micro-batch 2 x accumulation 1 vs 1 x 2; loss per step" in out
    assert "verify: 3 passed, 0 failed, 1 skipped" in out


def test_attention_that_ignores_example_boundaries_fails_the_packing_check(cli, tmp_path, monkeypatch):
    """A model whose attention takes the causal mask of the whole row (a kernel or model class that drops
    the packed mask): packed examples see each other, one example per row does not notice."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]

    def leaky(module, query, key, value, attention_mask, **kw):
        return sdpa(module, query, key, value, None, **{**kw, "is_causal": True})

    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS._global_mapping, "sdpa", leaky)
    code, out, found = verify(cli, tmp_path, "--check", "packing", "--set", "model.attn_implementation=sdpa")
    assert code == 1
    assert found[0]["verdict"] == "FAIL"
    assert out.startswith("verify packing: FAIL: step 1 loss") and "packed rows vs one per row" in out


def test_an_accumulation_split_that_changes_the_loss_fails_the_split_check(cli, tmp_path, monkeypatch):
    """The classic accumulation bug: each micro-batch's own token mean, weighed alike whatever its tokens."""
    real = step.token_loss_sum

    def per_micro_batch_mean(*args, **kw):
        parts = real(*args, **kw)
        return parts._replace(loss_sum=parts.loss_sum / max(int(parts.tokens), 1) * 100)

    monkeypatch.setattr(step, "token_loss_sum", per_micro_batch_mean)
    code, out, found = verify(cli, tmp_path, "--check", "split", "--set", "train.micro_batch_size=2")
    assert code == 1 and found[0]["verdict"] == "FAIL"
    assert "verify split: FAIL: step 1 loss" in out and "micro-batch 2 x accumulation 1 vs 1 x 2" in out


CALL = {
    "messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}],
        },
        {"role": "tool", "content": '{"temp_c": 18}'},
        {"role": "assistant", "content": "It is 18 C in Paris."},
    ],
    "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}],
}


@pytest.mark.parametrize("broken", ["markers around a user turn", "lfm2_training on tool calls"])
def test_masks_that_learn_a_users_turn_or_an_empty_call_fail_naming_the_row_and_turn(cli, tmp_path, broken):
    import os

    import trl

    rows = tmp_path / "rows.jsonl"
    chat = {"messages": [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello"}]}
    rows.write_text("\n".join(json.dumps(r) for r in (chat, CALL if "lfm2" in broken else chat)) + "\n")
    if "lfm2" in broken:
        template = os.path.join(os.path.dirname(trl.__file__), "chat_templates", "lfm2_training.jinja")
        want = f"{rows}:2: turn 1 (assistant): the chat template drops its tool calls (get_weather)"
    else:
        every = "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
        template = tmp_path / "t.jinja"
        template.write_text(
            "{%- for m in messages -%}{% generation %}" + every + "{% endgeneration %}{%- endfor -%}"
            "{%- if add_generation_prompt -%}<|im_start|>assistant\n{%- endif -%}"
        )
        want = f"{rows}:1: turn 0 (user): the chat template's {{% generation %}} markers wrap its text"
    code, out, found = verify(
        cli, tmp_path, "--check", "masks", "--set", f"data.path={rows}", "--set", f"model.chat_template={template}"
    )
    assert code == 1 and found[0]["verdict"] == "FAIL", out
    assert out.startswith(f"verify masks: FAIL: {want}"), out
    code, _, err = cli("prepare", "--set", f"data.path={rows}", "--set", f"model.chat_template={template}")
    assert code == 2 and want.split(": ", 1)[1] in err  # and prepare refuses the row
