"""Run a training job: prepare data once on the driver, then run the training loop.

``--local`` runs the loop in this process (world size 1, no Ray): the single-GPU debug mode, and the
mode every path can be tested in on a CPU.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from distsft.config import Config, dump_config, save_config
from distsft.coordinator import MetricsLog
from distsft.data.prepare import prepare
from distsft.data.sampler import total_steps
from distsft.model import load_tokenizer


def prepare_data(cfg: Config):
    tokenizer = load_tokenizer(cfg.model)
    return prepare(cfg.data, tokenizer, seed=cfg.train.seed, output_dir=cfg.output_dir)


def launch_local(cfg: Config, quiet: bool = False) -> dict[str, Any]:
    from distsft.train import WorkerContext, train

    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    if not quiet:
        print("resolved config:\n" + dump_config(cfg), flush=True)
    t0 = time.perf_counter()
    data = prepare_data(cfg)
    stats = data.stats.as_dict()
    print(
        f"data: {stats['rows_read']} rows read, {stats['kept']} kept, {stats['rejected']} rejected, "
        f"{stats['too_long']} too long; {stats['packed_rows']} rows of <= {stats['max_seq_len']} tokens "
        f"(packing efficiency {stats['packing_efficiency']:.1%}), {stats['supervised_tokens']} supervised tokens "
        f"[{time.perf_counter() - t0:.1f}s]",
        flush=True,
    )
    plan = cfg.batch_plan(1)
    steps = total_steps(len(data.train), plan, cfg.train.max_steps, cfg.train.epochs)
    log = MetricsLog(out, total_steps=steps, log_every=cfg.train.log_every)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    summary = train(cfg, data.train, data.eval, WorkerContext(report=log.log))
    summary["data"] = stats
    summary["final_dir"] = str(out / "final")
    summary["wall_s"] = time.perf_counter() - t0
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return summary
