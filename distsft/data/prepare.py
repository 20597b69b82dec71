"""The data pipeline, run once on the driver: read -> normalise -> template + mask -> length policy -> pack.

Every row read is accounted for: ``kept + too_long + rejected == rows_read`` (blank lines are not rows).
In strict mode (``on_error: fail``) all bad rows are reported together, each with file, line and reason,
before any training starts; with ``on_error: skip`` they go to ``output_dir/rejected.jsonl``.

The result is cached under a fingerprint of the data files' contents, the tokenizer (vocabulary, special
tokens, chat template) and the data config, so a second run on the same inputs only memory-maps the
packed rows; changing any input changes the fingerprint.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from distsft.config import DataConfig, cache_home
from distsft.data.formats import RowError, to_turns
from distsft.data.packing import pack
from distsft.data.sources import LINE, RAW, Source, load_source, resolve_sources, source_fingerprint
from distsft.data.tokenize import Example, ensure_chat_template, fit_length, tokenize_turns
from distsft.errors import DataError

PIPELINE_VERSION = "1"  # bump when a change to this package changes the prepared rows
MAX_REPORTED = 50
KEPT, TOO_LONG, REJECTED, BLANK = 0, 1, 2, 3
PARALLEL_MIN_ROWS = 2000  # below this, worker start-up costs more than it saves


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
    train: Any  # datasets.Dataset of packed rows: input_ids, labels, position_ids, seq_lens
    eval: Any
    stats: DataStats
    rejected: list[dict[str, Any]] = field(default_factory=list)
    cache_dir: Path | None = None
    cache_hit: bool = False


def cache_root(cfg: DataConfig) -> Path:
    return Path(cfg.cache_dir).expanduser() if cfg.cache_dir else cache_home() / "data"


def tokenizer_fingerprint(tokenizer: Any) -> str:
    h = hashlib.blake2b(digest_size=16)
    h.update(tokenizer.backend_tokenizer.to_str().encode())
    h.update(str(tokenizer.chat_template).encode())
    h.update(json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str).encode())
    return h.hexdigest()


def fingerprint(cfg: DataConfig, sources: list[Source], eval_sources: list[Source], tokenizer: Any, seed: int) -> str:
    relevant = {k: v for k, v in asdict(cfg).items() if k not in ("path", "eval_path", "num_proc", "cache_dir")}
    h = hashlib.blake2b(digest_size=16)
    h.update(f"v{PIPELINE_VERSION}|seed={seed}|{json.dumps(relevant, sort_keys=True, default=str)}".encode())
    for tag, srcs in (("train", sources), ("eval", eval_sources)):
        for s in srcs:
            h.update(f"{tag}:{source_fingerprint(s)}".encode())
    h.update(tokenizer_fingerprint(tokenizer).encode())
    return h.hexdigest()


def prepare(cfg: DataConfig, tokenizer: Any, seed: int, output_dir: str | Path | None = None) -> PreparedData:
    import datasets

    datasets.disable_progress_bars()
    ensure_chat_template(tokenizer)
    sources = resolve_sources(cfg.path, cfg.format)
    eval_sources = resolve_sources(cfg.eval_path, cfg.format) if cfg.eval_path else []
    key = fingerprint(cfg, sources, eval_sources, tokenizer, seed)
    cache = cache_root(cfg) / key
    if (cache / "meta.json").is_file():
        data = _load_cached(cache)
    else:
        data = _build(cfg, tokenizer, seed, sources, eval_sources, cache)
    _handle_rejected(cfg, data.rejected, output_dir)
    return data


def _build(cfg: DataConfig, tokenizer: Any, seed: int, sources: list[Source], eval_sources: list[Source], cache: Path):
    stats = DataStats(max_seq_len=cfg.max_seq_len)
    rejected: list[dict[str, Any]] = []
    examples = _examples(cfg, tokenizer, sources, stats, rejected, cache.parent)
    eval_examples: list[Example] = []
    if eval_sources:
        eval_examples = _examples(cfg, tokenizer, eval_sources, DataStats(), rejected, cache.parent)
    elif cfg.eval_fraction > 0 and len(examples) > 1:
        order = list(range(len(examples)))
        random.Random(seed).shuffle(order)
        held = set(order[: max(1, int(len(examples) * cfg.eval_fraction))])
        eval_examples = [e for i, e in enumerate(examples) if i in held]
        examples = [e for i, e in enumerate(examples) if i not in held]
    if rejected and cfg.on_error == "fail":
        _raise_report(rejected)
    if not examples:
        raise DataError(
            f"data.path: no usable examples ({stats.rows_read} rows read, {stats.too_long} longer than "
            f"data.max_seq_len={cfg.max_seq_len}, {stats.rejected} rejected)"
        )
    train_rows = pack(examples, cfg.max_seq_len, seed, cfg.packing)
    eval_rows = pack(eval_examples, cfg.max_seq_len, seed, cfg.packing)
    stats.packed_rows = len(train_rows)
    stats.packed_tokens = sum(len(r["input_ids"]) for r in train_rows)
    stats.eval_rows = len(eval_rows)

    tmp = cache.with_name(f"{cache.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    for name, rows in (("train", train_rows), ("eval", eval_rows)):
        if rows:  # datasets cannot reload a saved dataset of zero rows
            _rows_dataset(rows).save_to_disk(str(tmp / name))
    meta = {"stats": asdict(stats), "rejected": rejected}
    (tmp / "meta.json").write_text(json.dumps(meta, ensure_ascii=False))
    try:
        tmp.rename(cache)
    except OSError:  # a concurrent prepare of the same inputs won; its rows are identical
        shutil.rmtree(tmp, ignore_errors=True)
    data = _load_cached(cache)
    data.cache_hit = False
    return data


def _rows_dataset(rows: list[dict[str, list[int]]]):
    import datasets

    features = datasets.Features(
        {k: datasets.List(datasets.Value("int32")) for k in ("input_ids", "labels", "position_ids", "seq_lens")}
    )
    cols = {k: [r[k] for r in rows] for k in features}
    return datasets.Dataset.from_dict(cols, features=features)


def _load_cached(cache: Path) -> PreparedData:
    import datasets

    meta = json.loads((cache / "meta.json").read_text())
    return PreparedData(
        train=datasets.load_from_disk(str(cache / "train")),
        eval=datasets.load_from_disk(str(cache / "eval")) if (cache / "eval").is_dir() else [],
        stats=DataStats(**meta["stats"]),
        rejected=meta["rejected"],
        cache_dir=cache,
        cache_hit=True,
    )


def _examples(
    cfg: DataConfig, tokenizer: Any, sources: list[Source], stats: DataStats, rejected: list, hf_cache: Path
) -> list[Example]:
    examples: list[Example] = []
    for src in sources:
        ds = load_source(src, hf_cache / "hf-datasets")
        num_proc = cfg.num_proc if cfg.num_proc > 1 and len(ds) >= PARALLEL_MIN_ROWS else None
        out = ds.map(
            process_batch,
            batched=True,
            batch_size=256,
            num_proc=num_proc,
            remove_columns=ds.column_names,
            fn_kwargs={
                "tokenizer": tokenizer,
                "fmt": src.format,
                "train_on": cfg.train_on,
                "max_len": cfg.max_seq_len,
                "too_long": cfg.too_long,
            },
            load_from_cache_file=False,
            desc=f"tokenising {Path(src.path).name}",
        )
        # Whole columns, read once: per-row access would decode every row's token lists again.
        for s, line, reason in zip(out["status"], out[LINE], out["reason"], strict=True):
            if s == BLANK:
                continue
            stats.rows_read += 1
            if s == REJECTED:
                stats.rejected += 1
                rejected.append({"file": src.path, "line": line, "where": src.where(line), "reason": reason})
            elif s == TOO_LONG:
                stats.too_long += 1
        kept = out.filter(lambda s: s == KEPT, input_columns="status")
        for ids, labels in zip(kept["input_ids"], kept["labels"], strict=True):
            ex = Example(list(ids), list(labels))
            stats.kept += 1
            stats.tokens += len(ex.input_ids)
            stats.supervised_tokens += ex.num_supervised
            examples.append(ex)
    return examples


def process_batch(batch: dict[str, list], tokenizer: Any, fmt: str, train_on: str, max_len: int, too_long: str):
    """datasets.map function: raw rows -> token ids + labels, or a status and reason per row."""
    n = len(batch[LINE])
    out: dict[str, list] = {"input_ids": [], "labels": [], "status": [], "reason": [], LINE: batch[LINE]}
    keys = [k for k in batch if k != LINE]
    for i in range(n):
        ids: list[int] = []
        labels: list[int] = []
        reason = ""
        try:
            if RAW in batch:
                text = batch[RAW][i]
                if not text.strip():
                    out["input_ids"].append(ids), out["labels"].append(labels)
                    out["status"].append(BLANK), out["reason"].append("")
                    continue
                try:
                    row = json.loads(text)
                except json.JSONDecodeError as e:
                    raise RowError(f"invalid JSON: {e.msg} (column {e.colno})") from None
            else:
                row = {k: batch[k][i] for k in keys}
            ex = tokenize_turns(tokenizer, to_turns(row, fmt), train_on)
            if not ex.num_supervised:
                raise RowError("no supervised tokens after applying the chat template")
            fitted = fit_length(ex, max_len, too_long)
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
    return out


def _raise_report(rejected: list[dict[str, Any]]) -> None:
    lines = [f"  {r['where']}: {r['reason']}" for r in rejected[:MAX_REPORTED]]
    more = f"\n  ... and {len(rejected) - MAX_REPORTED} more" if len(rejected) > MAX_REPORTED else ""
    raise DataError(f"{len(rejected)} bad data rows (set data.on_error=skip to skip them):\n" + "\n".join(lines) + more)


def _handle_rejected(cfg: DataConfig, rejected: list[dict[str, Any]], output_dir: str | Path | None) -> None:
    if rejected and cfg.on_error == "fail":
        _raise_report(rejected)
    if output_dir is not None and rejected:
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "rejected.jsonl", "w", encoding="utf-8") as f:
            for r in rejected:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
