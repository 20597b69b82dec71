"""Chat template -> ``input_ids`` + ``labels`` with -100 everywhere except what the model should learn.

A template with ``{% generation %}`` markers (TRL's training templates, or your own through
``model.chat_template``) is masked by exactly those markers: each assistant turn's marked text. Masking
works for *any* other chat template too: the conversation is rendered to text once, the character span
of every assistant turn (its content plus the end-of-turn scaffolding the template puts right after it,
such as ``<|im_end|>``, ``<|eot_id|>`` or ``</s>``) is located by rendering the conversation's prefixes,
and tokens are labelled through the fast tokenizer's offset mapping.
This is the one place where label masking is decided.

Labels follow the Hugging Face convention (same length as ``input_ids``; the model shifts them). The
first token of every example is always -100: nothing inside the example predicts it, and in a packed row
this keeps the last token of one example from being trained to predict the first token of the next.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any

from distsft.data.formats import RowError, Turn

IGNORE_INDEX = -100

# Used when a tokenizer ships no chat template of its own (ChatML, as Qwen and many SFT recipes use).
DEFAULT_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)


@dataclass(frozen=True)
class Example:
    input_ids: list[int]
    labels: list[int]
    reasoning_dropped: int = 0
    """Assistant turns whose reasoning the chat template does not render."""

    @property
    def num_supervised(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE_INDEX)


def ensure_chat_template(tokenizer: Any) -> None:
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    if not getattr(tokenizer, "is_fast", False):
        raise RowError("assistant-only masking needs a fast tokenizer (offset mapping); this one is not fast")


def render(tokenizer: Any, turns: list[Turn], add_generation_prompt: bool = False, tools: Any = None) -> str:
    try:
        return tokenizer.apply_chat_template(
            turns, tools=tools, tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except Exception as e:  # jinja raise_exception(...) from templates that reject a role order
        raise RowError(f"chat template rejected the conversation: {e}") from None


GENERATION = re.compile(r"\{%-?\s*generation\s*-?%\}")


@dataclass
class Spans:
    """Where each assistant turn is in the rendered conversation, and what the template left out."""

    by_turn: list[list[tuple[int, int]]]
    """Character spans ``[start, end)`` per assistant turn, in order."""
    reasoning_dropped: int = 0
    """Assistant turns whose reasoning the template does not render (it is neither context nor learnt)."""


def turn_spans(
    tokenizer: Any, turns: list[Turn], full: str, tools: Any = None, train_on_reasoning: bool = True
) -> Spans:
    """The template's own ``{% generation %}`` blocks where it has them, else the spans found by rendering
    (``assistant_spans``). Reasoning is learnt with its turn, or with ``train_on_reasoning`` off kept as
    context (the turn's learnt text then starts at its answer)."""
    if not GENERATION.search(tokenizer.chat_template or ""):
        return assistant_spans(tokenizer, turns, full, tools, train_on_reasoning)
    from transformers.utils.chat_template_utils import render_jinja_template

    texts, indices = render_jinja_template(
        conversations=[turns],
        chat_template=tokenizer.chat_template,
        tools=tools,
        return_assistant_tokens_mask=True,
        **tokenizer.special_tokens_map,
    )
    if texts[0] != full:
        raise RowError("the chat template renders differently when asked for its {% generation %} blocks")
    by_turn = _blocks_by_turn(turns, full, [(int(a), int(b)) for a, b in indices[0]])
    _attest_blocks(tokenizer, turns, full, by_turn, tools)
    dropped = 0
    for turn, blocks in zip([t for t in turns if t["role"] == "assistant"], by_turn, strict=True):
        reasoning = (turn.get("reasoning_content") or "").strip()
        if not reasoning or not blocks:
            continue
        r = full.find(reasoning, blocks[0][0], blocks[-1][1])
        if r < 0:
            dropped += 1
        elif not train_on_reasoning:  # learn from the answer on: the reasoning and its tags are context
            answer = full.find(turn["content"].strip(), r + len(reasoning)) if turn["content"].strip() else -1
            cut = answer if answer >= 0 else r + len(reasoning)
            blocks[:] = [(max(a, cut), b) for a, b in blocks if b > cut]
    return Spans(by_turn, dropped)


def _attest_blocks(
    tokenizer: Any, turns: list[Turn], full: str, by_turn: list[list[tuple[int, int]]], tools: Any
) -> None:
    """What a template's markers learn must be the assistant's own turn, all of it. A block over a user's,
    system's or tool's text would teach the model to write its prompts; an assistant turn whose content or
    tool calls the template leaves out of its blocks (LFM2 v1's training variant renders a call-only turn as
    an empty one) would teach it to answer with nothing. Both refuse the row, naming the turn."""
    blocks = [b for turn in by_turn for b in turn]
    for j, (s, e) in turn_texts(tokenizer, turns, full, tools):
        if turns[j]["role"] != "assistant" and any(a < e and s < b for a, b in blocks):
            raise RowError(
                f"turn {j} ({turns[j]['role']}): the chat template's {{% generation %}} markers wrap its text, "
                "which would be learnt; fix the template's markers (only assistant turns)"
            )
    assistant = [(i, t) for i, t in enumerate(turns) if t["role"] == "assistant"]
    for (i, t), mine in zip(assistant, by_turn, strict=True):
        marked = full[mine[0][0] : mine[-1][1]] if mine else ""
        content = (t.get("content") or "").strip()
        if content and content not in marked:
            raise RowError(
                f"turn {i} (assistant): the chat template's {{% generation %}} markers leave out its content"
            )
        names = [c["function"]["name"] for c in t.get("tool_calls", [])]
        missing = [n for n in names if n not in marked]
        if missing:
            raise RowError(f"turn {i} (assistant): the chat template drops its tool calls ({', '.join(missing)})")


def turn_texts(tokenizer: Any, turns: list[Turn], full: str, tools: Any = None) -> list[tuple[int, tuple[int, int]]]:
    """(turn index, character span) of each turn's text in ``full``, searched after what the turns before
    it render to (so a short reply is not found inside an earlier turn); a turn whose text the template
    rewrites is not found and is left out."""
    out: list[tuple[int, tuple[int, int]]] = []
    cursor = 0
    for j, t in enumerate(turns):
        text = (t.get("content") or "").strip()
        if not text:
            continue
        try:
            before = render(tokenizer, turns[:j], tools=tools) if j else ""
            cursor = max(cursor, len(os.path.commonprefix([before, full])))
        except RowError:  # a template that refuses this prefix (a conversation must end with a user turn)
            pass
        pos = full.find(text, cursor)
        if pos >= 0:
            out.append((j, (pos, pos + len(text))))
            cursor = pos + len(text)
    return out


def _blocks_by_turn(turns: list[Turn], full: str, blocks: list[tuple[int, int]]) -> list[list[tuple[int, int]]]:
    """The generation blocks of each assistant turn. A template may mark a turn in several blocks (Phi-3:
    the answer and the end of text); blocks between two other turns' text belong to the assistant turns
    between them: all to one turn, or one each to consecutive ones."""
    groups: list[tuple[list[int], int]] = []  # (assistant turn numbers, where the next other turn's text starts)
    pending: list[int] = []
    cursor, k = 0, 0
    for t in turns:
        if t["role"] == "assistant":
            pending.append(k)
            k += 1
            continue
        pos = full.find(t["content"], cursor) if t["content"] else -1
        if pos < 0:
            continue  # not rendered verbatim: no boundary here
        if pending:
            groups.append((pending, pos))
            pending = []
        cursor = pos + len(t["content"])
    if pending:
        groups.append((pending, len(full)))
    out: list[list[tuple[int, int]]] = [[] for _ in range(k)]
    lo = 0
    for members, hi in groups:
        mine = [b for b in blocks if lo <= b[0] < hi]
        if len(members) == 1:
            out[members[0]] = mine
        elif len(mine) == len(members):
            for m, b in zip(members, mine, strict=True):
                out[m] = [b]
        else:
            raise RowError(
                f"the chat template's {{% generation %}} blocks ({len(mine)}) cannot be told apart between "
                f"{len(members)} consecutive assistant turns"
            )
        lo = hi
    return out


def assistant_spans(
    tokenizer: Any, turns: list[Turn], full: str, tools: Any = None, train_on_reasoning: bool = True
) -> Spans:
    """Each assistant turn's text in ``full``: what the model writes after the prompt the template would
    give it (a channel header, a thinking block, the answer, tool calls) through the end-of-turn marker.
    With ``train_on_reasoning`` off it starts at the answer; the reasoning before it stays as context."""
    spans: list[list[tuple[int, int]]] = []
    cursor, dropped = 0, 0
    for i, turn in enumerate(turns):
        if turn["role"] != "assistant":
            continue
        start, generated = _turn_start(tokenizer, turns, i, full, cursor, tools)
        upto = render(tokenizer, turns[: i + 1], tools=tools)  # this turn as the last one
        if turn["content"].strip():
            pos, end = _answer(tokenizer, full, upto, turn["content"], start, i)
        else:  # tool calls and no text: the turn is whatever the template writes for it
            pos, end = start, _calls_end(tokenizer, full, upto, start, i)
        reasoning = (turn.get("reasoning_content") or "").strip()
        r = full.find(reasoning, start, end) if reasoning else -1
        if reasoning and (r < 0 or (r >= pos and bool(turn["content"].strip()))):
            dropped += 1  # the template does not render it here (Qwen3: only after the last user turn)
        elif reasoning and not train_on_reasoning and not turn["content"].strip():
            pos = r + len(reasoning)  # a call after reasoning: learn the call, not the reasoning
        if generated and (train_on_reasoning or r < 0):
            pos = start  # all the model writes, not only its answer
        names = [c["function"]["name"] for c in turn.get("tool_calls", [])]
        missing = [n for n in names if n not in full[pos:end]]
        if missing:
            raise RowError(f"turn {i} (assistant): the chat template drops its tool calls ({', '.join(missing)})")
        spans.append([(pos, end)])
        cursor = end
    return Spans(spans, dropped)


def _turn_start(tokenizer: Any, turns: list[Turn], i: int, full: str, cursor: int, tools: Any) -> tuple[int, bool]:
    """Where assistant turn ``i`` starts in ``full``: right after the prompt the template would give the
    model (its generation prompt, as far as ``full`` shares it), and whether that prompt was found; else
    at ``cursor`` (the end of the previous assistant turn), where only the answer can be located."""
    if not i:
        return cursor, False
    try:
        before = render(tokenizer, turns[:i], tools=tools)
        prompt = render(tokenizer, turns[:i], add_generation_prompt=True, tools=tools)
    except RowError:
        return cursor, False
    # The conversation so far is what the prompt shares with the rendering that does not ask for a reply
    # (some templates close a conversation that ends here: Phi-3 appends </s>).
    shared, so_far = len(os.path.commonprefix([prompt, full])), len(os.path.commonprefix([prompt, before]))
    if so_far and shared >= so_far and shared >= cursor:
        return shared, True
    return cursor, False


def _calls_end(tokenizer: Any, full: str, upto: str, start: int, i: int) -> int:
    """The end of an assistant turn that only calls tools: the turn as the template writes it when last,
    or, where it ends differently inside the conversation, through the same end-of-turn marker."""
    own = upto[start:].rstrip() if upto[:start] == full[:start] else ""
    if own and full.startswith(own, start):
        return start + len(own)
    marker = next((t for t in sorted(special_tokens(tokenizer), key=len, reverse=True) if own.endswith(t)), "")
    j = full.find(marker, start) if marker else -1
    if j < 0:
        raise RowError(f"turn {i} (assistant): its tool calls cannot be located in the rendered conversation")
    return j + len(marker)


def _answer(tokenizer: Any, full: str, upto: str, content: str, start: int, i: int) -> tuple[int, int]:
    """Where the answer ``content`` of turn ``i`` is in ``full``, through the end-of-turn scaffolding the
    template writes after it (tool calls included), up to the whitespace that separates turns."""
    pos = full.find(content, start)
    if pos < 0:  # templates that trim content (`| trim`)
        content = content.strip()
        pos = full.find(content, start)
    if pos < 0:
        raise RowError(f"turn {i} (assistant): the chat template does not render its content verbatim")
    end = pos + len(content)
    # The same answer in the rendering that ends with this turn: searched from where the turn starts when
    # both renderings agree that far (a short answer such as "OK" also hides in "<|END_OF_TURN_TOKEN|>").
    k = upto.find(content, start) if upto[:start] == full[:start] else upto.rfind(content)
    eot = upto[k + len(content) :].rstrip() if k >= 0 else ""
    if eot and full.startswith(eot, end):
        end += len(eot)
    elif eot:  # a turn that is not the last may end differently (gpt-oss: <|end|>, not <|return|>)
        end += len(_special_token_after(tokenizer, full, end))
    return pos, end


def learnt(turns: list[Turn], train_on: str) -> list[bool]:
    """For each assistant turn, in order: whether it is learnt. A turn's own ``train`` flag wins; otherwise
    ``data.train_on`` decides (``last_assistant``: only the last one; ``assistant`` and ``all``: each)."""
    assistant = [t for t in turns if t["role"] == "assistant"]
    default = [train_on != "last_assistant" or i == len(assistant) - 1 for i in range(len(assistant))]
    return [t.get("train", d) for t, d in zip(assistant, default, strict=True)]


def _special_token_after(tokenizer: Any, text: str, at: int) -> str:
    """The special token that ``text`` holds at ``at`` (after optional whitespace), or ''. A turn's end
    marker is a special token in every chat tokenizer; the next turn's header follows it."""
    rest = text[at:]
    stripped = rest.lstrip()
    for token in sorted(special_tokens(tokenizer), key=len, reverse=True):
        if stripped.startswith(token):
            return rest[: len(rest) - len(stripped) + len(token)]
    return ""


def special_tokens(tokenizer: Any) -> list[str]:
    """The tokenizer's special tokens, the added ones marked special included (template markers)."""
    special = set(getattr(tokenizer, "all_special_tokens", []) or [])
    special |= {t.content for t in (getattr(tokenizer, "added_tokens_decoder", {}) or {}).values() if t.special}
    return [t for t in special if t]


def tokenize_turns(
    tokenizer: Any,
    turns: list[Turn],
    train_on: str = "assistant",
    tools: Any = None,
    train_on_reasoning: bool = True,
) -> Example:
    if tools and "tools" not in (tokenizer.chat_template or ""):
        raise RowError("the row offers tools but the chat template does not render tools")
    # Templates see only what they render: the training flags are ours.
    rendered = [{k: v for k, v in t.items() if k != "train"} for t in turns]
    full = render(tokenizer, rendered, tools=tools)
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    input_ids: list[int] = list(enc["input_ids"])
    keep = learnt(turns, train_on)
    dropped = 0
    if train_on == "all":  # every token, but the assistant turns the row says not to learn
        labels = list(input_ids)
        if not all(keep):
            spans = turn_spans(tokenizer, rendered, full, tools, train_on_reasoning)
            off = [s for turn, k in zip(spans.by_turn, keep, strict=True) if not k for s in turn]
            _label(labels, enc["offset_mapping"], off, IGNORE_INDEX)
    else:
        spans = turn_spans(tokenizer, rendered, full, tools, train_on_reasoning)
        dropped = spans.reasoning_dropped
        labels = [IGNORE_INDEX] * len(input_ids)
        on = [s for turn, k in zip(spans.by_turn, keep, strict=True) if k for s in turn]
        _label(labels, enc["offset_mapping"], on, input_ids)
    if labels:
        labels[0] = IGNORE_INDEX
    return Example(input_ids=input_ids, labels=labels, reasoning_dropped=dropped)


def tokenize_text(tokenizer: Any, context: str, learnt_text: str) -> Example:
    """Raw text, no chat template: ``context + learnt_text`` as the tokenizer encodes a document (its BOS
    where it adds one), the tokens of ``learnt_text`` and a closing EOS learnt (so the model learns to
    stop), the context's not."""
    full = context + learnt_text
    enc = tokenizer(full, add_special_tokens=True, return_offsets_mapping=True)
    ids: list[int] = list(enc["input_ids"])
    offsets = [tuple(o) for o in enc["offset_mapping"]]
    labels = [t if e > s and e > len(context) else IGNORE_INDEX for t, (s, e) in zip(ids, offsets, strict=True)]
    eos = tokenizer.eos_token_id
    if eos is not None and (not ids or ids[-1] != eos):
        ids.append(eos)
        labels.append(eos)
    if labels:
        labels[0] = IGNORE_INDEX
    return Example(input_ids=ids, labels=labels)


def _label(labels: list[int], offsets: list[tuple[int, int]], spans: list[tuple[int, int]], value: Any) -> None:
    """Set the labels of the tokens that overlap ``spans`` (sorted character ranges) to ``value``: one
    value, or a list of them (the input ids)."""
    j = 0
    for t, (s, e) in enumerate(offsets):
        while j < len(spans) and spans[j][1] <= s:
            j += 1
        if j < len(spans) and e > spans[j][0] and s < spans[j][1] and e > s:
            labels[t] = value[t] if isinstance(value, list) else value


def fit_length(example: Example, max_len: int, too_long: str) -> Example | None:
    """Apply the length policy; None means the example is dropped (too long, or nothing left to learn)."""
    if len(example.input_ids) <= max_len:
        return example
    if too_long != "truncate":
        return None
    cut = Example(example.input_ids[:max_len], example.labels[:max_len])
    return cut if cut.num_supervised else None
