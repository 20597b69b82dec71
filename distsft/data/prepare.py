"""The data pipeline: read -> normalise -> template + mask -> length policy -> pack, chunk by chunk.

The sources are cut into chunks (``chunks.py``); a first pass tokenises each chunk (its examples stream
to an Arrow file), a second packs each chunk's examples into rows (another Arrow file per chunk). What
runs the passes is a runner (``passes.py``): this machine's processes or Ray Data across a cluster
(``launcher/ray_data.py``); the chunks and the functions are the same, and so are the rows. Nothing
holds the whole corpus: the driver keeps per-chunk counts and one bit per example (the eval hold-out).

Every row read is accounted for: ``kept + too_long + rejected == rows_read`` (blank lines are not rows).
In strict mode (``on_error: fail``) all bad rows are reported together, each with file, line and reason,
before any training starts; with ``on_error: skip`` they go to ``output_dir/rejected.jsonl``.

The result is cached under a fingerprint of the data files' contents, the tokenizer (vocabulary, special
tokens, chat template) and the data config, so a second run on the same inputs only memory-maps the
packed rows; changing any input changes the fingerprint. An entry is built under a temporary name and
renamed into place once ``meta.json`` (written last) exists: a killed preparation leaves nothing usable.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from distsft.config import DataConfig, cache_home
from distsft.data.chunks import chunk_sources
from distsft.data.passes import ChunkResult, LocalRunner, Runner, Work, pack_chunk, tokenize_chunk
from distsft.data.sources import Source, load_source, resolve_sources, source_fingerprint
from distsft.data.tokenize import ensure_chat_template
from distsft.errors import DataError
from distsft.host import private_dir, write_atomic

PIPELINE_VERSION = "3"  # bump when a change to this package changes the prepared rows
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
    sources: list[dict[str, Any]] = field(default_factory=list)
    """Per ``data.path`` entry: its examples and tokens in the training rows, and its share of the tokens
    (with the weight, epochs or max_examples asked)."""
    reasoning_dropped: int = 0
    """Rows with reasoning on a turn where the chat template does not render it: left out, not learnt."""

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
    work_peak_rss_mb: float | None = None
    """Largest peak resident memory of the processes that tokenised and packed (when built now)."""
    evals: dict[str, PreparedData] = field(default_factory=dict)
    """``data.evals``: each named set prepared on its own (its rows in ``.train``), in its own cache entry."""


def cache_root(cfg: DataConfig) -> Path:
    return Path(cfg.cache_dir).expanduser() if cfg.cache_dir else cache_home() / "data"


def tokenizer_fingerprint(tokenizer: Any) -> str:
    h = hashlib.blake2b(digest_size=16)
    h.update(tokenizer.backend_tokenizer.to_str().encode())
    h.update(str(tokenizer.chat_template).encode())
    h.update(json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str).encode())
    return h.hexdigest()


def fingerprint(cfg: DataConfig, sources: list[Source], eval_sources: list[Source], tokenizer: Any, seed: int) -> str:
    # not what the rows are; named eval sets have cache entries of their own (``named_eval_config``)
    where_and_how = ("path", "eval_path", "evals", "num_proc", "engine", "cache_dir")
    relevant = {k: v for k, v in asdict(cfg).items() if k not in where_and_how}
    h = hashlib.blake2b(digest_size=16)
    h.update(f"v{PIPELINE_VERSION}|seed={seed}|{json.dumps(relevant, sort_keys=True, default=str)}".encode())
    for tag, srcs in (("train", sources), ("eval", eval_sources)):
        for s in srcs:
            mix = "" if s.mix.plain else f"|{s.mix}"  # how much of the entry the rows use
            h.update(f"{tag}:{source_fingerprint(s)}{mix}".encode())
    h.update(tokenizer_fingerprint(tokenizer).encode())
    return h.hexdigest()


def prepare(
    cfg: DataConfig, tokenizer: Any, seed: int, output_dir: str | Path | None = None, runner: Runner | None = None
) -> PreparedData:
    """The prepared rows of ``cfg``, from the cache when these inputs were prepared before. ``runner``
    runs the chunks' work (``LocalRunner`` by default; ``distsft.prepare_ray.RayRunner`` spreads it over
    a Ray cluster): the same functions, the same rows."""
    import datasets

    datasets.disable_progress_bars()
    ensure_chat_template(tokenizer)
    sources = resolve_sources(cfg.path, cfg.format)
    eval_sources = resolve_sources(cfg.eval_path, cfg.format) if cfg.eval_path else []
    key = fingerprint(cfg, sources, eval_sources, tokenizer, seed)
    cache = cache_root(cfg) / key
    if (cache / "meta.json").is_file():
        data = load_prepared(cache)
    else:
        runner = runner or LocalRunner(cfg.num_proc)
        data = _build(cfg, tokenizer, seed, sources, eval_sources, cache, runner)
    _handle_rejected(cfg, data.rejected, output_dir)
    for name, path in cfg.evals.items():  # each set its own entry: one set changed rebuilds only that one
        data.evals[name] = prepare(named_eval_config(cfg, path), tokenizer, seed, None, runner)
    return data


def named_eval_config(cfg: DataConfig, path: Any) -> DataConfig:
    """The data config that prepares one named eval set as a data set of its own: all of it, nothing held out,
    packed and masked as the training rows are (its rows are then the set's ``train`` rows)."""
    return dataclasses.replace(cfg, path=path, eval_path=None, eval_fraction=0.0, evals={})


def _build(cfg: DataConfig, tokenizer: Any, seed: int, sources: list[Source], eval_sources: list[Source],
           cache: Path, runner: Runner) -> PreparedData:  # fmt: skip
    """Two passes over chunks: tokenise (each chunk's examples to a file), then, knowing how many examples
    there are in all (the eval hold-out is a fraction of all of them), pack each chunk's examples."""
    _clear_abandoned(cache)
    tmp = cache.with_name(f"{cache.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    private_dir(tmp / "examples")  # the cache root too, where this makes it: prepared rows are the user's
    everything = sources + eval_sources
    opened = {
        i: load_source(src, cache.parent / "hf-datasets")
        for i, src in enumerate(everything)
        if src.kind not in ("jsonl", "parquet", "saved")
    }
    chunks = chunk_sources(sources, 0, False, opened)
    chunks += chunk_sources(
        eval_sources,
        len(chunks),
        True,
        {i: opened[len(sources) + i] for i in range(len(eval_sources)) if len(sources) + i in opened},
    )
    chunks = [dataclasses.replace(c, source=c.source + len(sources)) if c.eval else c for c in chunks]
    work = Work(cfg, tokenizer, seed, everything, opened, str(tmp))
    try:
        refusal = runner.refuses(work)
        if refusal:  # before any work: a source this runner cannot read
            raise DataError(refusal)
        results = [
            r if isinstance(r, ChunkResult) else ChunkResult(**r) for r in runner.map(tokenize_chunk, chunks, work)
        ]
        results.sort(key=lambda r: r.index)
        stats = DataStats(max_seq_len=cfg.max_seq_len)
        rejected: list[dict[str, Any]] = []
        for r in results:
            rejected += r.rejected
            if not r.eval:
                stats.rows_read += r.rows_read
                stats.kept += r.kept
                stats.too_long += r.too_long
                stats.reasoning_dropped += r.reasoning_dropped
                stats.rejected += len(r.rejected)
                stats.tokens += r.tokens
                stats.supervised_tokens += r.supervised
        if rejected and cfg.on_error == "fail":
            _raise_report(rejected)
        if not stats.kept:
            raise DataError(
                f"data.path: no usable examples ({stats.rows_read} rows read, {stats.too_long} longer than "
                f"data.max_seq_len={cfg.max_seq_len}, {stats.rejected} rejected)"
            )
        held = held_out(stats.kept, 0.0 if eval_sources else cfg.eval_fraction, seed)
        train_results = [r for r in results if not r.eval]
        mixes = {c.index: sources[c.source].mix for c in chunks if not c.eval}
        uses = mixture_uses(train_results, [mixes[r.index] for r in train_results], held, seed)
        jobs, first = [], 0
        for r in results:
            mask, counts = None, None
            if not r.eval:
                mask = held[first : first + r.kept]
                counts = None if uses is None else uses[first : first + r.kept].tolist()
                first += r.kept
            jobs.append((r.index, r.eval, mask, counts))
        peak = max(r.peak_rss_mb for r in results)
        per_entry: dict[int, list[int]] = {}
        for job, (rows, tokens, eval_rows, rss, examples) in zip(jobs, runner.map(pack_chunk, jobs, work), strict=True):
            stats.packed_rows += rows
            stats.packed_tokens += tokens
            stats.eval_rows += eval_rows
            peak = max(peak, rss)
            if not job[1]:
                totals = per_entry.setdefault(mixes[job[0]].entry, [0, 0])
                totals[0], totals[1] = totals[0] + examples, totals[1] + tokens
        stats.sources = _entry_stats(cfg, sources, per_entry)
        shutil.rmtree(tmp / "examples", ignore_errors=True)
        meta = {"stats": asdict(stats), "rejected": rejected}
        write_atomic(tmp / "meta.json", json.dumps(meta, ensure_ascii=False))  # last: the entry is complete
        try:
            tmp.rename(cache)
        except OSError:  # a concurrent prepare of the same inputs won; its rows are identical
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    data = load_prepared(cache)
    data.cache_hit = False
    data.work_peak_rss_mb = peak
    return data


def mixture_uses(results: list[ChunkResult], mixes: list[Any], held: Any, seed: int) -> Any:
    """How many times each training example (in chunk order) is used, or None when every ``data.path``
    entry is used once as it is. An entry's target: ``epochs`` x its examples, at most ``max_examples``,
    or for weights its share of the sources' total tokens (at the entry's mean example length); whole
    passes first, the remainder a seeded choice, so the mixture is the same on every engine."""
    import numpy as np

    if all(m.plain for m in mixes):
        return None
    entry_of = np.concatenate([np.full(r.kept, m.entry, dtype=np.int64) for r, m in zip(results, mixes, strict=True)])
    by_entry = {m.entry: m for m in mixes}
    tokens = {e: 0 for e in by_entry}
    for r, m in zip(results, mixes, strict=True):
        tokens[m.entry] += r.tokens
    weights = {e: m.weight for e, m in by_entry.items() if m.weight is not None}
    total_tokens, total_weight = sum(tokens.values()), sum(weights.values())
    uses = np.zeros(len(entry_of), dtype=np.int64)
    for e, m in sorted(by_entry.items()):
        members = np.flatnonzero((entry_of == e) & ~np.asarray(held, dtype=bool))
        n = len(members)
        if not n:
            continue
        if m.weight is not None:
            mean = tokens[e] / max(1, int((entry_of == e).sum()))
            target = round(m.weight / total_weight * total_tokens / max(mean, 1e-9))
        elif m.epochs is not None:
            target = round(m.epochs * n)
        else:
            target = min(n, m.max_examples) if m.max_examples is not None else n
        uses[members] = target // n
        extra = np.random.default_rng([seed, e]).permutation(n)[: target % n]
        uses[members[extra]] += 1
    return uses


def _entry_stats(cfg: DataConfig, sources: list[Source], per_entry: dict[int, list[int]]) -> list[dict[str, Any]]:
    entries = cfg.path if isinstance(cfg.path, list) else [cfg.path]
    total = sum(t for _, t in per_entry.values()) or 1
    out = []
    for e, (examples, tokens) in sorted(per_entry.items()):
        mix = next(s.mix for s in sources if s.mix.entry == e)
        entry = entries[e]
        asked = {k: getattr(mix, k) for k in ("weight", "epochs", "max_examples") if getattr(mix, k) is not None}
        path = entry.path if hasattr(entry, "path") else str(entry)
        out.append({"path": path, "examples": examples, "tokens": tokens, "share": round(tokens / total, 4), **asked})
    return out


def held_out(n: int, fraction: float, seed: int) -> Any:
    """Which of ``n`` examples (in chunk order) are held out for eval: a seeded choice of
    ``max(1, n * fraction)`` of them, the same whichever engine prepared them."""
    import numpy as np

    mask = np.zeros(n, dtype=bool)
    if fraction > 0 and n > 1:
        mask[np.random.default_rng(seed).permutation(n)[: max(1, int(n * fraction))]] = True
    return mask


def _clear_abandoned(cache: Path) -> None:
    """Half-built entries of this key left by a process that died (they are never read: an entry counts
    only under its own name, with meta.json)."""
    for tmp in cache.parent.glob(f"{cache.name}.tmp*"):
        pid = tmp.name.rsplit(".tmp", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def load_prepared(cache: Path) -> PreparedData:
    """A complete cache entry, memory-mapped: its rows are read from the files as they are used."""
    import datasets

    meta = json.loads((cache / "meta.json").read_text())

    def rows(name: str) -> Any:
        parts = sorted((cache / name).glob("*.arrow"))
        if not parts:
            return []
        return datasets.concatenate_datasets([datasets.Dataset.from_file(str(p)) for p in parts])

    return PreparedData(
        train=rows("train"),
        eval=rows("eval"),
        stats=DataStats(**meta["stats"]),
        rejected=meta["rejected"],
        cache_dir=cache,
        cache_hit=True,
    )


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
