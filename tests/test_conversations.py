"""Conversations as they are written today: tool calls, tool results, reasoning, text parts; normalised
the way templates expect, and masked like the {% generation %} markers of the real training templates
that TRL ships beside the originals (``trl/chat_templates/``)."""

from __future__ import annotations

import copy
import glob
import json
import os
import re

import pytest
from conftest import REPO
from test_masking import FLAGGED

from distsft.data.formats import RowError, to_conversation
from distsft.data.tokenize import IGNORE_INDEX, render, tokenize_turns

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
ROWS = {
    "tool_call": {
        "tools": [WEATHER],
        "messages": [
            {"role": "user", "content": "Weather in Paris?"},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Lutetia"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "name": "get_weather", "content": '{"temp_c": 18}'},
            {"role": "assistant", "content": "It is 18 C in Paris."},
        ],
    },
    "reasoning": {
        "messages": [
            {"role": "user", "content": "What is 2+2?"},
            {"role": "assistant", "reasoning_content": "Two plus two makes four.", "content": "It is 4."},
        ]
    },
    "not_trained": FLAGGED["messages"],  # a wrong first answer kept as context (tests/test_masking.py)
}
TEMPLATES = os.path.join(os.path.dirname(__import__("trl").__file__), "chat_templates")
PAIRS = sorted(
    os.path.basename(p)[: -len("_training.jinja")]
    for p in glob.glob(os.path.join(TEMPLATES, "*_training.jinja"))
    if os.path.exists(p.replace("_training.jinja", ".jinja")) and "diffusion" not in p  # not a causal LM
)


def tokenizer_for(template: str):
    """The demo BPE with the template's markers as the special tokens a real tokenizer has for them."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_file(str(REPO / "distsft" / "demo" / "tokenizer" / "tokenizer.json")),
        bos_token="<s>", eos_token="</s>", pad_token="<|pad|>", clean_up_tokenization_spaces=False,
    )  # fmt: skip
    markers = r"<[|｜][^<>\s'\"]{1,40}?[|｜]>|<(?:start|end)_of_turn>|</?think>|</?tool_call>|</?tool_response>"
    tok.add_special_tokens({"additional_special_tokens": sorted(set(re.findall(markers, template)))})
    tok.chat_template = template
    return tok


def read(name: str) -> str:
    with open(os.path.join(TEMPLATES, f"{name}.jinja"), encoding="utf-8") as f:
        return f.read()


def test_messages_are_normalised_as_templates_expect_them():
    chat = to_conversation(json.loads(json.dumps(ROWS["tool_call"])))
    call = chat.turns[1]["tool_calls"][0]
    assert call == {
        "type": "function",
        "function": {"name": "get_weather", "arguments": {"city": "Lutetia"}},
        "id": "call_1",
    }
    assert chat.turns[1]["content"] == "" and chat.turns[2]["tool_call_id"] == "call_1"
    assert chat.tools == [WEATHER]
    for key in ("reasoning_content", "reasoning", "thinking"):  # one field, under the names templates read
        turn = to_conversation(
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", key: "r", "content": "a"}]}
        ).turns[1]
        assert turn["reasoning_content"] == turn["thinking"] == "r"
    sharegpt = to_conversation({
        "tools": json.dumps([WEATHER]),
        "conversations": [
            {"from": "human", "value": "Weather in Paris?"},
            {"from": "function_call", "value": json.dumps({"name": "get_weather", "arguments": {"city": "Lutetia"}})},
            {"from": "observation", "value": '{"temp_c": 18}'},
            {"from": "gpt", "value": "It is 18 C in Paris."},
        ],
    })  # fmt: skip
    assert [t["role"] for t in sharegpt.turns] == ["user", "assistant", "tool", "assistant"]
    assert sharegpt.turns[1]["tool_calls"][0]["function"] == call["function"] and sharegpt.tools == [WEATHER]


def call(fn: dict) -> dict:
    return {"role": "assistant", "tool_calls": [{"function": fn}]}


@pytest.mark.parametrize(
    "turn,reason",
    [
        (call({"name": "f", "arguments": "{oops"}), "arguments are a string but not JSON"),
        (call({"arguments": "{}"}), r"tool_calls\[0\]: expected"),
        (call({"name": "f", "arguments": [1]}), "arguments must be an object"),
        ({"role": "assistant", "content": "a", "reasoning_content": ["r"]}, "reasoning must be a string"),
    ],
)
def test_malformed_tool_calls_and_reasoning_are_row_errors_naming_the_turn(turn, reason):
    with pytest.raises(RowError, match=reason):
        to_conversation({"messages": [{"role": "user", "content": "q"}, turn]})


@pytest.mark.parametrize("row", sorted(ROWS))
@pytest.mark.parametrize("name", PAIRS)
def test_the_mask_of_an_original_template_is_its_training_variants_markers(name, row):
    """On tool-calling, reasoning and train:false rows, every token we learn is one the markers mark, and
    every token they mark that we do not is whitespace between turns or the prompt the template gives
    the model before its reply (the markers of some variants start inside it: `<|start|>assistant`,
    `<｜Assistant｜>`, an opening `<think>`). A template that cannot render the row refuses it."""
    chat = to_conversation(json.loads(json.dumps(ROWS[row])))
    plain = [{k: v for k, v in t.items() if k != "train"} for t in chat.turns]
    original, marked = tokenizer_for(read(name)), tokenizer_for(read(f"{name}_training"))
    try:
        out = marked.apply_chat_template(plain, tools=chat.tools, return_dict=True, return_assistant_tokens_mask=True)
    except Exception as e:  # noqa: BLE001 - the variant cannot render this row at all
        pytest.skip(f"{name}_training does not render this row: {type(e).__name__}")
    try:
        ex = tokenize_turns(original, chat.turns, tools=chat.tools)
    except RowError as e:  # a refusal must say why; whether it was right is asserted below
        if "does not render tools" in str(e):
            assert "tools" not in original.chat_template
        elif "drops its tool calls" in str(e):  # the call's own argument is nowhere in the text
            assert "Lutetia" not in render(original, plain, tools=chat.tools)
        else:
            assert "cannot be located" in str(e) or "verbatim" in str(e), str(e)
        return
    ids = list(out["input_ids"])
    if ex.input_ids != ids:
        pytest.skip(f"{name} and its training variant render this row differently")
    markers = list(out["assistant_masks"])
    if not all(t.get("train", True) for t in chat.turns):  # the markers of a turn not to learn do not count
        markers = [int(a != IGNORE_INDEX) for a in tokenize_turns(marked, chat.turns).labels]
    ours = [int(a != IGNORE_INDEX) for a in ex.labels]
    markers[0] = 0
    assert not [t for t, (o, m) in enumerate(zip(ours, markers, strict=True)) if o and not m], (
        "we learn unmarked tokens"
    )
    prompts = _generation_prompts(original, plain, chat.tools)
    toks = original.convert_ids_to_tokens(ids)
    gap = ""
    for o, m, t in zip([*ours, 0], [*markers, 0], [*toks, ""], strict=True):
        if m and not o:
            gap += original.convert_tokens_to_string([t])
        elif gap:
            assert not gap.strip() or any(gap.strip() in p for p in prompts), f"{name}: marked but not learnt: {gap!r}"
            gap = ""


def _generation_prompts(tok, turns, tools) -> list[str]:
    """What the template adds to ask for each assistant turn (the prompt the model is given)."""
    out = []
    for i, t in enumerate(turns):
        if t["role"] == "assistant" and i:
            before = render(tok, turns[:i], tools=tools)
            prompt = render(tok, turns[:i], add_generation_prompt=True, tools=tools)
            out.append(prompt[len(os.path.commonprefix([before, prompt])) :])
    return out


def test_reasoning_is_learnt_or_kept_as_context_and_what_a_template_drops_is_counted():
    """Qwen3's template renders the reasoning of the turns after the last user message only: there it is
    learnt (or, with train_on_reasoning off, kept as context); an earlier turn's reasoning is not in the
    sequence at all, and the row says so (``reasoning_dropped``)."""
    tok = tokenizer_for(read("qwen3"))
    two = to_conversation({"messages": [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "reasoning_content": "Two plus two makes four.", "content": "It is 4."},
        {"role": "user", "content": "And 3+3?"},
        {"role": "assistant", "reasoning_content": "Three and three is six.", "content": "It is 6."},
    ]})  # fmt: skip

    def learnt(ex):
        return tok.decode([t for t, lab in zip(ex.input_ids, ex.labels, strict=True) if lab != IGNORE_INDEX])

    ex = tokenize_turns(tok, two.turns)
    assert "Two plus two" not in tok.decode(ex.input_ids) and ex.reasoning_dropped == 1
    assert "Three and three is six." in learnt(ex) and "It is 4." in learnt(ex)
    context = tokenize_turns(tok, two.turns, train_on_reasoning=False)
    assert "Three and three is six." in tok.decode(context.input_ids)
    assert "Three and three" not in learnt(context) and "It is 6.<|im_end|>" in learnt(context)
    # TRL's training variant keeps every turn's reasoning: choose it to learn all of it
    keep = copy.copy(tok)
    keep.chat_template = read("qwen3_training")
    ex = tokenize_turns(keep, two.turns)
    assert ex.reasoning_dropped == 0 and "Two plus two makes four." in learnt(ex)


def test_a_template_that_cannot_render_what_a_row_holds_refuses_the_row():
    chat = to_conversation(json.loads(json.dumps(ROWS["tool_call"])))
    with pytest.raises(RowError, match="the row offers tools but the chat template does not render tools"):
        tokenize_turns(tokenizer_for(read("llama3")), chat.turns, tools=chat.tools)
    for name in ("lfm2", "lfm2_training"):  # v1 renders no tool_calls: a call-only turn would be learnt empty
        with pytest.raises(
            RowError, match=r"turn 1 \(assistant\): the chat template drops its tool calls \(get_weather\)"
        ):
            tokenize_turns(tokenizer_for(read(name)), chat.turns, tools=chat.tools)


def test_generation_markers_around_a_users_turn_refuse_the_row_instead_of_learning_it():
    """A template that marks every message (not only the assistant's) would teach the model its prompts."""
    tok = copy.copy(tokenizer_for(read("qwen2_5")))
    every = "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    tok.chat_template = (
        "{%- for m in messages -%}{%- if m['role'] == 'system' -%}"
        + every
        + "{%- else -%}{% generation %}"
        + every
        + "{% endgeneration %}{%- endif -%}{%- endfor -%}"
        "{%- if add_generation_prompt -%}<|im_start|>assistant\n{%- endif -%}"
    )
    chat = to_conversation({"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Bye now"}, {"role": "assistant", "content": "See you"},
    ]})  # fmt: skip
    with pytest.raises(
        RowError, match=r"turn 1 \(user\): the chat template's \{% generation %\} markers wrap its text"
    ):
        tokenize_turns(tok, chat.turns)
    tok.chat_template = tok.chat_template.replace("{% generation %}" + every + "{% endgeneration %}", every)
    assert tokenize_turns(tok, chat.turns).num_supervised  # the same template unmarked: the assistant's turns


def test_tool_results_system_and_user_text_are_never_learnt():
    tok = tokenizer_for(read("qwen2_5"))
    chat = to_conversation(json.loads(json.dumps(ROWS["tool_call"])))
    ex = tokenize_turns(tok, chat.turns, tools=chat.tools)
    learnt = tok.decode([t for t, lab in zip(ex.input_ids, ex.labels, strict=True) if lab != IGNORE_INDEX])
    assert '"get_weather"' in learnt and '"Lutetia"' in learnt and "It is 18 C in Paris." in learnt
    for text in ("Weather in Paris?", "temp_c", "Weather of a city"):
        assert text not in learnt and text in tok.decode(ex.input_ids)


def test_a_source_can_offer_one_list_of_tools_to_its_rows(tmp_path, demo_tokenizer):
    from distsft.config import DataConfig, DataSource
    from distsft.data.prepare import prepare

    rows = tmp_path / "agent.jsonl"
    rows.write_text(
        json.dumps({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]})
    )
    (tmp_path / "tools.json").write_text(json.dumps([WEATHER]))
    tok = copy.copy(demo_tokenizer)
    tok.chat_template = read("qwen2_5")
    cfg = DataConfig(
        path=[DataSource(path=str(rows), tools=str(tmp_path / "tools.json"))], cache_dir=str(tmp_path / "c")
    )
    text = tok.decode(prepare(cfg, tok, seed=0).train[0]["input_ids"])
    assert "get_weather" in text and "Weather of a city" in text
