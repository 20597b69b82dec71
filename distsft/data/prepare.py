"""The data pipeline, run once on the driver: read -> normalise -> template + mask -> length policy -> pack.

Every row read is accounted for: ``kept + too_long + rejected == rows_read``. In strict mode
(``on_error: fail``) all bad rows are reported together, each with file, line and reason, before any
training starts; with ``on_error: skip`` they are written to ``output_dir/rejected.jsonl``.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from distsft.config import DEMO_DIR, DataConfig
from distsft.data.formats import RowError, to_turns
from distsft.data.packing import pack
from distsft.data.tokenize import Example, ensure_chat_template, fit_length, tokenize_turns
from distsft.errors import DataError

DEMO_DATA = DEMO_DIR / "data" / "support.jsonl"
FILE_SUFFIXES = (".jsonl", ".json", ".parquet")
MAX_REPORTED = 50


@dataclass
class DataStats:
    rows_read: int = 0
    kept: int = 0
    rejected: int = 0
    too_long: int = 0
    tokens: int = 0
    supervised_tokens: int = 0
    packed_rows: int = 0
    packed_tokens: int = 0
    eval_rows: int = 0
    max_seq_len: int = 0

    @property
    def packing_efficiency(self) -> float:
        """Non-pad share of the tokens that the training rows, padded to ``max_seq_len``, would hold."""
        return self.packed_tokens / max(1, self.packed_rows * self.max_seq_len)

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "packing_efficiency": round(self.packing_efficiency, 4)}


@dataclass
class PreparedData:
    train: list[dict[str, list[int]]]
    eval: list[dict[str, list[int]]]
    stats: DataStats
    rejected: list[dict[str, Any]] = field(default_factory=list)


def resolve_sources(path: str | list[str]) -> list[Path]:
    """Expand ``data.path`` into concrete files (or saved-dataset directories), in a stable order."""
    paths = path if isinstance(path, list) else [path]
    out: list[Path] = []
    for p in paths:
        if p == "demo":
            out.append(DEMO_DATA)
            continue
        q = Path(p).expanduser()
        if q.is_dir() and not _is_saved_dataset(q):
            files = sorted(f for f in q.rglob("*") if f.suffix in FILE_SUFFIXES and f.is_file())
            if not files:
                raise DataError(f"{q}: directory holds no {'/'.join(FILE_SUFFIXES)} files")
            out += files
        elif q.exists():
            out.append(q)
        else:
            raise DataError(f"data.path: {p}: no such file or directory")
    return out


def _is_saved_dataset(p: Path) -> bool:
    return (p / "dataset_info.json").is_file() or (p / "dataset_dict.json").is_file() or (p / "state.json").is_file()


def read_rows(path: Path) -> Iterator[tuple[int, Any]]:
    """(line or row number, parsed row) pairs; an unparsable JSONL line yields a RowError in place of a row."""
    if path.is_dir():
        import datasets

        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            ds = ds["train"] if "train" in ds else next(iter(ds.values()))
        for i, row in enumerate(ds, start=1):
            yield i, row
    elif path.suffix == ".parquet":
        import pyarrow.parquet as pq

        for i, row in enumerate(pq.read_table(path).to_pylist(), start=1):
            yield i, row
    elif path.suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            yield e.lineno, RowError(f"invalid JSON: {e.msg}")
            return
        if not isinstance(data, list):
            yield 1, RowError("a .json data file must hold a list of rows")
            return
        yield from enumerate(data, start=1)
    else:
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    yield i, json.loads(line)
                except json.JSONDecodeError as e:
                    yield i, RowError(f"invalid JSON: {e.msg} (column {e.colno})")


def load_examples(
    cfg: DataConfig, paths: str | list[str], tokenizer: Any, stats: DataStats, rejected: list
) -> list[Example]:
    ensure_chat_template(tokenizer)
    examples: list[Example] = []
    for path in resolve_sources(paths):
        for line, row in read_rows(path):
            stats.rows_read += 1
            try:
                if isinstance(row, RowError):
                    raise row
                ex = tokenize_turns(tokenizer, to_turns(row, cfg.format), cfg.train_on)
                if not ex.num_supervised:
                    raise RowError("no supervised tokens after applying the chat template")
            except RowError as e:
                stats.rejected += 1
                rejected.append({"file": str(path), "line": line, "reason": str(e)})
                continue
            fitted = fit_length(ex, cfg.max_seq_len, cfg.too_long)
            if fitted is None:
                stats.too_long += 1
                continue
            stats.kept += 1
            stats.tokens += len(fitted.input_ids)
            stats.supervised_tokens += fitted.num_supervised
            examples.append(fitted)
    return examples


def prepare(cfg: DataConfig, tokenizer: Any, seed: int, output_dir: str | Path | None = None) -> PreparedData:
    stats = DataStats(max_seq_len=cfg.max_seq_len)
    rejected: list[dict[str, Any]] = []
    examples = load_examples(cfg, cfg.path, tokenizer, stats, rejected)
    eval_examples: list[Example] = []
    if cfg.eval_path:
        eval_examples = load_examples(cfg, cfg.eval_path, tokenizer, DataStats(), rejected)
    elif cfg.eval_fraction > 0 and examples:
        order = list(range(len(examples)))
        random.Random(seed).shuffle(order)
        n_eval = max(1, int(len(examples) * cfg.eval_fraction))
        held = set(order[:n_eval])
        eval_examples = [examples[i] for i in sorted(held)]
        examples = [e for i, e in enumerate(examples) if i not in held]
    _handle_rejected(cfg, rejected, output_dir)
    if not examples:
        raise DataError(f"data.path: no usable examples ({stats.rows_read} rows read, {stats.too_long} too long)")
    train_rows = pack(examples, cfg.max_seq_len, seed, cfg.packing)
    eval_rows = pack(eval_examples, cfg.max_seq_len, seed, cfg.packing)
    stats.packed_rows = len(train_rows)
    stats.packed_tokens = sum(len(r["input_ids"]) for r in train_rows)
    stats.eval_rows = len(eval_rows)
    return PreparedData(train=train_rows, eval=eval_rows, stats=stats, rejected=rejected)


def _handle_rejected(cfg: DataConfig, rejected: list[dict[str, Any]], output_dir: str | Path | None) -> None:
    if not rejected:
        return
    if cfg.on_error == "fail":
        lines = [f"  {r['file']}:{r['line']}: {r['reason']}" for r in rejected[:MAX_REPORTED]]
        more = f"\n  ... and {len(rejected) - MAX_REPORTED} more" if len(rejected) > MAX_REPORTED else ""
        raise DataError(
            f"{len(rejected)} bad data rows (set data.on_error=skip to skip them):\n" + "\n".join(lines) + more
        )
    if output_dir is not None:
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "rejected.jsonl", "w", encoding="utf-8") as f:
            for r in rejected:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
