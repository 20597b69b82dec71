"""Data preparation spread over a Ray cluster with Ray Data: the same chunks, the same functions.

``distsft/data/prepare.py`` cuts the sources into chunks and defines the two passes over them (tokenise,
then pack); a runner decides where the passes run. ``LocalRunner`` uses this machine's processes; the
``RayRunner`` here makes each pass a Ray Data ``map`` over a dataset of chunk numbers, one chunk per
block, so the chunks are tokenised and packed on every node's CPUs with Ray Data's streaming executor
(bounded concurrency, no more results in flight than the object store holds). The driver only plans the
chunks (streaming through the files, keeping no row) and adds up what each chunk reports.

What the workers write goes to the cache entry being built (``data.cache_dir``), so on a cluster of
several nodes that directory must be one every node sees (the data files too), like ``storage_path``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, is_dataclass
from typing import Any

from distsft.data.passes import Work
from distsft.errors import DataError


class RayRunner:
    """``runner.map(fn, items, work)`` as Ray Data stages; needs ``ray.init`` done (or does a local one).
    Results come back as JSON (a dataclass as its fields). Sources that must be opened as datasets on the
    driver (JSON arrays, hub datasets) are refused: no worker could read a chunk of them on its own."""

    def __init__(self, cpus_per_task: float = 1.0) -> None:
        self.cpus_per_task = cpus_per_task

    def refuses(self, work: Work) -> str:
        """Why this runner cannot prepare ``work`` ('' when it can)."""
        if not work.opened:
            return ""
        kinds = ", ".join(f"{work.sources[i].path} ({work.sources[i].kind})" for i in sorted(work.opened))
        return (
            f"data.engine = ray reads JSONL and Parquet files and saved datasets; these sources are not: "
            f"{kinds}; set data.engine=local or convert them to JSONL or Parquet"
        )

    def map(self, fn: Any, items: list, work: Work) -> list:
        import ray
        import ray.data

        why = self.refuses(work)
        if why:
            raise DataError(why)
        logging.getLogger("ray.data").setLevel(logging.ERROR)  # its per-stage notices are not for the console
        if not ray.is_initialized():
            ray.init(logging_level="ERROR", log_to_driver=False)
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False
        context.print_on_execution_start = False
        shared = ray.put(work)  # the tokenizer and config, once into the object store

        def run(row: dict[str, Any]) -> dict[str, Any]:  # results travel as JSON text: plain numbers and lists
            result = fn(items[row["i"]], ray.get(shared))
            return {"i": row["i"], "result": json.dumps(asdict(result) if is_dataclass(result) else result)}

        ds = ray.data.from_items([{"i": i} for i in range(len(items))], override_num_blocks=max(1, len(items)))
        rows = ds.map(run, num_cpus=self.cpus_per_task).take_all()
        return [json.loads(r["result"]) for r in sorted(rows, key=lambda r: r["i"])]
