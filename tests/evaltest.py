"""A worker process of the two-rank ZeRO-3 samples test (importable by torch.multiprocessing): the loop
that every Ray worker runs, in a process group of two made here, without Ray."""

from __future__ import annotations

import json
import os


def train_rank(rank: int, world: int, port: int, overrides: list[str], out: str, env: dict[str, str]) -> None:
    """``env``: the parent's hermetic caches and checkpoint key (importing conftest here made new ones)."""
    import torch
    import torch.distributed as dist
    from raytest import run_cfg

    os.environ.update(env)
    from distsft.checkpoint import ResumePlan
    from distsft.launcher.prepare import prepare_data
    from distsft.training.evaluate import eval_sets
    from distsft.training.loop import WorkerContext, train

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LOCAL_RANK="0")
    dist.init_process_group("gloo", rank=rank, world_size=world)
    cfg = run_cfg(out, *overrides)
    data = prepare_data(cfg)  # the parent prepared it: a cache hit
    records: list[dict] = []
    ctx = WorkerContext(
        checkpoint_dir=os.path.join(out, "checkpoints"),
        resume=ResumePlan(run_id="two-ranks"),
        rank=rank,
        world_size=world,
        report=records.append,
    )
    train(cfg, data.train, eval_sets(data.eval, {}), ctx)
    with open(os.path.join(out, f"records-{rank}.json"), "w") as f:
        json.dump(records, f)
    dist.destroy_process_group()
