"""Normalise one raw row of any common SFT format into a ``Conversation``: turns and the tools offered.

Formats (auto-detected per row's keys, or forced with ``data.format``):
- messages:          {"messages": [{"role": "system"|"developer"|"user"|"assistant"|"tool", "content": ...}],
                      "tools"?: [JSON schema, ...]}
- sharegpt:          {"conversations": [{"from": "human"|"gpt"|"system"|"function_call"|"observation",
                      "value": str}, ...], "tools"?: ...}
- alpaca:            {"instruction": str, "input"?: str, "output": str, "system"?: str}
- prompt_completion: {"prompt": str | [turns], "completion": str | [turns]}  (as TRL accepts)
- text:              {"text": str}  (raw text: pre-training style, pre-formatted corpora; no chat template)

Messages are taken as OpenAI-format exports write them today: assistant turns with ``tool_calls``
(``{"type": "function", "function": {"name", "arguments"}}``; arguments given as a JSON string become the
object templates expect) and often no content, ``tool`` turns with ``tool_call_id`` and ``name``, and
reasoning as ``reasoning_content`` (or ``reasoning``, ``thinking``), handed to templates under both names
they read (Qwen3 and DeepSeek read ``reasoning_content``, gpt-oss ``thinking``).

A turn may carry a training flag, ``"train": true|false`` or ``"weight": 1|0`` (axolotl's and
LLaMA-Factory's spelling), which overrides ``data.train_on`` for that turn: a wrong earlier answer kept
as context is ``train: false``. Only assistant turns can be trained on. Content may be a string or a list
of text parts (``[{"type": "text", "text": ...}]``, what OpenAI-format exports hold), joined in order.

A bad row raises :class:`RowError` with a reason; the caller adds file and line.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

ROLES = ("system", "developer", "user", "assistant", "tool")
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
    "function_call": "assistant",  # LLaMA-Factory's tool-calling sharegpt: the call, then its result
    "observation": "tool",
    "tool": "tool",
}
REASONING_KEYS = ("reasoning_content", "reasoning", "thinking")
FORMATS = ("messages", "sharegpt", "alpaca", "prompt_completion", "text")

Turn = dict[str, Any]
"""``{"role", "content"}``, and ``"train"`` (bool) where the row says whether to learn that turn."""


class RowError(ValueError):
    """One row cannot be used; the message says why in words a user can act on."""


@dataclass(frozen=True)
class Conversation:
    turns: list[Turn]
    tools: list[dict[str, Any]] | None = None
    """The tools the row offers the model (JSON schemas), rendered by the template into the prompt."""
    raw: tuple[str, str] | None = None
    """Raw text with no chat template: (context, learnt), for ``text`` rows and raw prompt/completion."""


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
    if "text" in has:
        return "text"
    keys = ", ".join(sorted(has)) or "none"
    raise RowError(
        f"no recognisable format (keys: {keys}); expected messages, conversations, instruction/output, "
        "prompt/completion or text"
    )


def to_turns(row: Any, fmt: str = "auto") -> list[Turn]:
    return to_conversation(row, fmt).turns


def to_conversation(
    row: Any,
    fmt: str = "auto",
    template: str = "chat",
    response_marker: str | None = None,
    tools: list[dict[str, Any]] | None = None,
) -> Conversation:
    """``template`` ``none`` takes string prompt/completion rows as raw text; ``response_marker`` splits
    ``text`` rows into context and what is learnt; ``tools``: the source's, for rows without their own."""
    if not isinstance(row, dict):
        raise RowError(f"a row must be a JSON object, got {type(row).__name__}")
    if fmt == "auto":
        fmt = detect_format(row)
    if fmt == "text":
        return Conversation([], raw=_text_row(row.get("text"), response_marker))
    if fmt == "prompt_completion" and template == "none" and isinstance(row.get("prompt"), str):
        if not isinstance(row.get("completion"), str) or not row["completion"].strip():
            raise RowError("'completion' must be a non-empty string (data.template: none)")
        return Conversation([], raw=(row["prompt"], row["completion"]))
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
    return Conversation(turns, _tools(row.get("tools")) or tools)


def _text_row(text: Any, marker: str | None) -> tuple[str, str]:
    if not isinstance(text, str) or not text.strip():
        raise RowError(
            f"'text' must be a non-empty string, got {type(text).__name__ if text is None else repr(text)[:40]}"
        )
    if marker is None:
        return "", text
    at = text.find(marker)
    if at < 0:
        raise RowError(f"data.response_marker {marker!r} is not in the text: nothing to learn")
    return text[: at + len(marker)], text[at + len(marker) :]


def _tools(value: Any) -> list[dict[str, Any]] | None:
    """A row's ``tools``: a list of JSON schemas, or that list as a JSON string (LLaMA-Factory writes one)."""
    if value is None or value == "" or value == []:
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise RowError(f"'tools' is a string but not JSON: {e.msg}") from None
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        raise RowError("'tools' must be a list of JSON schemas (objects)")
    return value


def _message_list(value: Any, key: str) -> list[Turn]:
    if not isinstance(value, list):
        raise RowError(f"{key!r} must be a list of turns, got {type(value).__name__}")
    turns = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or "role" not in m or ("content" not in m and not m.get("tool_calls")):
            raise RowError(f"{key}[{i}] must be an object with 'role' and 'content' (or 'tool_calls')")
        turns.append(_turn(m["role"], m.get("content"), m, f"{key}[{i}]"))
    return turns


def _turn(role: Any, content: Any, raw: dict[str, Any], where: str) -> Turn:
    if role == "tool" and isinstance(content, dict):  # a tool's result as an object: the JSON it returned
        content = json.dumps(content, ensure_ascii=False)
    turn: Turn = {"role": role, "content": "" if content is None and raw.get("tool_calls") else _text(content, where)}
    if raw.get("tool_calls"):
        turn["tool_calls"] = _tool_calls(raw["tool_calls"], where)
    for key in ("tool_call_id", "name"):
        if raw.get(key) is not None and role == "tool":
            turn[key] = raw[key]
    reasoning = next((raw[k] for k in REASONING_KEYS if raw.get(k)), None)
    if reasoning is not None:
        if not isinstance(reasoning, str):
            raise RowError(f"{where}: reasoning must be a string, got {type(reasoning).__name__}")
        turn["reasoning_content"] = turn["thinking"] = reasoning  # the names templates read
    flag = _train_flag(raw, where)
    if flag is not None:
        turn["train"] = flag
    return turn


def _tool_calls(value: Any, where: str) -> list[dict[str, Any]]:
    """OpenAI's shape, ``{"id"?, "type": "function", "function": {"name", "arguments"}}`` (a bare
    ``{"name", "arguments"}`` is accepted too), with the arguments as an object."""
    calls = value if isinstance(value, list) else [value]
    out = []
    for j, call in enumerate(calls):
        fn = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise RowError(
                f"{where}.tool_calls[{j}]: expected {{'type': 'function', 'function': {{'name', 'arguments'}}}}"
            )
        args = fn.get("arguments", {})
        if isinstance(args, str):
            try:
                args = json.loads(args) if args.strip() else {}
            except json.JSONDecodeError as e:
                raise RowError(f"{where}.tool_calls[{j}]: arguments are a string but not JSON: {e.msg}") from None
        if not isinstance(args, dict):
            raise RowError(f"{where}.tool_calls[{j}]: arguments must be an object, got {type(args).__name__}")
        normal = {"type": "function", "function": {"name": fn["name"], "arguments": args}}
        if isinstance(call, dict) and call.get("id") is not None:
            normal["id"] = call["id"]
        out.append(normal)
    return out


def _text(content: Any, where: str) -> Any:
    """A list of text parts as one string; anything else is left for ``_validate`` to judge."""
    if not isinstance(content, list):
        return content
    texts = []
    for j, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type", "text") != "text" or not isinstance(part.get("text"), str):
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise RowError(f"{where}.content[{j}]: only text parts can be trained on, got {kind!r}")
        texts.append(part["text"])
    return "".join(texts)


def _train_flag(raw: dict[str, Any], where: str) -> bool | None:
    """``train`` (true/false) or ``weight`` (1/0) of a turn; None when it has neither."""
    if "train" in raw and "weight" in raw:
        raise RowError(f"{where}: give 'train' or 'weight', not both")
    if "train" in raw:
        if not isinstance(raw["train"], bool):
            raise RowError(f"{where}: 'train' must be true or false, got {raw['train']!r}")
        return raw["train"]
    if "weight" in raw:
        if raw["weight"] not in (0, 1) or isinstance(raw["weight"], bool):
            raise RowError(f"{where}: 'weight' must be 0 or 1 (a turn is learnt or not), got {raw['weight']!r}")
        return raw["weight"] == 1
    return None


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
        if m["from"] == "function_call":  # the value is the call itself, as JSON
            try:
                call = json.loads(m["value"]) if isinstance(m["value"], str) else m["value"]
            except json.JSONDecodeError as e:
                raise RowError(f"conversations[{i}]: a function_call value must be JSON: {e.msg}") from None
            turns.append(_turn(role, None, {**m, "tool_calls": call}, f"conversations[{i}]"))
            continue
        turns.append(_turn(role, m["value"], m, f"conversations[{i}]"))
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
        if not t["content"].strip() and not t.get("tool_calls"):
            raise RowError(f"turn {i} ({t['role']}): empty content")
        if t.get("train") and t["role"] != "assistant":
            raise RowError(
                f"turn {i} ({t['role']}): 'train: true' on a {t['role']} turn; only assistant turns are learnt"
            )
    if not any(t["role"] == "assistant" for t in turns):
        raise RowError("no assistant turn: nothing to learn from")
