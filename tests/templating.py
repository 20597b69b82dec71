"""Test helpers: tokenizers of several real chat-template families, built offline from the demo BPE."""

from __future__ import annotations

import json
from functools import cache

from conftest import FIXTURES, REPO

FAMILIES = json.loads((FIXTURES / "templates" / "families.json").read_text())


@cache
def family_tokenizer(name: str):
    """The demo byte-level BPE plus the family's special tokens and its real chat template."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    spec = FAMILIES[name]
    tok = Tokenizer.from_file(str(REPO / "distsft" / "demo" / "tokenizer" / "tokenizer.json"))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=spec["bos"],
        eos_token=spec["eos"],
        pad_token="<|pad|>",
        clean_up_tokenization_spaces=False,
    )
    fast.add_special_tokens({"additional_special_tokens": spec["special"]})
    fast.chat_template = (FIXTURES / "templates" / f"{name}.jinja").read_text().rstrip("\n")
    return fast


def supervised_spans(input_ids: list[int], labels: list[int]) -> list[list[int]]:
    """Maximal runs of labelled tokens."""
    spans: list[list[int]] = []
    run: list[int] = []
    for tok, lab in zip(input_ids, labels, strict=True):
        if lab != -100:
            assert lab == tok, "a label must equal its own input token (the model shifts)"
            run.append(tok)
        elif run:
            spans.append(run)
            run = []
    if run:
        spans.append(run)
    return spans
