"""Cut the data sources into chunks that any process (or any node) can read on its own.

A chunk is a run of consecutive rows of one source: a byte range of a JSONL file that starts at a line
boundary (with the number of that line, so errors still say ``file:line``), a run of row groups of a
Parquet file, a row range of a saved dataset (memory-mapped Arrow files), or a row range of a dataset
open on the driver (JSON arrays, hub datasets). Chunks are planned once, on the driver, by streaming
through the files (no row is kept), and both preparation engines process exactly these chunks with the
same functions, so they produce the same rows.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distsft.data.sources import LINE, RAW, Source, open_saved
from distsft.errors import DataError, first_line

CHUNK_ROWS = 50_000
"""Rows per chunk: a chunk's examples are packed together, so this is also the packing window (best-fit
decreasing over 50k examples packs within a fraction of a point of packing them all)."""


@dataclass(frozen=True)
class Chunk:
    index: int
    source: int
    """Index of the source in the list the chunk was planned from."""
    kind: str  # jsonl | parquet | saved | dataset
    start: int
    """jsonl: byte offset of the first line; parquet: first row group; saved, dataset: first row."""
    stop: int
    first_line: int
    """Line (1-based) or row number of the chunk's first row in its source."""
    eval: bool = False
    """Rows of an ``eval_path`` source: held out whole."""


def chunk_sources(sources: list[Source], first_index: int = 0, eval: bool = False, opened: dict | None = None):
    """Chunks of every source, numbered from ``first_index``; ``opened`` receives the datasets opened here
    for sources that are read as datasets (source index -> dataset)."""
    chunks: list[Chunk] = []
    for s, src in enumerate(sources):
        if src.kind == "jsonl":
            spans = _jsonl_spans(Path(src.path))
            kind = "jsonl"
        elif src.kind == "parquet":
            spans = _parquet_spans(Path(src.path))
            kind = "parquet"
        elif src.kind == "saved":  # Arrow files any process can open where the path is visible
            n = len(open_saved(src.path, src.split))
            spans = [(a, min(a + CHUNK_ROWS, n), a + 1) for a in range(0, n, CHUNK_ROWS)]
            kind = "saved"
        else:
            if opened is None:
                raise ValueError(f"{src.kind} sources are read as datasets on the driver")
            ds = opened[s]
            spans = [(a, min(a + CHUNK_ROWS, len(ds)), a + 1) for a in range(0, len(ds), CHUNK_ROWS)]
            kind = "dataset"
        for start, stop, line in spans:
            chunks.append(Chunk(first_index + len(chunks), s, kind, start, stop, line, eval))
    return chunks


def _jsonl_spans(path: Path) -> list[tuple[int, int, int]]:
    """(byte start, byte stop, first line) of every CHUNK_ROWS lines, streaming through the file once."""
    spans, start, offset, line, first = [], 0, 0, 0, 1
    with open(path, "rb") as f:
        for raw in f:
            line += 1
            offset += len(raw)
            if line % CHUNK_ROWS == 0:
                spans.append((start, offset, first))
                start, first = offset, line + 1
    if offset > start:
        spans.append((start, offset, first))
    return spans


NOT_UTF8 = "\x00distsft:not-utf8:"
"""Marks a JSONL line that is not UTF-8 (a NUL cannot start a line of JSON): the tokenising pass rejects
that row, naming it, instead of training on replacement characters."""


def _decode(line: bytes) -> str:
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError as e:
        return f"{NOT_UTF8}not UTF-8 text (byte {line[e.start]:#x} at byte {e.start + 1} of the line)"


def _parquet(path: Path | str) -> Any:
    """The file, or one ``DataError`` line for one that is truncated or not Parquet at all."""
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path)
    except (OSError, ValueError) as e:  # ArrowInvalid ("Parquet magic bytes not found") is a ValueError
        raise DataError(f"{path}: not a readable Parquet file ({first_line(e)})") from None


def _parquet_spans(path: Path) -> list[tuple[int, int, int]]:

    meta = _parquet(path).metadata
    spans, start, rows, first = [], 0, 0, 1
    for g in range(meta.num_row_groups):
        rows += meta.row_group(g).num_rows
        if rows - (first - 1) >= CHUNK_ROWS:
            spans.append((start, g + 1, first))
            start, first = g + 1, rows + 1
    if start < meta.num_row_groups:
        spans.append((start, meta.num_row_groups, first))
    return spans


def read_chunk(chunk: Chunk, src: Source, dataset: Any = None, batch: int = 256) -> Iterator[dict[str, list]]:
    """The chunk's rows in batches, as the tokenising function takes them: ``{RAW: texts, LINE: lines}``
    for text files, ``{column: values, ..., LINE: rows}`` for tables."""
    if chunk.kind == "jsonl":
        with open(src.path, "rb") as f:
            f.seek(chunk.start)
            data = f.read(chunk.stop - chunk.start)
        lines = data.split(b"\n")
        if data.endswith(b"\n"):
            lines.pop()
        for a in range(0, len(lines), batch):
            part = lines[a : a + batch]
            yield {
                RAW: [_decode(x) for x in part],
                LINE: list(range(chunk.first_line + a, chunk.first_line + a + len(part))),
            }
        return
    if chunk.kind == "parquet":
        try:
            table = _parquet(src.path).read_row_groups(list(range(chunk.start, chunk.stop)))
        except (OSError, ValueError) as e:  # ArrowInvalid or IOError: a damaged row group
            raise DataError(f"{src.path}: row groups {chunk.start}-{chunk.stop - 1} cannot be read: {e}") from None
        rows = table.to_batches(max_chunksize=batch)
        line = chunk.first_line
        for rb in rows:
            cols = {name: rb.column(i).to_pylist() for i, name in enumerate(rb.schema.names)}
            cols[LINE] = list(range(line, line + rb.num_rows))
            line += rb.num_rows
            yield cols
        return
    if chunk.kind == "saved":
        saved = open_saved(src.path, src.split)
        for a in range(chunk.start, chunk.stop, batch):
            part = saved[a : min(a + batch, chunk.stop)]
            part[LINE] = list(range(a + 1, a + 1 + len(next(iter(part.values())))))
            yield part
        return
    for a in range(chunk.start, chunk.stop, batch):  # an open dataset: its rows carry their LINE already
        yield dataset[a : min(a + batch, chunk.stop)]
