"""Prompts for samples during training (``train.samples``): token ids that end where a reply begins.

From the eval rows (the default), a prompt is an example's tokens up to its last learnt span: the
conversation up to its last assistant turn, with the chat template's own opening of that turn, which is
what ``apply_chat_template(..., add_generation_prompt=True)`` renders for templates that open a turn the
same way whether or not it is generated. Read from the packed rows, so it works for every source and for
the ``eval_fraction`` hold-out, which exists only as rows. From a file, each line is a ``{"prompt": ...}``
or ``{"messages": [...]}`` rendered with the generation prompt, as ``distsft generate`` does.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distsft.data.tokenize import IGNORE_INDEX
from distsft.errors import DataError


@dataclass(frozen=True)
class Prompt:
    ids: list[int]
    """The prompt's tokens, the generation prompt included."""
    source: str
    """The eval set it comes from (``eval_loss``'s key), or the prompts file."""


def prompts_from_rows(sets: dict[str, Any], count: int) -> list[Prompt]:
    """The first ``count`` examples' prompts over the eval sets, in their order (``{name: rows}``)."""
    out: list[Prompt] = []
    for name, rows in sets.items():
        for i in range(len(rows)):
            if len(out) >= count:
                return out
            row = rows[i]
            start = 0
            for length in row["seq_lens"]:
                ids = prompt_of(row["input_ids"][start : start + length], row["labels"][start : start + length])
                start += length
                if ids and len(out) < count:
                    out.append(Prompt(ids, name))
    return out


def prompt_of(input_ids: list[int], labels: list[int]) -> list[int]:
    """An example's tokens before its last learnt span ([] when it learns nothing or from its first token)."""
    learnt = [i for i, t in enumerate(labels) if t != IGNORE_INDEX]
    if not learnt:
        return []
    first = learnt[-1]
    while first - 1 >= 0 and labels[first - 1] != IGNORE_INDEX:
        first -= 1
    return list(input_ids[:first])


def prompts_from_file(path: str, tokenizer: Any, count: int) -> list[Prompt]:
    """The first ``count`` prompts of a JSONL file; a bad line is a ``DataError`` naming file and line."""
    from distsft.data.tokenize import ensure_chat_template

    ensure_chat_template(tokenizer)
    out: list[Prompt] = []
    with open(Path(path).expanduser(), encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if len(out) >= count:
                break
            if not line.strip():
                continue
            messages = _messages(line, f"{path}:{n}")
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            out.append(Prompt(tokenizer(text, add_special_tokens=False)["input_ids"], str(path)))
    return out


def _messages(line: str, where: str) -> list[dict[str, Any]]:
    try:
        row = json.loads(line)
    except ValueError as e:
        raise DataError(f"{where}: train.samples.path: invalid JSON ({e.msg})") from None
    if isinstance(row, dict) and isinstance(row.get("prompt"), str):
        return [{"role": "user", "content": row["prompt"]}]
    messages = row.get("messages") if isinstance(row, dict) else None
    if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
        raise DataError(f'{where}: train.samples.path: expected {{"prompt": "..."}} or {{"messages": [...]}}')
    while messages and messages[-1]["role"] == "assistant":  # the reply is what the model is asked for
        messages = messages[:-1]
    if not messages:
        raise DataError(f"{where}: train.samples.path: no message before the assistant's reply")
    return messages
