"""Normalise one raw row of any common SFT format into a list of ``{"role", "content"}`` turns.

Formats (auto-detected per row's keys, or forced with ``data.format``):
- messages:          {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}
- sharegpt:          {"conversations": [{"from": "human"|"gpt"|"system", "value": str}, ...]}
- alpaca:            {"instruction": str, "input"?: str, "output": str, "system"?: str}
- prompt_completion: {"prompt": str | [turns], "completion": str | [turns]}  (as TRL accepts)

A bad row raises :class:`RowError` with a reason; the caller adds file and line.
"""

from __future__ import annotations

from typing import Any

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
FORMATS = ("messages", "sharegpt", "alpaca", "prompt_completion")

Turn = dict[str, str]


class RowError(ValueError):
    """One row cannot be used; the message says why in words a user can act on."""


def detect_format(row: dict[str, Any]) -> str:
    """By which keys hold a value (tables fill absent keys with None, so presence alone is not enough)."""
    has = {k for k, v in row.items() if v is not None}
    if "messages" in has:
        return "messages"
    if "conversations" in has:
        return "sharegpt"
    if {"instruction", "output"} <= has:
        return "alpaca"
    if {"prompt", "completion"} <= has:
        return "prompt_completion"
    keys = ", ".join(sorted(has)) or "none"
    raise RowError(
        f"no recognisable format (keys: {keys}); expected messages, conversations, instruction/output "
        "or prompt/completion"
    )


def to_turns(row: Any, fmt: str = "auto") -> list[Turn]:
    if not isinstance(row, dict):
        raise RowError(f"a row must be a JSON object, got {type(row).__name__}")
    if fmt == "auto":
        fmt = detect_format(row)
    if fmt == "messages":
        turns = _message_list(row.get("messages"), "messages")
    elif fmt == "sharegpt":
        turns = _sharegpt(row.get("conversations"))
    elif fmt == "alpaca":
        turns = _alpaca(row)
    elif fmt == "prompt_completion":
        turns = _prompt_completion(row)
    else:
        raise RowError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    _validate(turns)
    return turns


def _message_list(value: Any, key: str) -> list[Turn]:
    if not isinstance(value, list):
        raise RowError(f"{key!r} must be a list of turns, got {type(value).__name__}")
    turns = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise RowError(f"{key}[{i}] must be an object with 'role' and 'content'")
        turns.append({"role": m["role"], "content": m["content"]})
    return turns


def _sharegpt(value: Any) -> list[Turn]:
    if not isinstance(value, list):
        raise RowError(f"'conversations' must be a list, got {type(value).__name__}")
    turns = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or "from" not in m or "value" not in m:
            raise RowError(f"conversations[{i}] must be an object with 'from' and 'value'")
        role = SHAREGPT_ROLES.get(m["from"])
        if role is None:
            raise RowError(
                f"conversations[{i}]: unknown role {m['from']!r}; expected one of {', '.join(SHAREGPT_ROLES)}"
            )
        turns.append({"role": role, "content": m["value"]})
    return turns


def _alpaca(row: dict[str, Any]) -> list[Turn]:
    instruction, extra, output = row.get("instruction"), row.get("input") or "", row.get("output")
    for key, val in (("instruction", instruction), ("input", extra), ("output", output)):
        if not isinstance(val, str):
            raise RowError(f"alpaca {key!r} must be a string, got {type(val).__name__}")
    turns = []
    if row.get("system"):
        turns.append({"role": "system", "content": row["system"]})
    prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    turns += [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]
    return turns


def _prompt_completion(row: dict[str, Any]) -> list[Turn]:
    prompt, completion = row.get("prompt"), row.get("completion")
    if isinstance(prompt, str) and isinstance(completion, str):
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
    if isinstance(prompt, list) and isinstance(completion, list):
        turns = _message_list(prompt, "prompt") + _message_list(completion, "completion")
        if any(t["role"] != "assistant" for t in turns[len(prompt) :]):
            raise RowError("every turn of 'completion' must have role 'assistant'")
        return turns
    raise RowError("'prompt' and 'completion' must both be strings or both be lists of turns")


def _validate(turns: list[Turn]) -> None:
    if not turns:
        raise RowError("empty conversation")
    for i, t in enumerate(turns):
        if t["role"] not in ROLES:
            raise RowError(f"turn {i}: unknown role {t['role']!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(t["content"], str):
            raise RowError(f"turn {i} ({t['role']}): content must be a string, got {type(t['content']).__name__}")
        if not t["content"].strip():
            raise RowError(f"turn {i} ({t['role']}): empty content")
    if not any(t["role"] == "assistant" for t in turns):
        raise RowError("no assistant turn: nothing to learn from")
