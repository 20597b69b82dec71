"""Find and open the data sources named by ``data.path``: local files, directories, saved datasets, hub ids.

Every source becomes a ``datasets.Dataset`` with a ``__line`` column (the line of a JSONL/JSON file, or
the row number of a table), so that errors found later can name the file and line. JSON files keep each
row's raw text (``__raw_json``) and are parsed row by row, so one bad line is reported, not fatal.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distsft.config import DEMO_DIR, DataSource
from distsft.errors import DataError

DEMO_DATA = DEMO_DIR / "data" / "support.jsonl"
FILE_KINDS = {".jsonl": "jsonl", ".json": "json", ".parquet": "parquet"}
RAW = "__raw_json"
LINE = "__line"


@dataclass(frozen=True)
class Mix:
    """How much of one ``data.path`` entry the training rows use (``DataSource``'s weight, epochs or
    max_examples); the default uses every example once."""

    entry: int = 0
    """Which ``data.path`` entry (a directory entry expands into several sources that share its mix)."""
    weight: float | None = None
    epochs: float | None = None
    max_examples: int | None = None

    @property
    def plain(self) -> bool:
        return self.weight is None and self.epochs is None and self.max_examples is None


@dataclass(frozen=True)
class Source:
    path: str
    kind: str  # jsonl | json | parquet | saved | hub
    format: str = "auto"
    split: str = "train"
    mix: Mix = Mix()
    tools: str | None = None
    """A JSON file of tool schemas for the rows that offer none of their own."""

    def where(self, line: int) -> str:
        """``file:line`` for text files, ``path row N`` for tables."""
        return f"{self.path}:{line}" if self.kind in ("jsonl", "json") else f"{self.path} row {line}"


def resolve_sources(spec: str | list[Any], default_format: str = "auto") -> list[Source]:
    """Expand ``data.path`` into concrete sources in a stable order; a missing path is an error here."""
    import dataclasses

    entries = spec if isinstance(spec, list) else [spec]
    out: list[Source] = []
    for i, entry in enumerate(entries):
        if isinstance(entry, DataSource):
            path, fmt, split = entry.path, entry.format, entry.split
            mix, tools = Mix(i, entry.weight, entry.epochs, entry.max_examples), entry.tools
        else:
            path, fmt, split, mix, tools = entry, "auto", "train", Mix(i), None
        fmt = default_format if fmt == "auto" else fmt
        tools = str(Path(tools).expanduser().resolve()) if tools else None
        out += [dataclasses.replace(src, mix=mix, tools=tools) for src in _expand(path, fmt, split)]
    return out


def _expand(path: str, fmt: str, split: str) -> list[Source]:
    if path == "demo":
        return [Source(str(DEMO_DATA), "jsonl", fmt, split)]
    if path.startswith(HUB):
        repo = path[len(HUB) :]
        if not _looks_like_hub_id(repo):
            raise DataError(f"data.path: {path}: a Hugging Face Hub dataset is hf://owner/name")
        return [Source(repo, "hub", fmt, split)]
    p = Path(path).expanduser()
    if p.is_dir():
        if is_saved_dataset(p):
            return [Source(str(p), "saved", fmt, split)]
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in FILE_KINDS)
        if not files:
            raise DataError(f"data.path: {p}: directory holds no {', '.join(FILE_KINDS)} files and no saved dataset")
        return [Source(str(f), FILE_KINDS[f.suffix], fmt, split) for f in files]
    if p.is_file():
        if p.suffix not in FILE_KINDS:
            raise DataError(f"data.path: {p}: unsupported file type; expected {', '.join(FILE_KINDS)}")
        return [Source(str(p), FILE_KINDS[p.suffix], fmt, split)]
    # A missing local path is never taken for a hub id (a typo would fetch someone's dataset from the network).
    hint = f"; for the Hugging Face Hub dataset {path}, write hf://{path}" if _looks_like_hub_id(path) else ""
    raise DataError(f"data.path: {path}: no such file or directory{hint}")


HUB = "hf://"
"""``data.path: hf://owner/name``: a dataset from the Hugging Face Hub (or its local cache, offline)."""


def _looks_like_hub_id(path: str) -> bool:
    parts = path.split("/")
    return len(parts) == 2 and all(parts) and not path.startswith((".", "~")) and "." not in Path(path).suffix


def is_saved_dataset(p: Path) -> bool:
    return any((p / f).is_file() for f in ("dataset_info.json", "dataset_dict.json", "state.json"))


def load_source(src: Source, cache_dir: Path) -> Any:
    import datasets

    if src.kind == "jsonl":
        ds = datasets.load_dataset("text", data_files=src.path, split="train", cache_dir=str(cache_dir))
        ds = ds.rename_column("text", RAW)
        return ds.add_column(LINE, list(range(1, len(ds) + 1)))
    if src.kind == "json":
        texts, lines = _split_json_array(Path(src.path))
        return datasets.Dataset.from_dict({RAW: texts, LINE: lines})
    if src.kind == "parquet":
        ds = datasets.load_dataset("parquet", data_files=src.path, split="train", cache_dir=str(cache_dir))
    elif src.kind == "saved":
        ds = open_saved(src.path, src.split)
    else:  # hub id: the real loading code, used offline from the local HF cache in tests
        try:
            ds = datasets.load_dataset(src.path, split=src.split)
        except Exception as e:
            raise DataError(f"data.path: {src.path}: could not load hub dataset: {e}") from None
    return ds.add_column(LINE, list(range(1, len(ds) + 1)))


@functools.lru_cache(maxsize=8)
def open_saved(path: str, split: str) -> Any:
    """A dataset saved with ``save_to_disk`` (memory-mapped; a ``DatasetDict`` gives ``split``), opened once
    per process: every chunk of it that a process reads uses the same."""
    import datasets

    ds = datasets.load_from_disk(path)
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(f"data.path: {path}: no split {split!r} (has {', '.join(ds)})")
        ds = ds[split]
    return ds


def _split_json_array(path: Path) -> tuple[list[str], list[int]]:
    """Each element of a top-level JSON array as its own text, with the line it starts on."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        line = path.read_bytes()[: e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 text (byte {e.object[e.start]:#x})") from None
    decoder = json.JSONDecoder()
    i = _skip_ws(text, 0)
    if i >= len(text) or text[i] != "[":
        raise DataError(f"{path}:{text.count(chr(10), 0, i) + 1}: a .json data file must hold a list of rows")
    i = _skip_ws(text, i + 1)
    texts: list[str] = []
    lines: list[int] = []
    while i < len(text) and text[i] != "]":
        try:
            _, end = decoder.raw_decode(text, i)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None
        texts.append(text[i:end])
        lines.append(text.count("\n", 0, i) + 1)
        i = _skip_ws(text, end)
        if i < len(text) and text[i] == ",":
            i = _skip_ws(text, i + 1)
    return texts, lines


def _skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i] in " \t\r\n":
        i += 1
    return i


def source_fingerprint(src: Source) -> str:
    """Content hash for files and saved datasets; the id and split for hub datasets."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{src.kind}|{src.format}|{src.split}|".encode())
    if src.tools:  # the tools its rows are given
        h.update(Path(src.tools).read_bytes())
    if src.kind == "hub":
        h.update(src.path.encode())
        return h.hexdigest()
    p = Path(src.path)
    files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    for f in files:
        h.update(str(f.relative_to(p) if p.is_dir() else f.name).encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()
