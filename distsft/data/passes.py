"""The two passes over a chunk of the sources, and where they run.

``tokenize_chunk`` turns a chunk's rows into examples (token ids and labels, streamed to an Arrow file)
and accounts for every row; ``pack_chunk`` packs a chunk's examples into rows. A runner maps them over
the chunks: ``LocalRunner`` in this process or forked ones, or ``launcher/ray_data.py``'s ``RayRunner`` on
Ray Data. The functions and the chunks are the same either way, and so are the rows.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from distsft.config import DataConfig
from distsft.data.chunks import NOT_UTF8, Chunk, read_chunk
from distsft.data.formats import RowError, to_conversation
from distsft.data.packing import pack_columns, plan_rows
from distsft.data.sources import LINE, RAW, Source
from distsft.data.tokenize import IGNORE_INDEX, fit_length, tokenize_text, tokenize_turns
from distsft.errors import DataError
from distsft.host import peak_rss_mb

KEPT, TOO_LONG, REJECTED, BLANK = 0, 1, 2, 3
"""What ``process_batch`` says of each row."""


@dataclass
class Work:
    """What every chunk's work needs besides the chunk (shipped once per process or node)."""

    cfg: DataConfig
    tokenizer: Any
    seed: int
    sources: list[Source]
    """Training sources, then eval sources (a chunk's ``source`` indexes this list)."""
    opened: dict[int, Any]
    """Sources read as datasets (JSON arrays, saved and hub datasets), open on the driver."""
    tmp: str
    """The cache entry being built (renamed into place when complete)."""


@dataclass
class ChunkResult:
    index: int
    eval: bool
    rows_read: int = 0
    kept: int = 0
    too_long: int = 0
    rejected: list[dict[str, Any]] = field(default_factory=list)
    tokens: int = 0
    supervised: int = 0
    reasoning_dropped: int = 0
    """Kept rows with reasoning that the chat template does not render (left out, said once)."""
    peak_rss_mb: float = 0.0
    """Peak resident memory of the process that did the work (so far), for the benchmark's figures."""


class Runner(Protocol):
    """Where the chunk passes run: ``LocalRunner`` here, ``launcher/ray_data.py``'s ``RayRunner`` on Ray Data."""

    def refuses(self, work: Work) -> str:
        """Why this runner cannot prepare ``work`` ('' when it can): asked before any work starts."""
        ...

    def map(self, fn: Any, items: list, work: Work) -> list: ...


class LocalRunner:
    """Runs the chunks' work in this process, or in ``num_proc`` forked processes."""

    def __init__(self, num_proc: int = 1) -> None:
        self.num_proc = num_proc

    def refuses(self, work: Work) -> str:
        return ""  # this process opens every kind of source

    def map(self, fn: Any, items: list, work: Work) -> list:
        if self.num_proc <= 1 or len(items) <= 1:
            return [fn(item, work) for item in items]
        import multiprocessing

        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # forked children tokenise; the parent's pool would hang
        ctx = multiprocessing.get_context("fork")
        with ctx.Pool(min(self.num_proc, len(items)), initializer=_set_work, initargs=(work,)) as pool:
            return pool.map(_with_work, [(fn, item) for item in items], chunksize=1)


_WORK: Work | None = None


def _set_work(work: Work) -> None:
    global _WORK
    _WORK = work


def _with_work(job: tuple[Any, Any]) -> Any:
    fn, item = job
    return fn(item, _WORK)


EXAMPLE_SCHEMA = {"input_ids": "int32", "labels": "int32"}


def tokenize_chunk(chunk: Chunk, work: Work) -> ChunkResult:
    """Stage 1: a chunk's rows -> its kept examples (token ids and labels, written as an Arrow stream in
    batches, never held whole) and the account of every row."""
    import pyarrow as pa

    cfg, src = work.cfg, work.sources[chunk.source]
    tools = _source_tools(src.tools) if src.tools else None
    result = ChunkResult(chunk.index, chunk.eval)
    schema = pa.schema({k: pa.list_(pa.int32()) for k in EXAMPLE_SCHEMA})
    path = Path(work.tmp) / "examples" / f"{chunk.index:06d}.arrow"
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        for batch in read_chunk(chunk, src, work.opened.get(chunk.source)):
            out = process_batch(batch, work.tokenizer, src.format, cfg, tools)
            keep = []
            for i, (s, line, reason) in enumerate(zip(out["status"], out[LINE], out["reason"], strict=True)):
                if s == BLANK:
                    continue
                result.rows_read += 1
                if s == REJECTED:
                    result.rejected.append({"file": src.path, "line": line, "where": src.where(line), "reason": reason})
                elif s == TOO_LONG:
                    result.too_long += 1
                else:
                    keep.append(i)
                    result.reasoning_dropped += out["reasoning_dropped"][i] > 0
                    result.tokens += len(out["input_ids"][i])
                    result.supervised += sum(1 for t in out["labels"][i] if t != IGNORE_INDEX)
            result.kept += len(keep)
            if keep:
                cols = [pa.array([out[k][i] for i in keep], pa.list_(pa.int32())) for k in EXAMPLE_SCHEMA]
                writer.write_batch(pa.record_batch(cols, schema=schema))
    result.peak_rss_mb = peak_rss_mb()
    return result


def _source_tools(path: str) -> list[dict[str, Any]]:
    try:
        tools = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"data.path tools {path}: cannot read a JSON list of tool schemas: {e}") from None
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise DataError(f"data.path tools {path}: must hold a JSON list of tool schemas (objects)")
    return tools


def pack_chunk(job: tuple[int, bool, Any, Any], work: Work) -> tuple[int, int, int, float, int]:
    """Stage 2: a chunk's examples -> packed training rows (and eval rows), written as Arrow streams.
    Packing is within the chunk: ``CHUNK_ROWS`` examples is window enough for best-fit decreasing."""
    import numpy as np
    import pyarrow as pa

    index, is_eval, mask, uses = job
    cfg = work.cfg
    path = Path(work.tmp) / "examples" / f"{index:06d}.arrow"
    with pa.memory_map(str(path)) as source:
        table = pa.ipc.open_stream(source).read_all()
    ids, labels = (table.column(k).combine_chunks() for k in EXAMPLE_SCHEMA)
    lengths = np.diff(np.asarray(ids.offsets)).tolist()
    held = np.ones(len(ids), dtype=bool) if is_eval else np.asarray(mask, dtype=bool)
    counts = []
    train = np.flatnonzero(~held)
    if uses is not None:  # a weighted or counted mixture: each example as many times as it is used
        train = np.repeat(np.arange(len(held)), np.asarray(uses, dtype=np.int64))
    for name, members in (("train", train), ("eval", np.flatnonzero(held))):
        if not len(members):
            counts.append((0, 0))
            continue
        seed = work.seed * 1_000_003 + index
        bins = plan_rows([lengths[i] for i in members], cfg.max_seq_len, seed, cfg.packing)
        bins = [[int(members[i]) for i in b] for b in bins]
        rows = pack_columns(ids, labels, bins)
        _write_rows(Path(work.tmp) / name / f"{index:06d}.arrow", rows)
        counts.append((len(bins), int(np.asarray(rows["input_ids"].offsets)[-1])))
    return counts[0][0], counts[0][1], counts[1][0], peak_rss_mb(), len(train)


def _write_rows(path: Path, columns: dict[str, Any]) -> None:
    import pyarrow as pa

    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table(columns)
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table, max_chunksize=1024)


def process_batch(
    batch: dict[str, list], tokenizer: Any, fmt: str, cfg: DataConfig, tools: list | None = None
) -> dict[str, list]:
    """Raw rows -> token ids + labels, or a status and reason per row (and whether the template left out
    a turn's reasoning)."""
    n = len(batch[LINE])
    out: dict[str, list] = {"input_ids": [], "labels": [], "status": [], "reason": [], "reasoning_dropped": []}
    out[LINE] = batch[LINE]
    keys = [k for k in batch if k != LINE]
    for i in range(n):
        ids: list[int] = []
        labels: list[int] = []
        reason, dropped = "", 0
        try:
            if RAW in batch:
                text = batch[RAW][i]
                if text.startswith(NOT_UTF8):
                    raise RowError(text[len(NOT_UTF8) :])
                if not text.strip():
                    out["input_ids"].append(ids), out["labels"].append(labels)
                    out["status"].append(BLANK), out["reason"].append(""), out["reasoning_dropped"].append(0)
                    continue
                try:
                    row = json.loads(text)
                except json.JSONDecodeError as e:
                    raise RowError(f"invalid JSON: {e.msg} (column {e.colno})") from None
            else:
                row = {k: batch[k][i] for k in keys}
            chat = to_conversation(row, fmt, cfg.template, cfg.response_marker, tools)
            if chat.raw is not None:
                ex = tokenize_text(tokenizer, *chat.raw)
            else:
                ex = tokenize_turns(tokenizer, chat.turns, cfg.train_on, chat.tools, cfg.train_on_reasoning)
            dropped = ex.reasoning_dropped
            if not ex.num_supervised:
                raise RowError("no supervised tokens after applying the chat template")
            fitted = fit_length(ex, cfg.max_seq_len, cfg.too_long)
            if fitted is None:
                status = TOO_LONG
            else:
                status, ids, labels = KEPT, fitted.input_ids, fitted.labels
        except RowError as e:
            status, reason = REJECTED, str(e)
        out["input_ids"].append(ids)
        out["labels"].append(labels)
        out["status"].append(status)
        out["reason"].append(reason)
        out["reasoning_dropped"].append(dropped)
    return out
