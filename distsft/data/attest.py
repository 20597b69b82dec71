"""Attest a data set's masks: which role each supervised token belongs to, counted, and every row where a
token outside an assistant turn would be learnt or an assistant turn the chat template drops.

This recounts the labels from the rendered text rather than trusting the code that made them: each
token is given the role of the turn whose text it lies in (found by rendering the conversation's
prefixes), the template's own scaffolding between turns is ``template``. ``distsft verify`` prints the
counts and fails on any finding; ``prepare`` refuses such rows in the first place (``data/tokenize.py``).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from distsft.data.formats import RowError, to_conversation
from distsft.data.tokenize import (
    IGNORE_INDEX,
    ensure_chat_template,
    render,
    tokenize_text,
    tokenize_turns,
    turn_texts,
)

TEMPLATE_DROPS = (
    "drops its tool calls",
    "leave out its content",
    "markers wrap its text",
    "does not render its content verbatim",
    "does not render tools",
)
"""Refusals that say the chosen chat template cannot train this row as written (not a malformed row)."""


@dataclass
class MaskReport:
    rows: int = 0
    """Rows examined."""
    supervised: Counter = field(default_factory=Counter)
    """Supervised tokens by the role of the text they lie in (``template``: scaffolding between turns)."""
    findings: list[str] = field(default_factory=list)
    """``file:line: turn N (role): what``, one per row at most."""
    rejected: Counter = field(default_factory=Counter)
    """Rows refused for other reasons (malformed rows), by reason."""

    def as_dict(self) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "supervised_by_role": dict(self.supervised),
            "findings": self.findings,
            "rejected": dict(self.rejected),
        }


def attest(rows: list[tuple[str, Any]], tokenizer: Any, cfg: Any) -> MaskReport:
    """``rows``: (where, raw row) pairs as ``data.inspect.first_rows`` gives them; ``cfg``: the DataConfig."""
    report = MaskReport()
    for where, raw in rows:
        report.rows += 1
        try:
            chat = to_conversation(raw, cfg.format, cfg.template, cfg.response_marker)
            if chat.raw is not None:  # raw text: every token of the document is the point
                ex = tokenize_text(tokenizer, *chat.raw)
                report.supervised["text"] += ex.num_supervised
                continue
            ensure_chat_template(tokenizer)
            ex = tokenize_turns(tokenizer, chat.turns, cfg.train_on, chat.tools, cfg.train_on_reasoning)
        except RowError as e:
            reason = str(e)
            if any(k in reason for k in TEMPLATE_DROPS):
                report.findings.append(f"{where}: {reason}")
            else:
                report.rejected[reason.split(":")[0] if reason.startswith("turn ") else reason] += 1
            continue
        roles, finding = _roles_of_labels(tokenizer, chat, ex.labels, cfg.train_on)
        report.supervised.update(roles)
        if finding:
            report.findings.append(f"{where}: {finding}")
    return report


def _roles_of_labels(tokenizer: Any, chat: Any, labels: list[int], train_on: str) -> tuple[Counter, str]:
    turns = [{k: v for k, v in t.items() if k != "train"} for t in chat.turns]
    full = render(tokenizer, turns, tools=chat.tools)
    offsets = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    spans = turn_texts(tokenizer, turns, full, chat.tools)
    counts: Counter = Counter()
    finding = ""
    for (a, b), label in zip(offsets, labels, strict=True):
        if label == IGNORE_INDEX:
            continue
        hit = next(((j, turns[j]["role"]) for j, (s, e) in spans if s < b and a < e), None)
        role = hit[1] if hit else "template"
        counts[role] += 1
        if hit and role != "assistant" and train_on != "all" and not finding:
            finding = f"turn {hit[0]} ({role}): its text is learnt"
    return counts, finding
