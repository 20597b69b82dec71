"""Peak memory per worker against sequence length, with and without sequence parallelism and tiling.

    .venv/bin/python benchmarks/long_context.py [--lengths 2048 4096 8192] [--sp 1 2 4] [--layers 8] [--tiled]
    python benchmarks/long_context.py --longest --preset gpu-1.5b     # one GPU: the longest row that trains

Each point trains one step (ZeRO-2, fp32, CPU workers on Ray) on rows of one example that fills
``max_seq_len``; every worker count is one sequence-parallel group (data parallel 1), so the work per
step is the same and only how it is split changes. Reported: the largest peak resident memory of any
worker (ru_maxrss, malloc told to return large blocks so the peak shows live memory) and the step time.
What grows with the length is activations: the model (a Llama shape of about 10M parameters by default),
its optimizer state and the runtime are the same at every length (the shortest row shows that floor).

On a CPU, sdpa runs each example of a gathered row on its own; a GPU runs varlen kernels (no mask).

``--longest`` (one GPU, no sequence parallelism): the longest row of one example that trains one step
(``distsft launch --local``, bf16, activation checkpointing), with and without the tiled MLP, found by
doubling from 16k and then bisecting to within 1/8; each attempt is its own process, so an out-of-memory
attempt leaves nothing behind.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from memory import make_model  # noqa: E402

from distsft.config import load_config  # noqa: E402
from distsft.config.cluster import ClusterConfig, WorkerResources  # noqa: E402
from distsft.launcher.run import launch_ray  # noqa: E402


def make_data(out: Path, length: int, rows: int = 2) -> None:
    """Conversations of about ``length`` tokens (a short question, a long answer), truncated to fit."""
    rng = random.Random(length)
    words = "the a support order refund account password shipping invoice update please thanks".split()
    with out.open("w") as f:
        for _ in range(rows):
            answer = " ".join(rng.choice(words) for _ in range(length))
            row = {
                "messages": [
                    {"role": "user", "content": "Tell me everything."},
                    {"role": "assistant", "content": answer},
                ]
            }
            f.write(json.dumps(row) + "\n")


def trains(model_dir: Path, tmp: Path, length: int, extra: list[str]) -> tuple[bool, str]:
    """Whether one step on a row of ``length`` tokens trains, in a process of its own."""
    import subprocess

    data = tmp / f"longest-{length}.jsonl"
    make_data(data, length, rows=1)
    sets = [f"output_dir={tmp / f'longest-run-{length}'}", f"model.path={model_dir}", "model.tokenizer=demo",
            f"data.path={data}", f"data.max_seq_len={length}", "data.too_long=truncate", "data.eval_fraction=0",
            "train.max_steps=1", "train.micro_batch_size=1", "model.dtype=bfloat16",
            "model.gradient_checkpointing=true", "checkpoint.final=false", "logging.plot=false",
            "logging.tensorboard=false", *extra]  # fmt: skip
    cmd = [sys.executable, "-m", "distsft", "launch", "--local"] + [a for x in sets for a in ("--set", x)]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        return False, "timeout"
    tail = (p.stdout + p.stderr).strip().splitlines()[-1:] or [""]
    return p.returncode == 0, "ok" if p.returncode == 0 else tail[0][:160]


def longest(preset: str) -> None:
    from throughput import PRESETS
    from throughput import make_model as make_shape

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir = Path(make_shape(tmp, {**PRESETS[preset]["model"], "max_position_embeddings": 1 << 21}, "bfloat16"))
        for name, extra in (("checkpointing", []), ("checkpointing + tiled MLP", ["model.tiled_mlp=true"])):
            ok, bad, length = 0, 0, 16384
            while length <= 1 << 20:
                good, why = trains(model_dir, tmp, length, extra)
                print(f"{name}: {length:>8} tokens: {why}", flush=True)
                if not good:
                    bad = length
                    break
                ok, length = length, length * 2
            while bad and bad - ok > max(ok // 8, 4096):
                mid = (ok + bad) // 2 // 1024 * 1024
                good, why = trains(model_dir, tmp, mid, extra)
                print(f"{name}: {mid:>8} tokens: {why}", flush=True)
                ok, bad = (mid, bad) if good else (ok, mid)
            print(f"longest row, {name}: {ok:,} tokens trains" + (f", {bad:,} does not" if bad else ""), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--longest", action="store_true", help="one GPU: the longest row that trains (see above)")
    ap.add_argument("--preset", default="gpu-1.5b", help="--longest: a model shape of benchmarks/throughput.py")
    ap.add_argument("--lengths", nargs="+", type=int, default=[512, 2048, 4096, 8192])
    ap.add_argument("--sp", nargs="+", type=int, default=[1, 2, 4])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--tiled", action="store_true", help="also each point with checkpointing + tiled MLP")
    args = ap.parse_args()
    if args.longest:
        longest(args.preset)
        return
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "model"
        n = make_model(
            model_dir, args.layers, args.hidden, num_attention_heads=8, num_key_value_heads=4,
            max_position_embeddings=max(args.lengths),
        )  # fmt: skip
        print(f"model: {n / 1e6:.1f}M parameters, {args.layers} layers, hidden {args.hidden}; one step per point")
        variants = [("plain", [])]
        if args.tiled:
            variants.append(("ckpt+tiled", ["model.gradient_checkpointing=true", "model.tiled_mlp=true"]))
        for length in args.lengths:
            data = Path(tmp) / f"data-{length}.jsonl"
            make_data(data, length)
            for sp in args.sp:
                for name, extra in variants:
                    out = Path(tmp) / f"run-{length}-{sp}-{name}"
                    cfg = load_config(
                        None,
                        [
                            f"output_dir={out}",
                            f"model.path={model_dir}",
                            "model.tokenizer=demo",
                            f"data.path={data}",
                            f"data.max_seq_len={length}",
                            "data.too_long=truncate",
                            "data.eval_fraction=0",
                            "train.max_steps=1",
                            "train.micro_batch_size=1",
                            f"train.sequence_parallel={sp}",
                            "train.zero_stage=2",
                            "checkpoint.final=false",
                            "logging.plot=false",
                            "logging.tensorboard=false",
                            *extra,
                        ],
                    )
                    cluster = ClusterConfig(
                        num_nodes=1,
                        workers_per_node=sp,
                        env={"MALLOC_MMAP_THRESHOLD_": "131072"},
                        resources_per_worker=WorkerResources(cpus=1),
                        num_cpus=max(2, sp),
                    )
                    launch_ray(cfg, cluster, quiet=True)
                    (row,) = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
                    peak = max(row.get("peak_mem_mb_by_rank", [row["peak_mem_mb"]]))
                    result = {"length": length, "sp": sp, "variant": name, "peak_mib": round(peak),
                              "step_s": round(row["step_time_s"], 2), "tokens": row["input_tokens"]}  # fmt: skip
                    results.append(result)
                    print(
                        f"len {length:>6}  sp {sp}  {name:<10}  peak {peak:7.0f} MiB per worker  "
                        f"step {row['step_time_s']:6.2f} s  ({row['input_tokens']} tokens)",
                        flush=True,
                    )
    print(json.dumps(results))


if __name__ == "__main__":
    main()
