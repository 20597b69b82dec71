"""The docs site's reference pages, generated from the code: an MkDocs hook, and functions tests can use.

``mkdocs.yml`` names this file under ``hooks:``; ``on_files`` adds four pages that exist only in the build
(never on disk, never in git):

- ``reference/config.md``: every key of the run config (``distsft.config.schema.Config`` and its nested
  sections), its type, default, allowed range and docstring;
- ``reference/cluster.md``: the same for the cluster file (``distsft.config.cluster.ClusterConfig``);
- ``reference/cli.md``: every ``distsft`` subcommand and its options, from ``distsft.cli.build_parser``;
- ``reference/metrics.md``: the fields of a ``metrics.jsonl`` record.

A key's docstring is the string literal right after the field in its class body (an attribute docstring),
read with ``ast`` from the class's source: Python keeps no such string at run time.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import logging
import re
import sys
import textwrap
import types
import typing
from pathlib import Path
from typing import Any, Literal

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # the checkout's distsft, also when it is not installed
    sys.path.insert(0, str(ROOT))

log = logging.getLogger("mkdocs.hooks.gen_reference")


@dataclasses.dataclass(frozen=True)
class Key:
    """One config key as the reference shows it."""

    name: str
    """Dotted, as ``--set`` takes it: ``train.lr``; ``data.path[].weight`` for a field of a list entry."""
    type: str
    """Readable: ``int``, ``one of 'auto', 'sdpa'``, ``list of str``, ``section``."""
    default: str
    """As YAML would write it (``null``, ``true``, ``[0.9, 0.95]``); '' for a section or a required field."""
    doc: str
    """The field's docstring, Markdown (reST ````code```` made ```code```)."""
    allowed: str = ""
    """The range check's wording (``an integer >= 8``), where the field has one."""
    section: bool = False


# --- config keys -------------------------------------------------------------------------------------------


def field_docs(cls: type) -> dict[str, str]:
    """Each annotated field of ``cls`` -> the string literal right after it in the class body ('' if none)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, after in zip(body, [*body[1:], None], strict=True):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            is_doc = (
                isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)
            )
            docs[node.target.id] = inspect.cleandoc(after.value.value) if is_doc else ""
    return docs


def markdown(doc: str) -> str:
    """A docstring in Markdown: reST's double backticks become single ones."""
    return re.sub(r"``(.+?)``", r"`\1`", doc, flags=re.S)


def type_name(t: Any) -> str:
    """A type annotation in words: ``int``, ``one of 'a', 'b'``, ``str or null``, ``list of str``."""
    origin, args = typing.get_origin(t), typing.get_args(t)
    if t is type(None):
        return "null"
    if t is Any:
        return "any"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        parts = [type_name(a) for a in args if a is not type(None)]
        if type(None) in args:
            parts.append("null")
        return " or ".join(parts)
    if origin is list:
        inner = type_name(args[0]) if args else "any"
        return f"list of ({inner})" if " or " in inner else f"list of {inner}"
    if origin is tuple:
        return "[" + ", ".join(type_name(a) for a in args) + "]"
    if origin is dict:
        return f"mapping of {type_name(args[0])} to {type_name(args[1])}" if args else "mapping"
    if dataclasses.is_dataclass(t):
        return f"`{t.__name__}` mapping"
    return getattr(t, "__name__", str(t))


def yaml_value(v: Any) -> str:
    """A default as it would be written in YAML."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(yaml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {yaml_value(x)}" for k, x in v.items()) + "}"
    return str(v) if v != "" else '""'


def nested_dataclasses(t: Any) -> list[type]:
    """Dataclasses inside a container or union annotation (``DataSource`` in ``str | list[str | DataSource]``)."""
    found = []
    for a in typing.get_args(t):
        if dataclasses.is_dataclass(a):
            found.append(a)
        else:
            found += nested_dataclasses(a)
    return found


def config_keys(cls: type, prefix: str = "", _seen: set[type] | None = None) -> list[Key]:
    """Every key of ``cls``, depth first: a nested dataclass field is a section (listed, then its keys with
    ``section.`` in front); a dataclass inside a list (``data.path``'s entries) is listed once, as
    ``field[].key``."""
    seen = set() if _seen is None else _seen
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    out: list[Key] = []
    for f in dataclasses.fields(cls):
        name, t, doc = prefix + f.name, hints[f.name], markdown(docs.get(f.name, ""))
        if dataclasses.is_dataclass(t):
            out.append(Key(name, "section", "", doc, section=True))
            out += config_keys(t, name + ".", seen)
            continue
        if f.default is not dataclasses.MISSING:
            default = yaml_value(f.default)
        elif f.default_factory is not dataclasses.MISSING:
            default = yaml_value(f.default_factory())
        else:
            default = ""  # required
        check = f.metadata.get("check")
        out.append(Key(name, type_name(t), default, doc, check[1] if check else ""))
        for inner in nested_dataclasses(t):
            if inner not in seen:
                seen.add(inner)
                out += config_keys(inner, name + "[].", seen)
    return out


def undocumented(keys: list[Key]) -> list[str]:
    """The keys whose docstring is missing or blank."""
    return [k.name for k in keys if not k.doc.strip()]


def run_config_keys() -> list[Key]:
    from distsft.config.schema import Config

    return config_keys(Config)


def cluster_keys() -> list[Key]:
    from distsft.config.cluster import ClusterConfig

    return config_keys(ClusterConfig)


def keys_page(title: str, intro: str, keys: list[Key]) -> str:
    """One summary table (key, type, default), then a heading per key with its docstring."""
    lines = [f"# {title}", "", intro, ""]
    lines += ["| key | type | default |", "|---|---|---|"]
    for k in keys:
        default = f"`{k.default}`" if k.default else "" if k.section else "*required*"
        lines.append(f"| [`{k.name}`](#{k.name}) | {k.type} | {default} |")
    lines.append("")
    for k in keys:
        level = "##" if k.section or "." not in k.name else "###"
        lines += [f"{level} `{k.name}` {{#{k.name}}}", ""]
        facts = [f"**Type:** {k.type}"] if not k.section else []
        if k.default:
            facts.append(f"**Default:** `{k.default}`")
        elif not k.section:
            facts.append("**Required**")
        if k.allowed:
            facts.append(f"**Allowed:** {k.allowed}")
        if facts:
            lines += [" · ".join(facts), ""]
        lines += [k.doc or "*(no docstring)*", ""]
    return "\n".join(lines)


def config_page() -> str:
    intro = """Generated from `distsft/config/schema.py` (the field docstrings) by `docs/gen_reference.py`: edit the
docstrings there, not this page.

A run config is a YAML file given to `--config` (read with `yaml.safe_load`), plus repeatable
`--set section.key=value` overrides whose values are read as YAML (`--set train.lr=1e-5`,
`--set data.path=[a.jsonl,b.jsonl]`). Entries of `data.path` (and `data.eval_path`) may be mappings with the keys
listed below as `data.path[].key`. Everything is checked once, before any heavy work, and every problem is reported
at once: an unknown key names the file, line and nearest valid key; a wrong type or an out-of-range value names
the key and what is allowed; keys that are valid alone but not together (`model.quantization` without `lora.r`,
say) name the key and why. The resolved config is printed at start, with what it changes from the defaults, and
saved as `output_dir/config.yaml`.

Global batch = `train.micro_batch_size x train.grad_accum_steps x data-parallel groups`, where workers =
data-parallel groups x `train.sequence_parallel` (one place: `Config.batch_plan`); with
`train.global_batch_size` set, the accumulation is derived from the workers present instead. The DeepSpeed JSON
files (`ds_configs/`, or your own through `train.zero_stage`) keep DeepSpeed's own knobs (buckets, overlap,
offload); the values that must agree with this config (batch sizes, lr, betas, weight decay, clipping, precision)
are `"auto"` there and filled in by distsft."""
    return keys_page("Run config reference", intro, run_config_keys()) + "\n" + aliases_section()


def aliases_section() -> str:
    """The names of other trainers that a run config accepts (``distsft/config/aliases.py``), and those it
    refuses with what to write instead."""
    from distsft.config.aliases import ALIASES, INSTEAD

    lines = [
        "## Names from other trainers {#aliases}",
        "",
        "A run config also takes these names from Hugging Face `TrainingArguments`, TRL, axolotl, LLaMA-Factory",
        "and peft, at the top level or in a section where they are not one of ours; each is read as ours and said",
        "once on stderr (`config: FILE:LINE: learning_rate (TrainingArguments) read as train.lr`). Setting one",
        "together with our key is refused. Generated from `distsft/config/aliases.py`.",
        "",
        "| their name | from | read as | note |",
        "|---|---|---|---|",
    ]
    for name, a in ALIASES.items():
        lines.append(f"| `{name}` | {a.origin} | `{a.ours}` | {a.note} |")
    lines += ["", "These have no one-to-one equal here and are refused, with what to write instead:", ""]
    lines += ["| their name | instead |", "|---|---|"]
    lines += [f"| `{name}` | {why} |" for name, why in INSTEAD.items()]
    return "\n".join(lines) + "\n"


def cluster_page() -> str:
    intro = (
        "Generated from `distsft/config/cluster.py` (the field docstrings) by `docs/gen_reference.py`. A cluster "
        "file is given to `distsft launch --cluster` and `distsft doctor --cluster`; without one, distsft starts "
        "a Ray instance on this machine. It says where the workers run and with what, never what to train. "
        "Shipped examples: `cluster/*.yaml`; see [Clusters](../clusters/ray-start.md)."
    )
    return keys_page("Cluster file reference", intro, cluster_keys())


# --- CLI ---------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Option:
    """One argument of a subcommand."""

    flags: str
    value: str
    default: str
    help: str


def subcommands(parser: argparse.ArgumentParser) -> list[tuple[str, str, argparse.ArgumentParser]]:
    """(name, help, parser) of every subcommand, in the order they were added."""
    out = []
    for action in parser._subparsers._group_actions if parser._subparsers else []:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help or "" for a in action._choices_actions}
            out += [(name, helps.get(name, ""), p) for name, p in action.choices.items()]
    return out


def options(parser: argparse.ArgumentParser) -> list[Option]:
    """A parser's arguments, ``-h`` left out."""
    out = []
    for a in parser._actions:
        if isinstance(a, (argparse._HelpAction, argparse._SubParsersAction)):
            continue
        flags = ", ".join(a.option_strings) if a.option_strings else (a.metavar or a.dest)
        if a.nargs == 0:
            value = ""
        elif a.choices:
            value = " \\| ".join(f"`{c}`" for c in a.choices)
        else:
            value = f"`{a.metavar or a.dest.upper()}`"
            if a.type is int:
                value += " (integer)"
        if a.option_strings and a.required:
            value += " (required)"
        if not a.option_strings:
            value = "positional"
        default = a.default
        shown = "" if default in (None, False, [], argparse.SUPPRESS) else f"`{yaml_value(default)}`"
        out.append(Option(f"`{flags}`", value, shown, (a.help or "").replace("|", "\\|")))
    return out


def usage(parser: argparse.ArgumentParser) -> str:
    """The usage line at a fixed width, so the page does not depend on the terminal that built it."""
    parser.formatter_class = functools.partial(argparse.HelpFormatter, width=100)
    return parser.format_usage().strip()


def cli_page() -> str:
    from distsft.cli import build_parser

    parser = build_parser()
    lines = [
        "# Command-line reference",
        "",
        "Generated from the argparse parser in `distsft/cli.py` (`build_parser`) by `docs/gen_reference.py`. "
        "`distsft COMMAND -h` prints the same. A user error (a bad config key, a wrong type, a missing file, "
        "bad data rows) prints one line naming the file, line and key and exits with status 2.",
        "",
        "| command | what it does |",
        "|---|---|",
    ]
    subs = subcommands(parser)
    lines += [f"| [`distsft {name}`](#distsft-{name}) | {help} |" for name, help, _ in subs]
    lines += [
        "",
        "Global options: " + "; ".join(f"{o.flags}: {o.help or 'print the version'}" for o in options(parser)),
    ]
    for name, help, p in subs:
        lines += ["", f"## `distsft {name}` {{#distsft-{name}}}", "", help[:1].upper() + help[1:] + ".", ""]
        lines += ["```text", usage(p), "```", ""]
        lines += ["| argument | value | default | what it does |", "|---|---|---|---|"]
        lines += [f"| {o.flags} | {o.value} | {o.default} | {o.help} |" for o in options(p)]
    return "\n".join(lines) + "\n"


# --- metrics.jsonl -----------------------------------------------------------------------------------------

# Hand-written: metrics.jsonl records are plain dicts built in several places (training/loop.py,
# training/step.py, metrics/records.py), with no typed source to generate from. metric_keys_in_code() reads
# the keys those places write, so a field added there without a line here is found (tests/test_docs.py, and
# a warning that fails `mkdocs build --strict`).
METRIC_FIELDS: dict[str, str] = {
    "step": "Optimizer step, counted from 1 over the whole run (a resumed run goes on from its checkpoint's step).",
    "loss": "Token-weighted cross-entropy over every supervised token of the global batch (the sum of token "
    "losses divided by their all-reduced count); the router's auxiliary loss is never part of it.",
    "grad_norm": "Global gradient norm before clipping (`train.max_grad_norm`); `null` where the engine reports none.",
    "lr": "The learning rate this step's update used.",
    "aux_loss": "Mixture-of-experts models with a router loss coefficient above 0: the router's load-balancing "
    "loss, the mean over every micro-batch of the global batch, before the coefficient.",
    "eval_loss": "Token-weighted loss on the held-out data: on steps that are multiples of `train.eval_every`, "
    "and on the last step. Absent on other steps. The default set's (`data.eval_path` or the `data.eval_fraction` "
    "hold-out), or, when there is none, the first set of `data.evals`.",
    "eval_loss/<name>": "The same loss on the named set `data.evals.<name>`, at the same steps "
    "(TensorBoard, W&B, MLflow: `eval/loss/<name>`).",
    "samples_s": "Seconds the eval step spent generating its samples (`train.samples`); the replies themselves "
    "are in `samples.jsonl`, not here.",
    "tokens": "Supervised tokens (those with a label) of the global batch: the loss's denominator.",
    "input_tokens": "Every token of the global batch's rows, supervised or not (padding not counted).",
    "flops": "Model FLOPs of the step over all workers (6N per token plus attention over each token's own "
    "example; see [Monitoring](../guides/monitoring.md#mfu)).",
    "tflops_per_device": "`flops / (step_time_s x workers) / 1e12`: achieved model TFLOP/s per device.",
    "mfu": "`tflops_per_device` over the device's dense bf16 peak (`logging.peak_tflops`, or from the GPU name); "
    "`null` on a CPU or an unknown device.",
    "tokens_per_s": "Supervised tokens per second: `tokens / step_time_s`.",
    "input_tokens_per_s": "Input tokens per second: `input_tokens / step_time_s`.",
    "step_time_s": "The slowest worker's step time, seconds (data wait + forward/backward + optimizer).",
    "data_wait_s": "Rank 0's wait for the step's inputs, seconds.",
    "fwd_bwd_s": "Rank 0's forward and backward passes, seconds.",
    "optimizer_s": "Rank 0's optimizer step (clipping included), seconds.",
    "elapsed_s": "Seconds since this worker group's first step started (it restarts with a launch or a restart).",
    "peak_mem_mb": "Peak memory, MiB, maximum over workers: CUDA's peak allocated memory on a GPU, peak resident "
    "memory on a CPU.",
    "peak_mem_mb_by_rank": "More than one worker: `peak_mem_mb` of each rank, in rank order.",
    "fastest_worker_s": "More than one worker: the fastest worker's step time, seconds.",
    "slowest_worker_rank": "More than one worker: the rank whose step took `step_time_s`.",
}


def _written_keys(tree: ast.AST, names: set[str]) -> set[str]:
    """String keys written into dicts named ``names``: ``x = {"k": ...}`` and ``x["k"] = ...``/``x[i]["k"] = ...``."""
    found = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.Assign):
            continue
        for target in node.targets:
            if isinstance(target, ast.Name) and target.id in names and isinstance(node.value, ast.Dict):
                found |= {k.value for k in node.value.keys if isinstance(k, ast.Constant)}
            if isinstance(target, ast.Subscript) and isinstance(target.slice, ast.Constant):
                base = target.value
                while isinstance(base, ast.Subscript):
                    base = base.value
                if isinstance(base, ast.Name) and base.id in names:
                    found.add(target.slice.value)
    return found


def _function(tree: ast.AST, name: str) -> ast.FunctionDef:
    return next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == name)


def metric_keys_in_code() -> set[str]:
    """The fields of a merged ``metrics.jsonl`` record, read from the code that writes them: each rank's
    record (``training/loop.py``, ``training/step.py``, ``StepClock.split``), less what ``merge`` drops,
    plus what ``merge`` adds (``metrics/records.py``)."""

    def parse(rel: str) -> ast.Module:
        return ast.parse((ROOT / "distsft" / rel).read_text(encoding="utf-8"))

    loop, step, records = parse("training/loop.py"), parse("training/step.py"), parse("metrics/records.py")
    per_rank = _written_keys(loop, {"record", "records"}) | _written_keys(step, {"record"})
    split = _function(step, "split")
    per_rank |= {k.value for n in ast.walk(split) if isinstance(n, ast.Dict) for k in n.keys}
    merge = _function(records, "merge")
    drop = next(
        n.value for n in ast.walk(merge) if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", "") == "drop"
    )
    dropped = {e.value for e in drop.elts}
    families = {k for k, (rel, made) in KEY_FAMILIES.items() if made in (ROOT / "distsft" / rel).read_text()}
    return (per_rank - dropped) | _written_keys(merge, {"merged"}) | families


KEY_FAMILIES = {"eval_loss/<name>": ("training/evaluate.py", 'sets[f"{DEFAULT}/{name}"]')}
"""Fields whose names are made at run time (one per named eval set), found by the code that makes them."""


def metrics_page() -> str:
    from distsft.metrics.display import SCALARS

    in_code = metric_keys_in_code()
    lines = [
        "# metrics.jsonl reference",
        "",
        "`output_dir/metrics.jsonl` holds one JSON object per optimizer step: every rank's record of the step, "
        "merged into one line (`distsft/metrics/records.py`). `distsft report`, the console, TensorBoard, "
        "W&B/MLflow, `summary.json` and `loss.png` are all drawn from it. A resumed run keeps the records of the "
        "steps it continues from, so the file covers the whole run, every step once.",
        "",
        "The field list is checked against the code that writes the records; the **descriptions are "
        "hand-written** (`METRIC_FIELDS` in `docs/gen_reference.py`), since the records are plain dicts with "
        "no typed source. The tag column is generated from `SCALARS` in `distsft/metrics/display.py`: the "
        "name under which TensorBoard, W&B and MLflow get the field.",
        "",
        "| field | TensorBoard / W&B / MLflow tag | meaning |",
        "|---|---|---|",
    ]
    for key in [*METRIC_FIELDS, *sorted(in_code - set(METRIC_FIELDS))]:
        tag = f"`{SCALARS[key]}`" if key in SCALARS else ""
        lines.append(f"| `{key}` | {tag} | {METRIC_FIELDS.get(key, '*(undocumented)*')} |")
    lines += [
        "",
        "`workers.json` beside it says where each rank runs (node, device, pid); `summary.json` holds the "
        "end-of-run summary ([Monitoring](../guides/monitoring.md)); `samples.jsonl` the replies of each eval "
        "step (`step`, `eval`: the set its prompt came from, `prompt`, `reply`).",
        "",
    ]
    return "\n".join(lines)


def recipes_page() -> str:
    """The shipped recipes, from their headers (``distsft/recipes``): what ``distsft recipes`` lists."""
    from distsft import recipes

    lines = [
        "# Recipes",
        "",
        "Run configs shipped in the package (`distsft/recipes/configs`, `configs/` in a checkout). `distsft recipes`",
        "lists them; `distsft recipes NAME --out DIR` copies one, with the cluster file and architecture file its",
        "command needs, so the command runs in DIR as written. The memory per GPU is what `--dry-run` prints",
        "(distsft's estimate, checked for every recipe in CI by `tests/test_recipes.py`), not a GPU measurement.",
        "Generated from the recipes' headers by `docs/gen_reference.py`.",
        "",
        "| recipe | what | model | cluster file | dry run, per GPU |",
        "|---|---|---|---|---|",
    ]
    for r in recipes.recipes():
        lines.append(f"| `{r.name}` | {r.description} | `{r.model}` | `{r.cluster or '-'}` | {r.memory or '-'} |")
    lines += ["", "Launch commands:", "", "```bash"]
    lines += [f"{r.command:<90} # {r.name}" for r in recipes.recipes()]
    return "\n".join([*lines, "```", ""])


# --- the MkDocs hook ---------------------------------------------------------------------------------------

PAGES = {
    "reference/recipes.md": recipes_page,
    "reference/config.md": config_page,
    "reference/cluster.md": cluster_page,
    "reference/cli.md": cli_page,
    "reference/metrics.md": metrics_page,
}


def on_files(files: Any, config: Any) -> Any:
    """Add the generated pages to the build (in memory: nothing is written into ``docs/``)."""
    from mkdocs.structure.files import File

    missing = undocumented(run_config_keys()) + undocumented(cluster_keys())
    if missing:
        log.warning("config keys without a docstring: %s", ", ".join(missing))
    unlisted = metric_keys_in_code() - set(METRIC_FIELDS)
    stale = set(METRIC_FIELDS) - metric_keys_in_code()
    if unlisted or stale:
        log.warning(
            "metrics.jsonl fields: written but not described in METRIC_FIELDS: %s; described but not written: %s",
            sorted(unlisted),
            sorted(stale),
        )
    for uri, build in PAGES.items():
        files.append(File.generated(config, uri, content=build()))
    return files
