"""Full fine-tuning vs LoRA vs QLoRA on the same model: trainable share, peak memory per worker, step time.

    .venv/bin/python benchmarks/lora.py [--layers 20] [--hidden 1024] [--workers 2] [--stage 2]

Each variant trains a few steps of the same data on Ray workers (CPU: peak resident memory per worker;
GPU: peak CUDA memory). The model (about 260M parameters with the defaults) is a random init written
once as a Hugging Face directory; QLoRA holds its linear layers in 4 bits (bitsandbytes NF4).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from memory import make_model  # noqa: E402

from distsft.config import load_config  # noqa: E402
from distsft.config.cluster import ClusterConfig, WorkerResources  # noqa: E402
from distsft.launcher.dry_run import model_sizes  # noqa: E402
from distsft.launcher.run import launch_ray  # noqa: E402

VARIANTS = {
    "full": [],
    "lora": ["lora.r=16", "train.lr=2e-4"],
    "qlora": ["lora.r=16", "train.lr=2e-4", "model.quantization=4bit"],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--layers", type=int, default=20)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--stage", default="2")
    ap.add_argument("--steps", type=int, default=6)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "model"
        n = make_model(model_dir, args.layers, args.hidden)
        print(f"model: {n / 1e6:.0f}M parameters, {args.workers} workers, ZeRO {args.stage}", flush=True)
        results = {}
        for name in args.variants:
            out = Path(tmp) / name
            cfg = load_config(
                None,
                [
                    f"output_dir={out}",
                    f"model.path={model_dir}",
                    "model.tokenizer=demo",
                    f"train.max_steps={args.steps}",
                    "train.micro_batch_size=1",
                    "data.max_seq_len=256",
                    "data.eval_fraction=0",
                    f"train.zero_stage={args.stage}",
                    "train.log_every=1",
                    "logging.plot=false",
                    *VARIANTS[name],
                ],
            )
            cluster = ClusterConfig(
                num_nodes=1,
                workers_per_node=args.workers,
                env={"MALLOC_MMAP_THRESHOLD_": "131072"},  # peak RSS shows live memory, not malloc's cache
                resources_per_worker=WorkerResources(cpus=1),
                num_cpus=max(2, args.workers),
            )
            sizes = model_sizes(cfg, "cpu")
            launch_ray(cfg, cluster, quiet=True)
            rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
            peak = max(max(r.get("peak_mem_mb_by_rank", [r["peak_mem_mb"]])) for r in rows)
            step_s = statistics.median(r["step_time_s"] for r in rows[1:])
            trainable = sizes.trainable
            results[name] = {"trainable": trainable, "peak_mem_mb": peak, "step_s": step_s}
            print(
                f"{name:>6}: trainable {trainable / 1e6:8.2f}M ({trainable / n:7.2%}), peak {peak / 1024:.2f} GiB "
                f"per worker, {step_s:.2f} s/step",
                flush=True,
            )
        print(json.dumps({"parameters": n, "results": results}))


if __name__ == "__main__":
    main()
