"""The ``distsft`` command. Thin: parse arguments, call the library, print; user errors become one line."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from distsft import __version__
from distsft.errors import DistsftError


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="training config YAML (default: the bundled demo)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set train.lr=1e-5 (repeatable)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="distsft", description="Distributed supervised fine-tuning.")
    parser.add_argument("--version", action="version", version=f"distsft {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("launch", help="train a model (the bundled demo when no --config is given)")
    _add_config_args(p)
    p.add_argument("--cluster", help="cluster file (Ray address, workers, resources); default: a local Ray instance")
    p.add_argument("--local", action="store_true", help="run in this process, world size 1, no Ray (debug mode)")
    p.add_argument("--dry-run", action="store_true", help="print the resolved plan and exit; needs no cluster")
    p.add_argument("--verbose", action="store_true", help="show every library's and worker's output live")

    p = sub.add_parser("doctor", help="check a cluster before a run: Ray, nodes, versions, storage, network, disk")
    _add_config_args(p)
    p.add_argument("--cluster", help="cluster file to check (default: a local Ray instance)")

    p = sub.add_parser("prepare", help="prepare (or reuse the cached) training data and print its statistics")
    _add_config_args(p)
    p.add_argument(
        "--show",
        type=int,
        default=0,
        metavar="N",
        help="print the first N rows turn by turn (role, tool calls, reasoning, what is learnt) and N packed rows",
    )
    p.add_argument(
        "--dump", metavar="FILE", help="write every packed row as JSON lines (input_ids, labels, position_ids)"
    )

    p = sub.add_parser(
        "eval",
        help="token-weighted loss of a model directory on data.eval_path (else data.path); with --tasks, "
        "lm-evaluation-harness benchmarks beside a base model",
    )
    _add_config_args(p)
    p.add_argument("--model", required=True, help="a Hugging Face model directory, e.g. runs/demo/final")
    p.add_argument("--eval", metavar="NAME", help="the named eval set data.evals.NAME instead")
    g = p.add_argument_group("benchmarks (lm-evaluation-harness, offline; pip install 'distsft[eval]')")
    g.add_argument(
        "--tasks",
        metavar="T1,T2",
        help="run these lm-eval tasks (names or task YAML paths) instead of the loss; local task files only: "
        "the shipped examples (distsft_support_mc, distsft_support_gen) and --include-path",
    )
    g.add_argument(
        "--include-path",
        action="append",
        default=[],
        metavar="DIR",
        help="a directory of lm-eval task YAMLs (repeatable)",
    )
    g.add_argument(
        "--base",
        metavar="BASE_DIR",
        help="the model to compare with, side by side (default: a LoRA adapter's base; else none)",
    )
    g.add_argument("--limit", type=int, metavar="N", help="only the first N examples of each task")
    g.add_argument(
        "--chat-template",
        action="store_true",
        help="prompts as a user turn in each model's chat template (how an SFT model was trained to answer)",
    )
    g.add_argument("--batch-size", type=int, default=8, help="examples per forward pass (default: 8)")
    g.add_argument("--out", metavar="FILE", help="also write the table's rows and lm-eval's results as JSON")
    g.add_argument("--trust-remote-code", action="store_true", help="run code shipped with the model directories")

    p = sub.add_parser("export", help="consolidate a checkpoint's ZeRO shards into a Hugging Face model directory")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run's output_dir, its checkpoints/ dir, or one step-N dir")
    p.add_argument("--step", type=int, help="the checkpoint of this step (default: the latest complete one)")
    p.add_argument(
        "--best", action="store_true", help="the checkpoint with the lowest loss on checkpoint.best_by's eval set"
    )
    p.add_argument("--out", help="output directory (default: RUN_DIR/export-step-N)")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    p.add_argument("--max-shard-size", default="5GB", help="split the safetensors weights above this size")
    p.add_argument("--merge", action="store_true", help="LoRA runs: write base + adapters as one plain model")
    p.add_argument(
        "--no-authenticate",
        action="store_true",
        help="export a checkpoint whose manifest your checkpoint key did not sign (someone else's run)",
    )

    p = sub.add_parser(
        "verify",
        help="prove a setup trains what it should (a few steps against variants that must agree, the masks), "
        "or with --export that an export holds what training held",
    )
    _add_config_args(p)
    p.add_argument("--cluster", help="cluster file, as for launch (default: a local Ray instance)")
    p.add_argument("--local", action="store_true", help="run the checks in this process, one worker, no Ray")
    p.add_argument("--steps", type=int, default=3, help="optimizer steps of each run (default: 3)")
    p.add_argument(
        "--check",
        default="masks,packing,split,sequence_parallel",
        help="which checks, comma-separated (default: all of masks,packing,split,sequence_parallel)",
    )
    p.add_argument("--rows", type=int, default=1000, help="rows whose masks are attested (default: the first 1000)")
    p.add_argument("--out", help="where the runs and verify.json go (default: OUTPUT_DIR/verify)")
    p.add_argument("--export", metavar="DIR", help="instead: prove this exported model directory")
    p.add_argument("--checkpoint", help="with --export: compare with this checkpoint (default: the export's own)")
    p.add_argument("--no-authenticate", action="store_true", help="the checkpoint's manifest need not be signed")
    p.add_argument("--trust-remote-code", action="store_true", help="run the model's own code (it ships some)")

    p = sub.add_parser("report", help="summarise a run from its metrics.jsonl and redraw its loss curve")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run's output_dir (also while it is still running)")
    p.add_argument("--png", help="where to draw the loss curve (default: RUN_DIR/loss.png)")

    p = sub.add_parser("recipes", help="list the shipped recipes, or copy one (with its cluster file) to start from")
    p.add_argument("name", nargs="?", metavar="NAME", help="the recipe to copy (as `distsft recipes` lists it)")
    p.add_argument("--out", default=".", help="where to copy it (default: here); existing files are never overwritten")

    p = sub.add_parser("generate", help="chat with a trained model directory")
    p.add_argument("--model", required=True, help="a Hugging Face model directory, e.g. runs/demo/final")
    p.add_argument("prompt", help="the user message")
    p.add_argument("--system", help="an optional system prompt")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--trust-remote-code", action="store_true", help="run code shipped with the model directory")
    return parser


def cmd_launch(args: argparse.Namespace) -> int:
    from distsft.config import load_config
    from distsft.config.cluster import load_cluster, resolve_local_workers

    cfg = load_config(args.config, args.overrides)
    if args.local and args.cluster:
        raise DistsftError("--local runs without Ray, so it takes no --cluster file")
    if args.local:
        import dataclasses

        cluster = resolve_local_workers(dataclasses.replace(load_cluster(None), workers_per_node=1))
    else:
        cluster = load_cluster(args.cluster)
    if args.dry_run:
        from distsft.launcher.dry_run import dry_run

        print("\n".join(dry_run(cfg, cluster, local=args.local)))
        return 0
    from distsft.launcher.run import launch_local, launch_ray

    if args.local:  # both print the run's summary
        launch_local(cfg, verbose=args.verbose)
    else:
        launch_ray(cfg, cluster, verbose=args.verbose)
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    """Exit 0 only when every check passes; each check's line is printed as soon as it is known."""
    import time

    from distsft.config import load_config
    from distsft.config.cluster import load_cluster
    from distsft.launcher.doctor import examine, report

    t0 = time.perf_counter()
    cfg = load_config(args.config, args.overrides)
    cluster = load_cluster(args.cluster)
    found = examine(cluster, cfg, say=lambda f: print(f.line(), flush=True))
    print(report(found, time.perf_counter() - t0))
    return 0 if all(f.ok for f in found) else 1


def cmd_prepare(args: argparse.Namespace) -> int:
    import time

    from distsft.config import load_config
    from distsft.data.inspect import describe_source, dump_rows, first_rows, show_conversations, show_rows
    from distsft.launcher.prepare import choose_data_runner, prepare_data
    from distsft.model.loading import load_tokenizer

    cfg = load_config(args.config, args.overrides)
    t0 = time.perf_counter()
    data = prepare_data(cfg, choose_data_runner(cfg, None))
    stats = data.stats.as_dict()
    stats["cache"] = "hit" if data.cache_hit else "built"
    stats["seconds"] = round(time.perf_counter() - t0, 3)
    sources = stats.pop("sources", [])
    width = max(map(len, stats))
    for k, v in stats.items():
        print(f"{k:<{width}}  {v:.1%}" if k == "packing_efficiency" else f"{k:<{width}}  {v}")
    for src in sources:
        print(describe_source(src))
    if args.show:
        tokenizer, color = load_tokenizer(cfg.model), sys.stdout.isatty()
        show_conversations(first_rows(cfg.data, args.show), tokenizer, cfg.data, sys.stdout, color)
        show_rows(data.train, args.show, tokenizer, sys.stdout, color=color)
    if args.dump:
        print(f"wrote {dump_rows(data.train, args.dump)} packed rows to {args.dump}")
    return 0


HARNESS_ONLY = ("include_path", "base", "limit", "chat_template", "out", "trust_remote_code")


def cmd_eval(args: argparse.Namespace) -> int:
    import json

    from distsft.config import load_config
    from distsft.training.evaluate import evaluate_dir

    if args.tasks:
        return cmd_benchmark(args)
    given = [f"--{k.replace('_', '-')}" for k in HARNESS_ONLY if getattr(args, k) not in (None, False, [])]
    if given:
        raise DistsftError(f"{', '.join(given)} go with --tasks (the harness); without it eval measures the loss")
    cfg = load_config(args.config, args.overrides)
    print(json.dumps(evaluate_dir(cfg, args.model, args.eval)))
    return 0


def cmd_benchmark(args: argparse.Namespace) -> int:
    """``eval --tasks``: the table on stdout (and the report as JSON with --out)."""
    import json
    from pathlib import Path

    from distsft.harness.tasks import require_lm_eval

    if args.config or args.overrides:
        raise DistsftError("--config/--set choose the loss evaluation's data; --tasks reads its task files")
    for flag, value in (("--limit", args.limit), ("--batch-size", args.batch_size)):
        if value is not None and value < 1:
            raise DistsftError(f"{flag} {value}: must be at least 1")
    require_lm_eval()
    from distsft.harness.compare import table
    from distsft.harness.runner import HarnessOptions, benchmark
    from distsft.host import write_atomic
    from distsft.model.generate import check_model_dir
    from distsft.model.lora import adapter_base, is_adapter_dir

    check_model_dir(args.model)  # both models before either runs: a bad --base fails now, not after --model's tasks
    base = args.base
    if base is not None:
        check_model_dir(base, "--base")
    if base is None and is_adapter_dir(args.model):
        base = adapter_base(args.model)
        print(f"base: {base} (the adapter's)", file=sys.stderr)
    options = HarnessOptions(args.limit, args.chat_template, args.batch_size, args.trust_remote_code)
    names = [t.strip() for t in args.tasks.split(",") if t.strip()]
    rows, report = benchmark(args.model, base, names, args.include_path, options)
    print(table(rows))
    if args.out:
        write_atomic(Path(args.out), json.dumps(report, indent=2, default=str) + "\n")
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from pathlib import Path

    from distsft import checkpoint
    from distsft.checkpoint import auth, storage
    from distsft.checkpoint.export import check_out, export

    if args.no_authenticate:
        auth.turn_off()
    if args.best and args.step is not None:
        raise DistsftError("--best and --step each choose the checkpoint: give one")
    ckpt = checkpoint.resolve(args.run_dir)
    if args.best:
        best = checkpoint.best_checkpoint(storage.parent(ckpt))
        if best is None:
            raise DistsftError(
                f"--best: no best checkpoint recorded under {storage.parent(ckpt)} (the run needs "
                "checkpoint.best_by and held-out data)"
            )
        print(f"best: step {best.step}, {best.metric} {best.value:.4f}")
        ckpt = best.location
    if args.step is not None:
        ckpt = checkpoint.step_dir(storage.parent(ckpt), args.step)
        if checkpoint.read_manifest(ckpt) is None:
            raise DistsftError(f"--step {args.step}: no complete checkpoint {ckpt}")
    step = (checkpoint.read_manifest(ckpt) or {}).get("step")
    suffix = "-merged" if args.merge else ""
    if args.out:
        out = Path(args.out)
    elif storage.is_remote(args.run_dir):  # a bucket's run is exported here, into the working directory
        out = Path(f"{storage.name(args.run_dir)}-export-step-{step}{suffix}")
    else:
        out = Path(args.run_dir) / f"export-step-{step}{suffix}"
    check_out(out, ckpt, [] if storage.is_remote(args.run_dir) else [Path(args.run_dir)])
    export(ckpt, out, dtype=args.dtype, max_shard_size=args.max_shard_size, merge=args.merge)
    print(f"exported step {step} from {ckpt} to {out} ({args.dtype}{', merged' if args.merge else ''})")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from distsft.metrics.jsonl import METRICS_FILE, read_metrics
    from distsft.metrics.samples import format_samples, latest_samples
    from distsft.metrics.summary import add_run_figures, format_summary

    run = Path(args.run_dir)
    records = read_metrics(run / METRICS_FILE)
    if not records:
        raise DistsftError(f"{run / METRICS_FILE}: no metrics (not a run directory, or no step finished yet)")
    saved = run / "summary.json"
    finished = saved.is_file()  # written at the end of a launch; a running run has none yet
    summary = json.loads(saved.read_text()) if finished else {"wall_s": records[-1].get("elapsed_s", 0.0)}
    png = Path(args.png) if args.png else None
    add_run_figures(summary, records, run, int(summary.get("start_step") or 0), png=png)
    print(format_summary(summary, heading="done" if finished else f"so far (step {records[-1]['step']})"))
    for line in format_samples(latest_samples(run), width=200):
        print(line)
    return 0


def cmd_recipes(args: argparse.Namespace) -> int:
    """Without NAME, the listing; with NAME, the recipe and the files its command needs, copied under --out
    in the layout the command expects, so it runs there as written."""
    from pathlib import Path

    from distsft import recipes

    if args.name is None:
        print("\n".join(recipes.table(recipes.recipes())))
        return 0
    recipe = recipes.find(args.name)
    out = Path(args.out)
    for path, written in recipes.copy(recipe, out):
        print(f"wrote {path}" if written else f"kept  {path} (already there, the same)")
    where = "" if out.resolve() == Path.cwd().resolve() else f"in {out}: "
    print(f"{where}{recipe.command} --dry-run   (check the plan; then without --dry-run to train)")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from distsft.model.generate import generate

    text = generate(
        args.model,
        args.prompt,
        system=args.system,
        max_new_tokens=args.max_new_tokens,
        trust_remote_code=args.trust_remote_code,
    )
    print(text)
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    """A setup against the variants that must agree with it, or (``--export``) an export loaded as a server
    would, in this fresh process, against its checkpoint: exit 1 when a check fails (each check one line)."""
    from pathlib import Path

    from distsft.checkpoint import auth, proof

    if args.no_authenticate:
        auth.turn_off()
    if args.export:
        ok = proof.report(proof.prove(Path(args.export), args.checkpoint, args.trust_remote_code))
        return 0 if ok else 1
    from distsft.config import load_config
    from distsft.config.cluster import load_cluster
    from distsft.launcher.verify import verify_setup

    cfg = load_config(args.config, args.overrides)
    if args.local and args.cluster:
        raise DistsftError("--local runs without Ray, so it takes no --cluster file")
    cluster = None if args.local else load_cluster(args.cluster)
    out = Path(args.out) if args.out else Path(cfg.output_dir) / "verify"
    checks = tuple(c.strip() for c in args.check.split(",") if c.strip())
    outcomes = verify_setup(cfg, cluster, out, args.steps, checks, args.rows)
    count = {v: sum(o.verdict == v for o in outcomes) for v in ("pass", "FAIL", "skipped")}
    print(f"verify: {count['pass']} passed, {count['FAIL']} failed, {count['skipped']} skipped; {out / 'verify.json'}")
    return 1 if count["FAIL"] else 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler = {
        "launch": cmd_launch,
        "doctor": cmd_doctor,
        "prepare": cmd_prepare,
        "eval": cmd_eval,
        "export": cmd_export,
        "report": cmd_report,
        "recipes": cmd_recipes,
        "verify": cmd_verify,
        "generate": cmd_generate,
    }[args.command]
    try:
        return handler(args)
    except DistsftError as e:
        print(f"distsft {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        sys.stdout.flush()


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
