"""Show packed rows to a person: supervised spans highlighted, example boundaries marked."""

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
