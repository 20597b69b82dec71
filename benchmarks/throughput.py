"""distsft vs TRL's SFTTrainer: the same data on the same model, supervised tokens per second.

    .venv/bin/pip install -e .[bench]          # TRL
    .venv/bin/python benchmarks/throughput.py  # CPU: the demo model, about 10 minutes on 2 cores
    .venv/bin/python benchmarks/throughput.py --preset gpu-1.5b --max-steps 30   # one GPU, bf16, 1.5B Llama

Data: the bundled support conversations plus a long-tailed mix of synthetic conversations (log-normal
lengths up to ``--max-seq-len``), tokenised ONCE by distsft's pipeline; TRL receives exactly those
examples pre-tokenised (``input_ids`` + ``labels``), so both train on the same supervised tokens.

Runs, each in its own process so none inherits another's threads or allocator state:
  distsft-local   ``launch --local`` (packed rows, block-diagonal attention)
  distsft-ray     Ray Train, one worker (the same loop, plus Ray's reporting)
  trl-padding     SFTTrainer defaults: batches padded to their longest example
  trl-packing     SFTTrainer ``packing=True`` (best-fit decreasing, padding-free with position ids)
  bare            the packed batches distsft trains on, through plain forward + backward (distsft's loss
                  and attention) and torch's fused AdamW on the bf16 weights: no DeepSpeed, no input
                  pipeline, no logging; the limit distsft's step is measured against

Each run reports supervised tokens/s, milliseconds per step split into data wait / forward+backward /
optimizer (distsft from its own per-step records, TRL from Trainer callbacks with device syncs, bare
from CUDA events), MFU and peak memory. With ``--max-steps`` every run trains that many steps and the
per-step figures are the median of the steady ones (the first two and last two steps left out).

The global batch is the same number of examples for every run: ``--batch-examples`` examples for TRL's
padded batches, and as many packed rows as hold that many examples on average for the packed runs.
Activation checkpointing is off everywhere (TRL turns it on by default; it trades speed for memory in
both tools alike), and all runs use the same precision, learning rate and schedule. Throughput is
supervised tokens over the training loop's time (model loading and data preparation excluded for both).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PRESETS = {
    # the bundled demo model (4.7M parameters), fp32 on CPU
    "cpu-demo": {"model": "demo", "max_seq_len": 512, "batch_examples": 16, "long_tail": 600, "dtype": "float32"},
    # ~0.7B Llama (random init) with the demo tokenizer, bf16 on one GPU
    "gpu-0.7b": {
        "model": {"hidden_size": 1536, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 12},
        "max_seq_len": 2048,
        "batch_examples": 32,
        "long_tail": 4000,
        "dtype": "bfloat16",
    },
    # the 1.5B Llama shape of the GPU measurements (../shared/gpu/README.md): 2 packed rows of 2048 per step
    "gpu-1.5b": {
        "model": {
            "hidden_size": 2048,
            "intermediate_size": 8192,
            "num_hidden_layers": 16,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "vocab_size": 128256,
            "tie_word_embeddings": False,
        },
        "max_seq_len": 2048,
        "batch_examples": 16,
        "long_tail": 4000,
        "dtype": "bfloat16",
    },
}
RUNS = ["distsft-local", "distsft-ray", "trl-padding", "trl-packing", "bare"]


# --- data ---------------------------------------------------------------------------------------------
def long_tail_rows(n: int, max_tokens: int, seed: int) -> list[dict]:
    """Conversations whose lengths follow a log-normal (median ~1/8 of the context, a tail up to the
    whole context), written from the bundled data's own words so the tokenizer sees familiar text."""
    from distsft.config import DEMO_DIR

    words = []
    for line in (DEMO_DIR / "data" / "support.jsonl").read_text(encoding="utf-8").splitlines()[:300]:
        for m in json.loads(line)["messages"]:
            words.extend(m["content"].split())
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        # about 1.6 tokens per word for this tokenizer; keep the whole conversation under the context
        target = min(max_tokens * 0.9, max(16.0, rng.lognormvariate(math.log(max_tokens / 8), 0.9)))
        n_words = int(target / 1.6)
        turns = rng.choice([1, 1, 2, 3])
        msgs = []
        for _ in range(turns):
            user = max(3, int(n_words / turns * rng.uniform(0.1, 0.4)))
            reply = max(3, int(n_words / turns) - user)
            msgs.append({"role": "user", "content": " ".join(rng.choices(words, k=user))})
            msgs.append({"role": "assistant", "content": " ".join(rng.choices(words, k=reply))})
        rows.append({"messages": msgs})
    return rows


def build_data(workdir: Path, long_tail: int, max_seq_len: int, seed: int, bundled: int | None = None) -> Path:
    from distsft.config import DEMO_DIR

    path = workdir / "data.jsonl"
    lines = (DEMO_DIR / "data" / "support.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(lines[:bundled])
        for row in long_tail_rows(long_tail, max_seq_len, seed):
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def make_model(workdir: Path, shape: dict | str, dtype: str = "float32") -> str:
    """``demo`` as is, or a random-init Llama of ``shape`` (any of LlamaConfig's keys: vocabulary, kv heads,
    tied embeddings, ...; the vocabulary defaults to the demo tokenizer's), saved in ``dtype``."""
    if shape == "demo":
        return "demo"
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from distsft.config import DEMO_DIR

    base = json.loads((DEMO_DIR / "model" / "config.json").read_text())
    spec = {
        "vocab_size": base["vocab_size"],
        "num_key_value_heads": shape["num_attention_heads"],
        "max_position_embeddings": 8192,
        **shape,
    }
    cfg = LlamaConfig(
        pad_token_id=base["pad_token_id"],
        eos_token_id=base["eos_token_id"],
        bos_token_id=base.get("bos_token_id"),
        **spec,
    )
    out = workdir / "model"
    if not (out / "config.json").is_file():
        torch.manual_seed(0)
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
            model = LlamaForCausalLM(cfg)
        model.to(getattr(torch, dtype)).save_pretrained(out)
        del model
    return str(out)


def base_overrides(args, model: str, data: Path) -> list[str]:
    out = [
        f"model.path={model}",
        "model.tokenizer=demo",
        f"model.dtype={args.dtype}",
        f"data.path={data}",
        f"data.max_seq_len={args.max_seq_len}",
        "data.eval_fraction=0",
        "train.epochs=1",
        "train.lr=2e-4",
        "train.warmup_steps=5",
        "train.eval_every=0",
        "train.log_every=10",
        "train.zero_stage=2",
        "logging.tensorboard=false",
        "logging.plot=false",
        "logging.progress=none",
        "checkpoint.final=false",  # throughput only: no final save or export
    ]
    return out + ([f"train.max_steps={args.max_steps}"] if args.max_steps else [])


def plan(args, overrides: list[str]) -> dict:
    """Prepare once (packed and unpacked) and size the batches so every run sees the same examples/step."""
    from distsft.config import load_config
    from distsft.launcher.prepare import prepare_data

    packed = prepare_data(load_config(None, overrides))
    unpacked = prepare_data(load_config(None, [*overrides, "data.packing=false"]))
    examples = len(unpacked.train)
    per_row = examples / len(packed.train)
    rows_per_step = max(1, round(args.batch_examples / per_row))
    sup = sum(sum(1 for t in r["labels"][1:] if t != -100) for r in unpacked.train)
    return {
        "examples": examples,
        "packed_rows": len(packed.train),
        "examples_per_row": per_row,
        "rows_per_step": rows_per_step,
        "supervised_tokens": sup,
        "input_tokens": sum(len(r["input_ids"]) for r in unpacked.train),
        "packing_efficiency": packed.stats.as_dict()["packing_efficiency"],
    }


def steady(values: list[float]) -> float:
    """The median of a run's steady steps: the first two (warm-up, compilation) and last two left out."""
    core = values[2:-2] if len(values) > 6 else values
    return statistics.median(core) if core else float("nan")


def peak_mb(device: str) -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None


# --- the runs (each in a child process) -----------------------------------------------------------------
def run_distsft(args, overrides: list[str], info: dict, out: Path, ray: bool) -> dict:
    from distsft.config import load_config
    from distsft.launcher.run import launch_local, launch_ray
    from distsft.metrics.jsonl import read_metrics

    extra = [f"output_dir={out}", f"train.micro_batch_size={info['rows_per_step']}", *args.distsft_set]
    cfg = load_config(None, [*overrides, *extra])
    if ray:
        from distsft.config.cluster import ClusterConfig, WorkerResources

        cpus = os.cpu_count() or 1
        # the one worker gets every CPU (Ray sets its OMP_NUM_THREADS from that), like the other runs
        cluster = ClusterConfig(
            num_nodes=1,
            workers_per_node=1,
            resources_per_worker=WorkerResources(cpus=cpus, gpus=1 if args.device == "cuda" else 0),
            num_cpus=cpus,
        )
        summary = launch_ray(cfg, cluster, quiet=True)
    else:
        summary = launch_local(cfg, quiet=True)
    rows = read_metrics(out)
    return {
        "steps": summary["steps_run"],
        "supervised_tokens": summary["supervised_tokens"],
        "loop_s": rows[-1]["elapsed_s"],  # the training loop, as TRL's train_runtime: no load, no final save
        "final_loss": summary["final_loss"],
        "mfu": steady([r["mfu"] for r in rows]) if rows[-1].get("mfu") is not None else None,
        "peak_mem_mb": max(r["peak_mem_mb"] for r in rows),
        "step_ms": steady([r["step_time_s"] * 1e3 for r in rows]),
        "data_ms": steady([r["data_wait_s"] * 1e3 for r in rows]),
        "fwd_bwd_ms": steady([r["fwd_bwd_s"] * 1e3 for r in rows]),
        "optimizer_ms": steady([r["optimizer_s"] * 1e3 for r in rows]),
        "attention": summary.get("attention"),
    }


def run_trl(args, overrides: list[str], info: dict, out: Path, packing: bool) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from distsft.config import load_config
    from distsft.launcher.prepare import prepare_data
    from distsft.model.flops import flops_model, peak_flops
    from distsft.model.loading import load_tokenizer

    cfg = load_config(None, overrides)
    tokenizer = load_tokenizer(cfg.model)
    src = prepare_data(load_config(None, [*overrides, "data.packing=false"])).train  # a cache hit
    data = Dataset.from_dict({"input_ids": src["input_ids"], "labels": src["labels"]})
    model_dir = cfg.model.path
    if model_dir == "demo":
        from distsft.model.loading import materialize_demo

        model_dir = str(materialize_demo(cfg.train.seed))
    dtype = getattr(torch, args.dtype)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation=args.trl_attn)
    batch = info["rows_per_step"] if packing else args.batch_examples
    sft = SFTConfig(
        output_dir=str(out),
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=1,
        num_train_epochs=1,
        max_steps=args.max_steps or -1,
        learning_rate=2e-4,
        lr_scheduler_type="cosine",
        warmup_steps=5,
        weight_decay=0.0,
        adam_beta2=0.95,
        max_grad_norm=1.0,
        max_length=args.max_seq_len,
        packing=packing,
        gradient_checkpointing=False,
        bf16=args.dtype == "bfloat16",
        use_cpu=args.device == "cpu",
        logging_steps=10,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        seed=cfg.train.seed,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    clock = PhaseClock(args.device)
    trainer = SFTTrainer(
        model=model,
        args=sft,
        train_dataset=data,
        processing_class=tokenizer,
        callbacks=[clock.callback(TrainerCallback)],
    )
    counted = [0]
    compute_loss = trainer.compute_loss

    def counting_loss(model, inputs, *a, **kw):  # the supervised tokens of exactly the batches trained on
        if model.training:
            counted[0] += int((inputs["labels"][:, 1:] != -100).sum())
        return compute_loss(model, inputs, *a, **kw)

    trainer.compute_loss = counting_loss
    result = trainer.train()
    loop_s = result.metrics["train_runtime"]
    steps = trainer.state.global_step
    sup = counted[0]
    n_params = sum(p.numel() for p in model.parameters())
    fm = flops_model(model, n_params)
    lengths = [len(x) for x in src["input_ids"]]
    flops = fm.flops(lengths) * (sup / max(1, info["supervised_tokens"]))  # real example lengths only
    peak = peak_flops(torch.cuda.get_device_name() if args.device == "cuda" else None)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {
        "steps": steps,
        "supervised_tokens": sup,
        "loop_s": loop_s,
        "final_loss": losses[-1] if losses else None,
        "mfu": flops / loop_s / peak if peak else None,
        "peak_mem_mb": peak_mb(args.device),
        **clock.split(),
        "attention": args.trl_attn,
    }


class PhaseClock:
    """Times a Trainer's steps from its callbacks (data wait, forward+backward, optimizer), syncing the
    device at each boundary so each phase's time is its own."""

    def __init__(self, device: str) -> None:
        self.device, self.t = device, {}
        self.phases: dict[str, list[float]] = {"step_ms": [], "data_ms": [], "fwd_bwd_ms": [], "optimizer_ms": []}

    def now(self) -> float:
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()
        return time.perf_counter()

    def callback(self, base):
        clock = self

        class Callback(base):
            def on_step_begin(self, args, state, control, **kw):
                t = clock.now()
                if "end" in clock.t:
                    clock.phases["data_ms"].append((t - clock.t["end"]) * 1e3)
                clock.t["begin"] = t

            def on_pre_optimizer_step(self, args, state, control, **kw):
                clock.t["pre_opt"] = clock.now()

            def on_optimizer_step(self, args, state, control, **kw):
                clock.t["opt"] = clock.now()

            def on_step_end(self, args, state, control, **kw):
                t = clock.now()
                if {"begin", "pre_opt", "opt"} <= set(clock.t):
                    clock.phases["fwd_bwd_ms"].append((clock.t["pre_opt"] - clock.t["begin"]) * 1e3)
                    clock.phases["optimizer_ms"].append((clock.t["opt"] - clock.t["pre_opt"]) * 1e3)
                    previous = clock.t.get("end", clock.t["begin"])
                    clock.phases["step_ms"].append((t - previous) * 1e3)
                clock.t["end"] = t

        return Callback()

    def split(self) -> dict[str, float]:
        return {k: steady(v) for k, v in self.phases.items()}


def run_bare(args, overrides: list[str], info: dict, out: Path) -> dict:
    """The same packed batches, plain forward + backward + fused AdamW: the limit to compare with."""
    import torch

    from distsft.config import load_config
    from distsft.data.sampler import total_steps
    from distsft.launcher.prepare import prepare_data
    from distsft.model.flops import flops_model, peak_flops
    from distsft.model.loading import load_model, load_tokenizer, resolve_dtype, traits_and_attention
    from distsft.model.traits import varlen
    from distsft.training.batches import Prefetcher, RowTable
    from distsft.training.loss import token_loss_sum

    cfg = load_config(None, [*overrides, f"train.micro_batch_size={info['rows_per_step']}", *args.distsft_set])
    device = torch.device(args.device)
    dtype = resolve_dtype(cfg.model, device)
    _traits, attn = traits_and_attention(cfg.model, device, dtype)
    model = load_model(cfg.model, dtype, attn, cfg.train.seed).to(device).train()
    tokenizer = load_tokenizer(cfg.model)
    rows = prepare_data(cfg).train
    plan_ = cfg.batch_plan(1)
    steps = total_steps(len(rows), plan_, cfg.train.max_steps, cfg.train.epochs)
    fm = flops_model(model, sum(p.numel() for p in model.parameters()))
    feed = Prefetcher(
        RowTable(rows, fm.per_example), plan_, 0, cfg.train.seed, tokenizer.pad_token_id, varlen(attn), False
    )
    opt = torch.optim.AdamW(model.parameters(), lr=2e-4, betas=(0.9, 0.95), fused=args.device == "cuda")
    mode = "fused" if cfg.train.cross_entropy in ("auto", "fused") else cfg.train.cross_entropy
    phases: dict[str, list[float]] = {"step_ms": [], "data_ms": [], "fwd_bwd_ms": [], "optimizer_ms": []}
    clock = PhaseClock(args.device)
    sup = flops = 0.0
    t_start = clock.now()
    for step in range(steps):
        t0 = clock.now()
        inputs = feed.build(step)
        batches = inputs.to_device(device)
        t1 = clock.now()
        for b in batches:
            parts = token_loss_sum(model, b, mode=mode)
            (parts.loss_sum / max(inputs.global_supervised, 1)).backward()
        t2 = clock.now()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        t3 = clock.now()
        for key, value in (
            ("data_ms", t1 - t0),
            ("fwd_bwd_ms", t2 - t1),
            ("optimizer_ms", t3 - t2),
            ("step_ms", t3 - t0),
        ):
            phases[key].append(value * 1e3)
        sup += inputs.global_supervised
        flops += inputs.global_flops
    loop_s = clock.now() - t_start
    feed.close()
    peak = peak_flops(torch.cuda.get_device_name() if args.device == "cuda" else None)
    split = {k: steady(v) for k, v in phases.items()}
    return {
        "steps": steps,
        "supervised_tokens": int(sup),
        "loop_s": loop_s,
        "final_loss": parts.loss_sum.item() / max(1, int(parts.tokens)),
        "mfu": flops / steps / (split["step_ms"] / 1e3) / peak if peak else None,
        "peak_mem_mb": peak_mb(args.device),
        **split,
        "attention": attn,
    }


def child(args) -> None:
    spec = json.loads(Path(args.child).read_text())
    out = Path(spec["out"])
    mode = spec["mode"]
    if mode.startswith("distsft"):
        res = run_distsft(args, spec["overrides"], spec["info"], out, ray=mode == "distsft-ray")
    elif mode == "bare":
        res = run_bare(args, spec["overrides"], spec["info"], out)
    else:
        res = run_trl(args, spec["overrides"], spec["info"], out, packing=mode == "trl-packing")
    Path(spec["result"]).write_text(json.dumps(res))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default=None)
    ap.add_argument("--runs", nargs="+", choices=RUNS, default=None, help="default: all (no Ray on a GPU box)")
    ap.add_argument("--max-seq-len", type=int)
    ap.add_argument("--batch-examples", type=int)
    ap.add_argument("--max-steps", type=int, help="train this many steps instead of one epoch")
    ap.add_argument("--long-tail", type=int, help="synthetic long-tailed conversations added to the bundled set")
    ap.add_argument(
        "--model-shape", type=json.loads, help="JSON: override the preset's Llama shape (any LlamaConfig key)"
    )
    ap.add_argument("--bundled", type=int, help="use only the first N bundled conversations (a quick check)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", help="keep runs here (default: a temporary directory)")
    ap.add_argument(
        "--distsft-set", action="append", default=[], metavar="KEY=VALUE", help="extra config for the distsft runs"
    )
    ap.add_argument("--tag", default="", help="a label printed with each run (for variants run one after another)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--device", help=argparse.SUPPRESS)
    ap.add_argument("--dtype", help=argparse.SUPPRESS)
    ap.add_argument("--trl-attn", default="sdpa", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)

    import torch

    args.device = "cuda" if torch.cuda.is_available() else "cpu"
    preset = PRESETS[args.preset or ("gpu-1.5b" if args.device == "cuda" else "cpu-demo")]
    for key in ("max_seq_len", "batch_examples", "long_tail"):
        if getattr(args, key) is None:
            setattr(args, key, preset[key])
    args.dtype = preset["dtype"]
    runs = args.runs or [r for r in RUNS if not (r == "distsft-ray" and args.device == "cuda")]
    if args.device == "cuda":
        try:
            import flash_attn  # noqa: F401

            args.trl_attn = "flash_attention_2"
        except ImportError:
            args.trl_attn = "sdpa"
    tmp = tempfile.TemporaryDirectory() if not args.workdir else None
    workdir = Path(args.workdir or tmp.name)
    workdir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("DISTSFT_CACHE", str(workdir / "cache"))
    data = build_data(workdir, args.long_tail, args.max_seq_len, args.seed, args.bundled)
    shape = args.model_shape or preset["model"]
    model = make_model(workdir, shape if shape == "demo" else {**preset.get("model", {}), **shape}, args.dtype)
    overrides = base_overrides(args, model, data)
    info = plan(args, overrides)
    device = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU ({os.cpu_count()} cores)"
    print(
        f"device: {device}; model: {preset['model'] if model == 'demo' else shape}; dtype {args.dtype}\n"
        f"data: {info['examples']} examples, {info['supervised_tokens']:,} supervised / {info['input_tokens']:,} "
        f"input tokens; packed into {info['packed_rows']} rows of <= {args.max_seq_len} "
        f"({info['examples_per_row']:.2f} examples/row, efficiency {info['packing_efficiency']:.1%})\n"
        f"global batch: {args.batch_examples} examples (padded runs) = {info['rows_per_step']} packed rows "
        f"(~{info['rows_per_step'] * info['examples_per_row']:.1f} examples), "
        + (f"{args.max_steps} steps" if args.max_steps else "one epoch"),
        flush=True,
    )
    results, failed = {}, False
    for mode in runs:
        spec = {
            "mode": mode,
            "overrides": overrides,
            "info": info,
            "out": str(workdir / f"{mode}{args.tag}"),
            "result": str(workdir / f"{mode}{args.tag}.json"),
        }
        spec_file = workdir / f"{mode}{args.tag}.spec.json"
        spec_file.write_text(json.dumps(spec))
        cmd = [sys.executable, __file__, "--child", str(spec_file), "--device", args.device, "--dtype", args.dtype]
        cmd += ["--trl-attn", args.trl_attn, "--max-seq-len", str(args.max_seq_len)]
        cmd += ["--batch-examples", str(args.batch_examples)]
        cmd += ["--max-steps", str(args.max_steps or 0)]
        cmd += [f"--distsft-set={x}" for x in args.distsft_set]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"{mode}: FAILED\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}", flush=True)
            failed = True
            continue
        res = json.loads(Path(spec["result"]).read_text())
        res["wall_s"] = time.perf_counter() - t0
        res["tokens_per_s"] = res["supervised_tokens"] / res["loop_s"]
        results[mode] = res
        print(format_result(f"{mode}{args.tag}", res), flush=True)
    for ours in ("distsft-local", "distsft-ray"):
        for theirs in ("trl-padding", "trl-packing"):
            if ours in results and theirs in results:
                ratio = results[ours]["tokens_per_s"] / results[theirs]["tokens_per_s"]
                print(f"{ours} / {theirs}: {ratio:.2f}x", flush=True)
    if "distsft-local" in results and "bare" in results:
        ratio = results["distsft-local"]["step_ms"] / results["bare"]["step_ms"]
        print(f"distsft-local step time / bare step time: {ratio:.2f}x", flush=True)
    print(json.dumps({"device": device, "info": info, "results": results}))
    if failed:
        sys.exit(1)


def format_result(name: str, res: dict) -> str:
    mfu = f", MFU {res['mfu']:.1%}" if res.get("mfu") is not None else ""
    mem = f", peak {res['peak_mem_mb'] / 1024:.1f} GiB" if res.get("peak_mem_mb") else ""
    split = ""
    if res.get("step_ms") == res.get("step_ms"):  # not NaN
        split = (
            f"; {res['step_ms']:.0f} ms/step = data {res['data_ms']:.1f} + fwd+bwd {res['fwd_bwd_ms']:.0f} + "
            f"optimizer {res['optimizer_ms']:.1f}"
        )
    loss = f", final loss {res['final_loss']:.3f}" if res.get("final_loss") is not None else ""
    return (
        f"{name:>16}: {res['tokens_per_s']:>10,.0f} supervised tok/s ({res['supervised_tokens']:,} tokens in "
        f"{res['steps']} steps, loop {res['loop_s']:.1f}s, process {res['wall_s']:.0f}s{mfu}{mem}{loss}){split}"
        + (f" [attention {res['attention']}]" if res.get("attention") else "")
    )


if __name__ == "__main__":
    main()
