"""Data preparation, local engine vs Ray Data: rows/s, driver and worker peak memory, time to first step.

    .venv/bin/python benchmarks/prepare.py [--rows 200000 1000000] [--engines local ray] [--nodes 1 2]

For each corpus size (generated conversations recombined from the bundled demo: random system prompts,
1-3 exchanges, a quarter alpaca rows, about 155 tokens each) and each engine, a fresh process
prepares the corpus from a cold cache and then launches one training step of the demo model on the
cached rows (2 Ray workers), and reports:

- prepare: seconds, rows/s, tokens/s, packing efficiency;
- driver peak RSS: the launching process (``ru_maxrss``), which for ``local`` with ``--num-proc 1``
  also does the tokenising; with ``--num-proc 2`` that happens in forked children (reported as workers);
- worker peak RSS: the processes that tokenised and packed (forked children, or Ray Data workers), and
  the training workers (``peak_mem_mb`` of the step);
- time to first step: from the start of preparation to the end of the launch's first step.

``--nodes 2`` runs the ``ray`` engine on a cluster of two raylets on this machine
(``ray.cluster_utils.Cluster``, one CPU each... the same cores, so it shows the mechanics, not a speed-up).
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from distsft.data.sources import DEMO_DATA  # noqa: E402


def generate(path: Path, n: int, seed: int = 0) -> None:
    demo = [json.loads(x)["messages"] for x in DEMO_DATA.read_text().splitlines()]
    systems = sorted({m[0]["content"] for m in demo if m[0]["role"] == "system"})
    pairs = [
        (m[i]["content"], m[i + 1]["content"])
        for m in demo
        for i in range(len(m) - 1)
        if m[i]["role"] == "user" and m[i + 1]["role"] == "assistant"
    ]
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            turns = [{"role": "system", "content": rng.choice(systems)}] if rng.random() < 0.3 else []
            for q, a in rng.sample(pairs, rng.choice([1, 1, 2, 3])):
                turns += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
            if i % 4 == 3 and len(turns) == 2:  # some alpaca rows in the mix
                row = {"instruction": turns[0]["content"], "input": "", "output": turns[1]["content"]}
            else:
                row = {"messages": turns}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def child(args: argparse.Namespace) -> None:
    """One measurement, in a process of its own (so its peak memory is its own)."""
    from distsft.config import load_config
    from distsft.config.cluster import ClusterConfig, WorkerResources
    from distsft.launcher.prepare import prepare_data
    from distsft.launcher.run import launch_ray

    out = Path(args.workdir)
    sets = [f"output_dir={out / 'run'}", f"data.path={args.data}", f"data.cache_dir={out / 'cache'}",
            f"data.max_seq_len={args.max_seq_len}", f"data.num_proc={args.num_proc}", f"data.engine={args.engine}",
            "data.eval_fraction=0", "train.max_steps=1", "train.micro_batch_size=1", "checkpoint.final=false",
            "logging.plot=false", "logging.tensorboard=false", "logging.progress=none"]  # fmt: skip
    cfg = load_config(None, sets)
    if args.engine == "ray" or args.address:
        import ray

        ray.init(address=args.address, num_cpus=None if args.address else args.num_proc, logging_level="ERROR",
                 log_to_driver=False)  # fmt: skip
    t0 = time.perf_counter()
    data = prepare_data(cfg, args.engine)
    prep = time.perf_counter() - t0
    cluster = ClusterConfig(num_nodes=1, workers_per_node=2, resources_per_worker=WorkerResources(cpus=1),
                            num_cpus=2)  # fmt: skip
    launch_ray(cfg, cluster, quiet=True)
    first_step = time.perf_counter() - t0
    record = json.loads((out / "run" / "metrics.jsonl").read_text().splitlines()[0])
    s = data.stats
    print(
        "RESULT "
        + json.dumps(
            {
                "prepare_s": round(prep, 1),
                "rows_per_s": round(s.rows_read / prep),
                "tokens_per_s": round(s.tokens / prep),
                "rows": s.rows_read,
                "tokens": s.tokens,
                "packed_rows": s.packed_rows,
                "packing_efficiency": round(s.packing_efficiency, 4),
                "driver_peak_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
                "prep_worker_peak_mb": round(
                    max(data.work_peak_rss_mb or 0, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)
                ),
                "train_worker_peak_mb": round(max(record.get("peak_mem_mb_by_rank", [record["peak_mem_mb"]]))),
                "first_step_s": round(first_step, 1),
            }
        ),
        flush=True,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[200_000, 1_000_000])
    ap.add_argument("--engines", nargs="+", default=["local", "ray"], choices=["local", "ray"])
    ap.add_argument("--nodes", type=int, nargs="+", default=[1, 2], help="for the ray engine: 1, or 2 raylets")
    ap.add_argument("--num-proc", type=int, default=2)
    ap.add_argument("--max-seq-len", type=int, default=1024)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--workdir", help=argparse.SUPPRESS)
    ap.add_argument("--engine", help=argparse.SUPPRESS)
    ap.add_argument("--address", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.rows:
            data = Path(tmp) / f"rows-{n}.jsonl"
            t = time.perf_counter()
            generate(data, n)
            print(
                f"generated {n} rows ({data.stat().st_size / 1e6:.0f} MB) in {time.perf_counter() - t:.0f}s", flush=True
            )
            runs = [(e, 1) for e in args.engines if e == "local"]
            runs += [("ray", k) for k in args.nodes if "ray" in args.engines]
            for engine, nodes in runs:
                work = Path(tmp) / f"{n}-{engine}-{nodes}"
                cmd = [sys.executable, __file__, "--child", "--data", str(data), "--workdir", str(work),
                       "--engine", engine, "--num-proc", str(args.num_proc),
                       "--max-seq-len", str(args.max_seq_len)]  # fmt: skip
                cluster = None
                if nodes > 1:
                    from ray.cluster_utils import Cluster

                    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
                    for _ in range(nodes - 1):
                        cluster.add_node(num_cpus=1)
                    cmd += ["--address", cluster.address]
                try:
                    p = subprocess.run(cmd, capture_output=True, text=True)
                finally:
                    if cluster is not None:
                        cluster.shutdown()
                found = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
                if p.returncode or not found:
                    print(f"{n} rows, {engine} x {nodes} node(s): failed\n{p.stderr[-3000:]}", flush=True)
                    continue
                r = {"rows_total": n, "engine": engine, "nodes": nodes, **json.loads(found[0][7:])}
                results.append(r)
                print(
                    f"{n:>9,} rows  {engine:<5} {nodes} node(s): prepare {r['prepare_s']:6.1f} s "
                    f"({r['rows_per_s']:,} rows/s, {r['tokens_per_s']:,} tok/s, "
                    f"packing {r['packing_efficiency']:.1%})  "
                    f"driver peak {r['driver_peak_mb']:,} MB  prep workers {r['prep_worker_peak_mb']:,} MB  "
                    f"train workers {r['train_worker_peak_mb']:,} MB  first step at {r['first_step_s']:.0f} s",
                    flush=True,
                )
    print(json.dumps(results))


if __name__ == "__main__":
    main()
