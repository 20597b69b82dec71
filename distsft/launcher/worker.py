"""What every Ray Train worker runs: the same ``training.loop.train`` as ``--local``, with its rank, its
rows, its end of the record path and the stop flag. Its output goes to ``output_dir/logs/rank-N.log``
(``--verbose``: to the console)."""

from __future__ import annotations

import os
import traceback
from pathlib import Path
from typing import Any

from distsft.config import build_config
from distsft.errors import DistsftError


class WorkerFailure(RuntimeError):
    """A worker's exception, carried to the driver with the worker's rank, node and traceback."""


def ray_worker_loop(config: dict[str, Any]) -> None:
    """What every Ray Train worker runs: the same ``train`` as ``--local``, with its rank and a reporter."""
    os.environ.update(config.get("secret_env") or {})  # before anything reads them (``worker_secrets``)
    import datasets
    import ray
    import ray.train
    import torch
    from datasets.table import InMemoryTable

    from distsft.checkpoint import ResumePlan
    from distsft.data.prepare import load_prepared
    from distsft.metrics.records import RecordSender
    from distsft.training.evaluate import eval_sets
    from distsft.training.loop import WorkerContext, train

    ctx = ray.train.get_context()
    rank, node = ctx.get_world_rank(), ray.util.get_node_ip_address()
    if config["logs"]:
        redirect_output(Path(config["logs"]) / f"rank-{rank}.log")
    print(f"rank {rank} of {ctx.get_world_size()} on {node}, pid {os.getpid()}", flush=True)
    cfg = build_config(config["cfg"])
    if config.get("rows_dir"):  # the prepared cache entry, memory-mapped: pages are read as steps need them
        rows = Path(config["rows_dir"])
        if not (rows / "meta.json").is_file():
            raise DistsftError(
                f"rank {rank} on node {node}: the prepared data {rows} is not visible here; set data.cache_dir "
                "to a directory every node sees"
            )
        prepared = load_prepared(rows)
        train_rows, eval_rows = prepared.train, prepared.eval
        named = {name: load_prepared(Path(d)).train for name, d in config.get("eval_dirs", {}).items()}
    else:  # through the object store: an explicit fingerprint skips datasets' hashing of the table
        train_rows = datasets.Dataset(InMemoryTable(ray.get(config["train"])), fingerprint="distsft-train")
        eval_rows = []
        if config["eval"] is not None:
            eval_rows = datasets.Dataset(InMemoryTable(ray.get(config["eval"])), fingerprint="distsft-eval")
        named = {
            name: datasets.Dataset(InMemoryTable(ray.get(ref)), fingerprint=f"distsft-eval-{name}")
            for name, ref in config.get("evals", {}).items()
        }
    node_id = ray.get_runtime_context().get_node_id()
    local_rank = ctx.get_local_rank()
    device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    sink = config["sink"]
    sink.hello.remote(rank, {"node": node, "node_id": node_id, "pid": os.getpid(), "device": device})
    reporter = RecordSender(lambda records: sink.put.remote(rank, records), ray.get)
    tagged = {"node": node, "node_id": node_id, "pid": os.getpid()}
    stop_flag = config["stop_flag"]
    wctx = WorkerContext(
        rank=rank,
        world_size=ctx.get_world_size(),
        local_rank=local_rank,
        report=lambda record: reporter.report({**record, **tagged}),
        flush=reporter.flush,
        wait=reporter.wait,
        checkpoint_dir=config["checkpoint_dir"],
        should_stop=lambda: ray.get(stop_flag.get.remote()),
        resume=ResumePlan(**config["resume"]),
    )
    try:
        summary = train(cfg, train_rows, eval_sets(eval_rows, named), wctx)
        if rank == 0:  # what the run was (parameters, device, attention, loss): the driver's summary.json
            ray.get(sink.finish.remote(summary))
    except DistsftError as e:  # says what to change: one line, no traceback
        raise WorkerFailure(f"rank {rank} on node {node}: {e}") from None
    except Exception as e:
        raise WorkerFailure(f"rank {rank} on node {node} failed:\n{traceback.format_exc()}") from e


def redirect_output(path: Path) -> None:
    """This process's stdout and stderr (Python's and the C libraries') to ``path``: the console shows the
    run, not every worker's library chatter; ``--verbose`` keeps it on the console."""
    import sys

    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)  # what C and C++ libraries write
    os.dup2(fd, 2)
    os.close(fd)
    # Python's own streams straight to the file too (Ray wraps them to copy lines to its own logs)
    sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115
    sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
