"""Assistant-only labels for real chat templates of four families, for every data format."""

from __future__ import annotations

import copy
import json
from collections import Counter

import pytest
from templating import FAMILIES, family_tokenizer, supervised_spans

from distsft.data.formats import RowError, to_turns
from distsft.data.packing import pack
from distsft.data.tokenize import IGNORE_INDEX, tokenize_turns

CONVERSATIONS = [
    [
        {"role": "user", "content": "My internet connection is slow. Can you help me troubleshoot?"},
        {"role": "assistant", "content": "Let's start by restarting your router."},
    ],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Say OK."},
        {"role": "assistant", "content": "OK"},
        {"role": "user", "content": "Again, say OK."},
        {"role": "assistant", "content": "OK"},
    ],
    [  # the user repeats the assistant's words: a search by content alone would label the prompt
        {"role": "user", "content": "Repeat after me: 東京 🚀 naïve"},
        {"role": "assistant", "content": "東京 🚀 naïve"},
        {"role": "user", "content": "東京 🚀 naïve"},
        {"role": "assistant", "content": "Noted: 東京 🚀 naïve."},
    ],
    [
        {"role": "user", "content": "Format this:\n  a\n  b"},
        {"role": "assistant", "content": "- a\n- b\n\nDone."},
    ],
]


def usable(family: str, turns: list[dict]) -> list[dict]:
    if not FAMILIES[family]["system"]:
        turns = [t for t in turns if t["role"] != "system"]
    return turns


def expected_spans(family: str, turns: list[dict], last_only: bool = False) -> list[str]:
    spec = FAMILIES[family]
    contents = [t["content"].strip() if spec["trims"] else t["content"] for t in turns if t["role"] == "assistant"]
    if last_only:
        contents = contents[-1:]
    return [c + spec["eot"] for c in contents]


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("conv", range(len(CONVERSATIONS)))
def test_supervised_spans_are_exactly_assistant_content_and_eot(family, conv):
    tok = family_tokenizer(family)
    turns = usable(family, CONVERSATIONS[conv])
    ex = tokenize_turns(tok, turns)
    assert len(ex.labels) == len(ex.input_ids)
    got = [tok.decode(s) for s in supervised_spans(ex.input_ids, ex.labels)]
    assert got == expected_spans(family, turns)
    # the prompt side is fully masked: decoding the unlabelled tokens gives back no assistant content
    rendered = tok.apply_chat_template(turns, tokenize=False)
    assert tok.decode(ex.input_ids) == rendered


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_last_assistant_only(family):
    tok = family_tokenizer(family)
    turns = usable(family, CONVERSATIONS[1])
    ex = tokenize_turns(tok, turns, train_on="last_assistant")
    got = [tok.decode(s) for s in supervised_spans(ex.input_ids, ex.labels)]
    assert got == expected_spans(family, turns, last_only=True)


def test_train_on_all_labels_everything_but_the_first_token():
    tok = family_tokenizer("llama3")
    ex = tokenize_turns(tok, CONVERSATIONS[0], train_on="all")
    assert ex.labels[0] == IGNORE_INDEX and ex.labels[1:] == ex.input_ids[1:]


def test_templates_that_reject_a_role_order_reject_the_row():
    from distsft.data.formats import RowError

    with pytest.raises(RowError, match="chat template rejected"):
        tokenize_turns(family_tokenizer("gemma"), CONVERSATIONS[1])


FORMAT_ROWS = {
    "messages": {"messages": CONVERSATIONS[0]},
    "sharegpt": {
        "conversations": [
            {"from": "human", "value": CONVERSATIONS[0][0]["content"]},
            {"from": "gpt", "value": CONVERSATIONS[0][1]["content"]},
        ]
    },
    "alpaca": {
        "instruction": "My internet connection is slow.",
        "input": "Can you help me troubleshoot?",
        "output": CONVERSATIONS[0][1]["content"],
    },
    "prompt_completion": {"prompt": CONVERSATIONS[0][0]["content"], "completion": CONVERSATIONS[0][1]["content"]},
    "prompt_completion_lists": {"prompt": [CONVERSATIONS[0][0]], "completion": [CONVERSATIONS[0][1]]},
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("fmt", sorted(FORMAT_ROWS))
def test_every_format_supervises_only_the_answer(family, fmt):
    tok = family_tokenizer(family)
    turns = to_turns(json.loads(json.dumps(FORMAT_ROWS[fmt])))
    ex = tokenize_turns(tok, turns)
    got = [tok.decode(s) for s in supervised_spans(ex.input_ids, ex.labels)]
    assert got == [CONVERSATIONS[0][1]["content"] + FAMILIES[family]["eot"]]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_assistant_message_appears_once_across_packed_rows(family):
    tok = family_tokenizer(family)
    convs = [usable(family, c) for c in CONVERSATIONS] * 5
    examples = [tokenize_turns(tok, t) for t in convs]
    rows = pack(examples, max_len=256, seed=3)
    assert len(rows) < len(examples)  # several examples per row
    got: Counter = Counter()
    for r in rows:
        start = 0
        for n in r["seq_lens"]:
            ids, labels = r["input_ids"][start : start + n], r["labels"][start : start + n]
            got.update(tok.decode(s) for s in supervised_spans(ids, labels))
            start += n
    want = Counter(s for t in convs for s in expected_spans(family, t))
    assert got == want


FLAGGED = {  # a wrong first answer kept as context: the row says not to learn it
    "messages": {
        "messages": [
            {"role": "user", "content": "Say OK."},
            {"role": "assistant", "content": "Nope.", "train": False},
            {"role": "user", "content": "Please say OK."},
            {"role": "assistant", "content": "OK"},
        ]
    },
    "sharegpt": {
        "conversations": [
            {"from": "human", "value": "Say OK."},
            {"from": "gpt", "value": "Nope.", "weight": 0},
            {"from": "human", "value": "Please say OK."},
            {"from": "gpt", "value": "OK", "weight": 1},
        ]
    },
    "prompt_completion_lists": {
        "prompt": [
            {"role": "user", "content": "Say OK."},
            {"role": "assistant", "content": "Nope.", "train": False},
            {"role": "user", "content": [{"type": "text", "text": "Please "}, {"type": "text", "text": "say OK."}]},
        ],
        "completion": [{"role": "assistant", "content": [{"type": "text", "text": "OK"}]}],
    },
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("fmt", sorted(FLAGGED))
def test_a_turn_flagged_not_to_train_is_context_only_whatever_train_on_says(family, fmt):
    tok = family_tokenizer(family)
    turns = to_turns(json.loads(json.dumps(FLAGGED[fmt])))
    assert [t["content"] for t in turns] == ["Say OK.", "Nope.", "Please say OK.", "OK"]
    eot = FAMILIES[family]["eot"]
    for train_on in ("assistant", "last_assistant"):
        ex = tokenize_turns(tok, turns, train_on=train_on)
        assert [tok.decode(s) for s in supervised_spans(ex.input_ids, ex.labels)] == ["OK" + eot]
    # train_on: all labels the whole conversation but the flagged answer
    ex = tokenize_turns(tok, turns, train_on="all")
    unlabelled = tok.decode([t for t, lab in zip(ex.input_ids, ex.labels, strict=True) if lab == IGNORE_INDEX][1:])
    assert unlabelled.strip() == "Nope." + eot


def test_a_turn_flagged_to_train_is_learnt_under_last_assistant():
    tok = family_tokenizer("qwen2")
    turns = to_turns({"messages": [
        {"role": "user", "content": "Say OK."}, {"role": "assistant", "content": "OK", "train": True},
        {"role": "user", "content": "Again."}, {"role": "assistant", "content": "OK!"},
    ]})  # fmt: skip
    ex = tokenize_turns(tok, turns, train_on="last_assistant")
    assert [tok.decode(s) for s in supervised_spans(ex.input_ids, ex.labels)] == ["OK<|im_end|>", "OK!<|im_end|>"]


@pytest.mark.parametrize(
    "turn,reason",
    [
        ({"role": "user", "content": "Hi", "train": True}, r"turn 0 \(user\): 'train: true' on a user turn"),
        ({"role": "user", "content": "Hi", "weight": 0.5}, r"messages\[0\]: 'weight' must be 0 or 1"),
        ({"role": "user", "content": "Hi", "train": "no"}, r"messages\[0\]: 'train' must be true or false"),
        ({"role": "user", "content": "Hi", "train": True, "weight": 1}, r"give 'train' or 'weight', not both"),
        (
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]},
            r"messages\[0\].content\[0\]: only text parts can be trained on, got 'image_url'",
        ),
    ],
)
def test_bad_training_flags_and_content_parts_are_row_errors_naming_the_turn(turn, reason):
    from distsft.data.formats import RowError

    with pytest.raises(RowError, match=reason):
        to_turns({"messages": [turn, {"role": "assistant", "content": "Hello"}]})


def test_flagged_rows_match_the_generation_markers_of_a_real_training_template():
    """TRL ships Llama 3's original template and a training variant whose {% generation %} markers say what
    the model writes: on a row with a turn not to learn, our mask is the markers' mask without that turn."""
    import copy
    import os

    import trl

    templates = os.path.join(os.path.dirname(trl.__file__), "chat_templates")
    tok = family_tokenizer("llama3")
    turns = to_turns(json.loads(json.dumps(FLAGGED["messages"])))
    plain = [{k: v for k, v in t.items() if k != "train"} for t in turns]
    marked = tok.apply_chat_template(
        plain,
        chat_template=open(os.path.join(templates, "llama3_training.jinja")).read(),
        return_dict=True,
        return_assistant_tokens_mask=True,
    )
    original = copy.copy(tok)
    original.chat_template = open(os.path.join(templates, "llama3.jinja")).read()
    ex = tokenize_turns(original, turns)
    assert ex.input_ids == list(marked["input_ids"])
    mask_spans = [tok.decode(s) for s in supervised_spans(marked["input_ids"], [
        t if m else IGNORE_INDEX for t, m in zip(marked["input_ids"], marked["assistant_masks"], strict=True)
    ])]  # fmt: skip
    assert [tok.decode(s) for s in supervised_spans(ex.input_ids, ex.labels)] == mask_spans[1:]


@pytest.mark.parametrize(
    "template,head,ends",
    [  # gpt-oss: the model writes its channel header too (the prompt ends at <|start|>assistant)
        ("phi3", "", ["<|end|>", "<|end|>\n</s>"]),
        ("gptoss", "<|channel|>final<|message|>", ["<|end|>", "<|return|>"]),
    ],
)
def test_a_turn_that_is_not_the_last_learns_its_own_end_of_turn_marker(template, head, ends):
    """Phi-3 closes the last turn with an extra </s>, gpt-oss with <|return|> instead of <|end|>: the end of
    the other turns is not the last turn's, and it must still be learnt (else the model never learns to
    end a turn in a conversation). Real templates from TRL; the markers as the special tokens they are."""
    import os
    import re

    import trl
    from conftest import REPO
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    text = open(os.path.join(os.path.dirname(trl.__file__), "chat_templates", f"{template}.jinja")).read()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_file(str(REPO / "distsft" / "demo" / "tokenizer" / "tokenizer.json")),
        bos_token="<s>", eos_token="</s>", pad_token="<|pad|>", clean_up_tokenization_spaces=False,
    )  # fmt: skip
    tok.add_special_tokens({"additional_special_tokens": sorted(set(re.findall(r"<\|[a-z_]+\|>", text)))})
    tok.chat_template = text
    turns = CONVERSATIONS[1][1:]  # two assistant turns
    ex = tokenize_turns(tok, turns)
    got = [tok.decode(s) for s in supervised_spans(ex.input_ids, ex.labels)]
    assert got == [head + "OK" + ends[0], head + "OK" + ends[1]]


def _trl_templates() -> dict[str, str]:
    import glob
    import os

    import trl

    folder = os.path.join(os.path.dirname(trl.__file__), "chat_templates")
    return {os.path.basename(p)[: -len(".jinja")]: p for p in sorted(glob.glob(os.path.join(folder, "*.jinja")))}


MARKED = [n for n in _trl_templates() if n.endswith("_training")]


@pytest.mark.parametrize("name", MARKED)
def test_a_template_with_generation_markers_is_masked_by_exactly_its_markers(name):
    """TRL's training templates (``{% generation %}`` around what the model writes), as model.chat_template:
    our labels are transformers' own assistant mask, token for token; a turn flagged ``train: false`` loses
    exactly its block; a template that leaves a turn's content out of its blocks refuses the row."""
    tok = copy.copy(family_tokenizer("qwen2"))
    tok.chat_template = open(_trl_templates()[name]).read()
    turns = CONVERSATIONS[1]
    try:
        marked = tok.apply_chat_template(turns, return_dict=True, return_assistant_tokens_mask=True)
    except Exception as e:  # noqa: BLE001 - templates that refuse a system turn or plain-string content
        pytest.skip(f"{name} does not render this conversation: {type(e).__name__}")
    ids, mask = list(marked["input_ids"]), list(marked["assistant_masks"])
    if (
        not any(mask)
        or len(supervised_spans(ids, [t if m else IGNORE_INDEX for t, m in zip(ids, mask, strict=True)])) != 2
    ):
        pytest.skip(f"{name} marks no generation block per assistant turn here")
    if any(t["content"] not in tok.decode(ids) for t in turns if t["role"] == "assistant"):
        # idefics3 renders only list-of-parts content: plain strings become empty turns, refused
        with pytest.raises(RowError, match=r"turn 2 \(assistant\): .* markers leave out its content"):
            tokenize_turns(tok, turns)
        return
    ex = tokenize_turns(tok, turns)
    assert ex.input_ids == ids
    assert ex.labels == [IGNORE_INDEX] + [t if m else IGNORE_INDEX for t, m in zip(ids[1:], mask[1:], strict=True)]
    flagged = [dict(t, train=False) if i == 2 else t for i, t in enumerate(turns)]  # the first answer: context
    spans = supervised_spans(ids, tokenize_turns(tok, flagged).labels)
    assert spans == supervised_spans(ids, ex.labels)[1:]


def test_text_rows_learn_every_token_or_what_follows_the_response_marker():
    """Raw text (TRL's dataset_text_field, continued pre-training): no chat template; an EOS closes it."""
    from distsft.data.formats import RowError, to_conversation
    from distsft.data.tokenize import tokenize_text

    tok = family_tokenizer("llama3")
    chat = to_conversation({"text": "Routers reboot in 30 seconds."})
    assert chat.raw == ("", "Routers reboot in 30 seconds.") and not chat.turns
    ex = tokenize_text(tok, *chat.raw)
    assert ex.input_ids[-1] == tok.eos_token_id and ex.labels[1:] == ex.input_ids[1:]
    marked = to_conversation({"text": "Q: why?\n### Answer: because."}, response_marker="### Answer:")
    ex = tokenize_text(tok, *marked.raw)
    assert [tok.decode(s) for s in supervised_spans(ex.input_ids, ex.labels)] == [" because.<|eot_id|>"]
    with pytest.raises(RowError, match="response_marker '### A:' is not in the text"):
        to_conversation({"text": "no marker"}, response_marker="### A:")
    # string prompt/completion as raw text (data.template: none), as TRL treats them
    raw = to_conversation({"prompt": "The router", "completion": " reboots."}, template="none")
    ex = tokenize_text(tok, *raw.raw)
    assert [tok.decode(s) for s in supervised_spans(ex.input_ids, ex.labels)] == [" reboots.<|eot_id|>"]
    assert "<|start_header_id|>" not in tok.decode(ex.input_ids)
