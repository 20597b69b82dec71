"""Assistant-only labels for real chat templates of four families, for every data format."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from templating import FAMILIES, family_tokenizer, supervised_spans

from distsft.data.formats import to_turns
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
