"""The bundled byte-level BPE tokenizer must round-trip any UTF-8 text and keep its turn markers atomic."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

ODD_TEXTS = [
    "Crème brûlée, naïve façade, Ångström",
    "東京で寿司を食べました。你好，世界！",
    "Emoji 👩🏽‍💻🚀 and flags 🇯🇵 and ZWJ families 👨‍👩‍👧",
    "Tabs\tand\nnewlines\r\n  leading and trailing spaces  ",
    "Arabic مرحبا and Hebrew שלום, Devanagari नमस्ते, Korean 안녕하세요",
    "\x00 control \x1b[31m chars and a BOM \ufeff and zero-width \u200b",
    "",
]


@pytest.mark.parametrize("text", ODD_TEXTS)
def test_round_trips_odd_text(demo_tokenizer, text):
    ids = demo_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert demo_tokenizer.decode(ids) == text


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_round_trips_any_unicode(demo_tokenizer, text):
    ids = demo_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert demo_tokenizer.decode(ids) == text


def test_turn_markers_are_single_special_tokens(demo_tokenizer):
    for marker in ("<|im_start|>", "<|im_end|>", "<|pad|>"):
        ids = demo_tokenizer(marker, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1, marker
    assert demo_tokenizer.eos_token == "<|im_end|>"
    assert demo_tokenizer.pad_token_id != demo_tokenizer.eos_token_id


def test_chat_template_renders_turns(demo_tokenizer):
    text = demo_tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
