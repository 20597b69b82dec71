"""Show data to a person: rows turn by turn (what each turn is and what is learnt), packed rows with supervised
spans highlighted and example boundaries marked."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TextIO

from distsft.data.tokenize import IGNORE_INDEX

GREEN, RESET = "\033[32m", "\033[0m"


def render_row(row: dict[str, list[int]], tokenizer: Any, color: bool) -> str:
    """Each example on its own block; supervised text in green (or between ⟦ ⟧ without colour)."""
    open_, close = (GREEN, RESET) if color else ("⟦", "⟧")
    blocks = []
    start = 0
    for k, n in enumerate(row["seq_lens"]):
        ids, labels = row["input_ids"][start : start + n], row["labels"][start : start + n]
        parts, run, run_sup = [], [], None
        for tok, lab in zip(ids, labels, strict=True):
            sup = lab != IGNORE_INDEX
            if run and sup != run_sup:
                text = tokenizer.decode(run)
                parts.append(f"{open_}{text}{close}" if run_sup else text)
                run = []
            run.append(tok)
            run_sup = sup
        if run:
            text = tokenizer.decode(run)
            parts.append(f"{open_}{text}{close}" if run_sup else text)
        blocks.append(f"--- example {k + 1} ({n} tokens) ---\n" + "".join(parts))
        start += n
    return "\n".join(blocks)


def show_rows(rows: Any, n: int, tokenizer: Any, out: TextIO, color: bool) -> None:
    for i in range(min(n, len(rows))):
        row = rows[i]
        print(f"=== packed row {i} ({len(row['input_ids'])} tokens, {len(row['seq_lens'])} examples) ===", file=out)
        print(render_row(row, tokenizer, color), file=out)


def dump_rows(rows: Iterable[dict[str, list[int]]], path: str | Path) -> int:
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            rec = {k: row[k] for k in ("input_ids", "labels", "position_ids", "seq_lens")}
            f.write(json.dumps(rec) + "\n")
            n += 1
    return n


def describe_conversation(tokenizer: Any, chat: Any, cfg: Any, color: bool = False) -> list[str]:
    """One line per turn: its role, what it holds (tool calls, reasoning, a tool's result) and whether it
    is learnt, with the exact text learnt of each assistant turn: what a person checks a new template by."""
    from distsft.data.tokenize import learnt, render, turn_spans

    open_, close = (GREEN, RESET) if color else ("⟦", "⟧")
    if chat.raw is not None:  # raw text: no turns, no template
        context, learnt_text = chat.raw
        return [f"  {'text':<10}| context {_short(context)}", f"  {'':<10}| learnt: {open_}{learnt_text}{close} + EOS"]
    rendered = [{k: v for k, v in t.items() if k != "train"} for t in chat.turns]
    full = render(tokenizer, rendered, tools=chat.tools)
    spans = turn_spans(tokenizer, rendered, full, chat.tools, cfg.train_on_reasoning).by_turn
    keep = learnt(chat.turns, cfg.train_on)
    lines = []
    if chat.tools:
        names = ", ".join(t.get("function", t).get("name", "?") for t in chat.tools)
        lines.append(f"  {'tools':<10}| {names}  [context: the prompt offers them]")
    k = 0
    for t in chat.turns:
        role = t["role"]
        if role != "assistant":
            what = f"{t.get('name', 'tool')} returned " if role == "tool" else ""
            learnt_all = cfg.train_on == "all"
            lines.append(f"  {role:<10}| {what}{_short(t['content'])}  [{'learnt' if learnt_all else 'context'}]")
            continue
        state = "learnt" if keep[k] else "context (train: false)" if t.get("train") is False else "context"
        answer = _short(t["content"]) if t["content"].strip() else "(no text)"
        lines.append(f"  {role:<10}| {answer}  [{state}]")
        text = "".join(full[a:b] for a, b in spans[k]) if keep[k] else ""
        for call in t.get("tool_calls", []):
            fn = call["function"]
            lines.append(f"  {'':<10}| tool call {fn['name']}({json.dumps(fn['arguments'], ensure_ascii=False)})")
        reasoning = (t.get("reasoning_content") or "").strip()
        if reasoning:
            where = (
                "learnt" if reasoning in text else "context" if reasoning in full else "not rendered by the template"
            )
            lines.append(f"  {'':<10}| reasoning {_short(reasoning)}  [{where}]")
        if text:
            lines.append(f"  {'':<10}| learnt: {open_}{text}{close}")
        k += 1
    return lines


def _short(text: str, width: int = 72) -> str:
    one = " ".join(str(text).split())
    return json.dumps(one if len(one) <= width else one[: width - 1] + "…", ensure_ascii=False)


def show_conversations(rows: list[tuple[str, Any]], tokenizer: Any, cfg: Any, out: TextIO, color: bool) -> None:
    """``rows``: (where, raw row) pairs; each is described turn by turn, or its error given."""
    from distsft.data.formats import RowError, to_conversation

    for where, raw in rows:
        print(f"=== {where} ===", file=out)
        try:
            chat = to_conversation(raw, cfg.format, cfg.template, cfg.response_marker)
            lines = describe_conversation(tokenizer, chat, cfg, color)
        except RowError as e:
            lines = [f"  refused: {e}"]
        print("\n".join(lines), file=out)


def first_rows(cfg: Any, n: int) -> list[tuple[str, Any]]:
    """The first ``n`` rows of ``data.path`` as written (blank lines skipped), each with its file:line."""
    from distsft.data.chunks import chunk_sources, read_chunk
    from distsft.data.sources import LINE, RAW, resolve_sources

    sources = resolve_sources(cfg.path, cfg.format)
    opened: dict[int, Any] = {}
    out: list[tuple[str, Any]] = []
    for chunk in chunk_sources(sources, opened=opened):
        src = sources[chunk.source]
        for batch in read_chunk(chunk, src, opened.get(chunk.source)):
            keys = [k for k in batch if k != LINE]
            for i, line in enumerate(batch[LINE]):
                if RAW in batch:
                    if not batch[RAW][i].strip():
                        continue
                    try:
                        row = json.loads(batch[RAW][i])
                    except json.JSONDecodeError as e:
                        row = f"invalid JSON: {e.msg}"
                else:
                    row = {k: batch[k][i] for k in keys}
                out.append((src.where(line), row))
                if len(out) >= n:
                    return out
    return out


def describe_source(src: dict[str, Any]) -> str:
    """One ``data.path`` entry's part of the training rows, with what was asked of it."""
    asked = ", ".join(f"{k} {src[k]:g}" for k in ("weight", "epochs", "max_examples") if k in src)
    return (
        f"source {src['path']}: {src['examples']} examples, {src['tokens']} tokens, {src['share']:.1%} of the "
        f"tokens" + (f" ({asked})" if asked else "")
    )
