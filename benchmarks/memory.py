"""Peak memory per worker for ZeRO stages 1, 2, 3 and 3 + CPU offload on one model, on Ray (4 workers by default).

    .venv/bin/python benchmarks/memory.py [--stages 1 2 3 3_offload] [--layers 20] [--hidden 1024]

On CPU the figure is each worker's peak resident host memory (ru_maxrss); on GPU it is peak CUDA memory.
The model (about 260M parameters with the defaults) is a random init written once as a Hugging Face
directory, so every stage loads it through the same ``from_pretrained`` path; under ZeRO-3 that happens
inside ``deepspeed.zero.Init``, so no worker ever holds the whole model.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from distsft.config import load_config  # noqa: E402
from distsft.config.cluster import ClusterConfig, WorkerResources  # noqa: E402
from distsft.launcher.run import launch_ray  # noqa: E402


def make_model(out: Path, layers: int, hidden: int, **shape: int) -> int:
    """A seeded random-init Llama with the demo tokenizer's vocabulary, saved to ``out``; ``shape`` overrides
    LlamaConfig keys (heads, key/value heads, context)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok_cfg = json.loads((Path(__file__).resolve().parent.parent / "distsft/demo/model/config.json").read_text())
    spec = {
        "num_attention_heads": hidden // 64,
        "num_key_value_heads": hidden // 64,
        "max_position_embeddings": 2048,
        **shape,
    }
    cfg = LlamaConfig(
        vocab_size=tok_cfg["vocab_size"],
        hidden_size=hidden,
        intermediate_size=int(hidden * 2.75),
        num_hidden_layers=layers,
        pad_token_id=tok_cfg["pad_token_id"],
        eos_token_id=tok_cfg["eos_token_id"],
        **spec,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(out)
    return sum(p.numel() for p in model.parameters())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stages", nargs="+", default=["1", "2", "3", "3_offload"])
    ap.add_argument("--layers", type=int, default=20)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument(
        "--glibc-default",
        action="store_true",
        help="keep glibc's malloc defaults; otherwise workers return freed large blocks to the OS "
        "(MALLOC_MMAP_THRESHOLD_), so peak RSS shows live memory rather than allocator caching",
    )
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "model"
        n = make_model(model_dir, args.layers, args.hidden)
        print(f"model: {n / 1e6:.0f}M parameters ({n * 4 / 2**30:.2f} GiB in fp32), {args.workers} workers")
        results = {}
        for stage in args.stages:
            out = Path(tmp) / f"run-{stage}"
            cfg = load_config(
                None,
                [
                    f"output_dir={out}",
                    f"model.path={model_dir}",
                    "model.tokenizer=demo",
                    "train.max_steps=2",
                    "train.micro_batch_size=1",
                    "data.max_seq_len=256",
                    "data.eval_fraction=0",
                    f"train.zero_stage={stage}",
                    "train.log_every=1",
                ],
            )
            env = {} if args.glibc_default else {"MALLOC_MMAP_THRESHOLD_": "131072"}
            cluster = ClusterConfig(
                num_nodes=1,
                workers_per_node=args.workers,
                env=env,
                resources_per_worker=WorkerResources(cpus=1),
                num_cpus=max(2, args.workers),
            )
            launch_ray(cfg, cluster, quiet=True)
            rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
            by_rank = [max(r["peak_mem_mb_by_rank"][k] for r in rows) for k in range(args.workers)]
            results[stage] = by_rank
            ranks = ", ".join(f"rank {k} {v / 1024:.2f} GiB" for k, v in enumerate(by_rank))
            print(f"zero {Path(stage).stem:>9}: peak memory per worker: {ranks}", flush=True)
        print(json.dumps({"parameters": n, "peak_mem_mb_per_worker": results}))


if __name__ == "__main__":
    main()
