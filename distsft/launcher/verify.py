"""``distsft verify --config C [--cluster K]``: a few steps of the user's own run, on the user's own cluster,
against variants that must give the same numbers, and an attestation of the masks.

distsft's CI proves packed = unpacked, N workers = one process and SP = no SP on tiny models; a user's own
model class, attention kernel, template, data and cluster can still break any of them silently. Each
invariant here is two real launches (``launcher/run.py``) of the same examples that differ only in how
the work is split:

- ``packing``: the examples of the first packed rows, packed, against the same examples one per row; one
  optimizer step each, the whole subset in it (the order of rows within a step does not matter).
- ``split``: the run as configured against another split of the same global batch: one worker (when the
  run has several and its model states fit one device, ``fits_one_device``), else other micro-batch x
  accumulation sizes on the same workers.
- ``sequence_parallel``: where it is on, against the same workers with it off.

Figures compared per step: the loss, the grad norm, the supervised tokens; then the final weights (max
relative L2 distance). In fp32 the variants do the same math in another summation order: the tolerances
are that order's (``FP32``), a thousand times tighter than any error these checks are for. In bf16 (or
fp16) the tolerance is measured, not guessed: the run is repeated in fp32, and a variant may differ
from the run by at most twice as much as the run differs from its fp32 self (both are rounding of the
same math; by the triangle inequality a correct variant stays within twice the floor) plus ``FP32``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distsft.config import Config
from distsft.config.cluster import ClusterConfig
from distsft.data.prepare import PreparedData
from distsft.errors import DistsftError
from distsft.host import write_atomic

CHECKS = ("masks", "packing", "split", "sequence_parallel")
FP32 = {"loss": 1e-5, "grad_norm": 1e-4, "tokens": 0.0, "weights": 1e-5}
"""Relative tolerances in fp32, far above what the variants' other summation orders give (measured on the
demo: loss <= 1e-7, grad norm <= 1.1e-7, weights <= 1.3e-7) and far below a broken setup's (a leak
between packed examples after one step: loss 1.1e-3, grad norm 1.9e-2, weights 3.1e-4)."""
MARK = ".distsft-verify"
"""Marks a directory ``verify`` made, so that a rerun may clear it (and nothing else)."""


@dataclass
class Outcome:
    name: str
    verdict: str
    """``pass``, ``FAIL`` or ``skipped``."""
    line: str
    figures: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        return f"verify {self.name}: {self.verdict}: {self.line}"


@dataclass
class Trace:
    """What a run leaves to compare."""

    name: str
    loss: list[float]
    grad_norm: list[float]
    tokens: list[float]
    weights: dict[str, Any]
    dtype: str
    again: dict[str, Any] = field(default_factory=dict, repr=False)
    """How to launch it again (``_launch``'s arguments): its fp32 twin is the same with ``model.dtype``."""


def verify_setup(
    cfg: Config,
    cluster: ClusterConfig | None,
    out: Path,
    steps: int = 3,
    checks: tuple[str, ...] = CHECKS,
    rows: int = 1000,
    say: Any = print,
) -> list[Outcome]:
    """Run every asked check; each outcome is said as soon as it is known and all are written to
    ``out/verify.json``."""
    unknown = [c for c in checks if c not in CHECKS]
    if unknown:
        raise DistsftError(f"--check {','.join(unknown)}: unknown; the checks are {', '.join(CHECKS)}")
    _claim(out)
    outcomes: list[Outcome] = []

    def said(o: Outcome) -> None:
        outcomes.append(o)
        say(str(o))
        write_atomic(out / "verify.json", json.dumps([dataclasses.asdict(x) for x in outcomes], indent=2) + "\n")

    if "masks" in checks:
        said(check_masks(cfg, rows))
    runs = Runs(cfg, cluster, out, steps)
    with contextlib.ExitStack() as stack:
        if cluster is not None and any(c in checks for c in CHECKS[1:]):
            from distsft.launcher.ray_session import RaySession

            # one Ray for every launch (each would otherwise start and stop its own: most of a short run's time)
            stack.enter_context(RaySession(cluster, out, verbose=False)).ensure()
        if "packing" in checks:
            said(runs.packing())
        if "split" in checks:
            said(runs.split())
        if "sequence_parallel" in checks:
            said(runs.sequence_parallel())
    return outcomes


def check_masks(cfg: Config, rows: int) -> Outcome:
    from distsft.data.attest import attest
    from distsft.data.inspect import first_rows
    from distsft.model.loading import load_tokenizer

    if cfg.data.template == "none" and cfg.data.response_marker is None:
        return Outcome("masks", "skipped", "raw text (data.template: none): every token is learnt by design")
    report = attest(first_rows(cfg.data, rows), load_tokenizer(cfg.model), cfg.data)
    total = sum(report.supervised.values())
    roles = ", ".join(f"{r} {n} ({n / max(total, 1):.1%})" for r, n in report.supervised.most_common()) or "none"
    figures = report.as_dict()
    if report.findings:
        more = f" (and {len(report.findings) - 1} more rows)" if len(report.findings) > 1 else ""
        return Outcome("masks", "FAIL", f"{report.findings[0]}{more}; supervised tokens by role: {roles}", figures)
    if not total:
        return Outcome("masks", "FAIL", f"the first {report.rows} rows learn no token at all", figures)
    return Outcome("masks", "pass", f"{report.rows} rows; supervised tokens by role: {roles}", figures)


class Runs:
    """The launches of the run-based checks, each in its own directory under ``out``; the run as configured
    (and its fp32 twin in bf16) is launched once and compared with every variant."""

    def __init__(self, cfg: Config, cluster: ClusterConfig | None, out: Path, steps: int) -> None:
        self.cfg, self.cluster, self.out, self.steps = cfg, cluster, out, steps
        self.workers = cluster.num_workers if cluster else 1
        self._base: Trace | None = None
        self._fp32: dict[str, Trace] = {}

    # --- the checks -------------------------------------------------------------------------------
    def packing(self) -> Outcome:
        if not self.cfg.data.packing:
            return Outcome("packing", "skipped", "data.packing is off: every row is one example already")
        from distsft.launcher.prepare import prepare_data

        data = prepare_data(self.cfg)
        plan = self.cfg.batch_plan(self.workers)
        dp = plan.data_parallel
        packed, single = _subset(data, plan.micro_batch_size * plan.grad_accum_steps * dp, dp)
        if packed is None:
            return Outcome("packing", "skipped", f"no packed rows whose examples divide over {dp} workers")
        one = {"train.max_steps": 1, "train.micro_batch_size": 1, "train.grad_accum_steps": 1}
        a = self._launch("packed", {**one, "train.global_batch_size": len(packed.train)}, rows=packed)
        b = self._launch(
            "unpacked", {**one, "train.global_batch_size": len(single.train), "data.packing": False}, rows=single
        )
        what = f"{len(single.train)} examples in {len(packed.train)} packed rows vs one per row, one step"
        return self._compare("packing", a, b, what)

    def split(self) -> Outcome:
        plan = self.cfg.batch_plan(self.workers)
        rows = plan.micro_batch_size * plan.grad_accum_steps * plan.data_parallel
        if self.workers > 1 and fits_one_device(self.cfg, self.cluster):
            over = {"train.global_batch_size": rows, "train.sequence_parallel": 1}
            what = f"{self.workers} workers vs one worker, {rows} rows a step"
            return self._compare("split", self.base(), self._launch("one-worker", over, local=True), what)
        per_group = rows // plan.data_parallel  # rows each data-parallel group takes a step
        if plan.micro_batch_size > 1:
            micro = 1
        elif per_group > 1:
            micro = min(d for d in range(2, per_group + 1) if per_group % d == 0)
        else:
            return Outcome("split", "skipped", "one row a step per worker has no other split")
        over = {"train.global_batch_size": rows, "train.micro_batch_size": micro}
        what = (
            f"micro-batch {plan.micro_batch_size} x accumulation {plan.grad_accum_steps} vs "
            f"{micro} x {per_group // micro}" + (f" on {self.workers} workers" if self.workers > 1 else "")
        )
        return self._compare("split", self.base(), self._launch("accumulation", over), what)

    def sequence_parallel(self) -> Outcome:
        sp = self.cfg.train.sequence_parallel
        if sp == 1:
            return Outcome("sequence_parallel", "skipped", "train.sequence_parallel is 1 (off)")
        plan = self.cfg.batch_plan(self.workers)
        rows = plan.micro_batch_size * plan.grad_accum_steps * plan.data_parallel
        if rows % self.workers:
            return Outcome(
                "sequence_parallel", "skipped", f"{rows} rows a step do not divide over {self.workers} workers"
            )
        over = {"train.sequence_parallel": 1, "train.micro_batch_size": 1, "train.global_batch_size": rows}
        variant = self._launch("no-sp", over)
        return self._compare("sequence_parallel", self.base(), variant, f"SP {sp} vs off on {self.workers} workers")

    # --- runs -------------------------------------------------------------------------------------
    def base(self) -> Trace:
        if self._base is None:
            self._base = self._launch("as-configured", {})
        return self._base

    def fp32_twin(self, run: Trace) -> Trace | None:
        """``run`` again in fp32 when it trained in less: what rounding alone moves its figures by."""
        if run.dtype == "fp32":
            return None
        if run.name not in self._fp32:
            again = dict(run.again)
            again["over"] = {**again["over"], "model.dtype": "float32"}
            self._fp32[run.name] = self._launch(f"{run.name}-fp32", **again)
        return self._fp32[run.name]

    def _launch(self, name: str, over: dict[str, Any], rows: PreparedData | None = None, local: bool = False) -> Trace:
        from distsft.launcher.run import launch_local, launch_ray

        # under a cluster's storage_path checkpoints go to storage_path/<output_dir's name>: one per run and variant
        where = self.out / f"{Path(self.cfg.output_dir).name}-{name}"
        _clear(where)
        cfg = with_overrides(
            self.cfg,
            {
                "output_dir": str(where),
                "train.max_steps": self.steps,
                "train.eval_every": 0,
                "checkpoint.every_steps": 0,
                "checkpoint.final": True,
                "checkpoint.resume": "never",
                "checkpoint.verify_export": False,
                "checkpoint.best_by": None,  # no checkpoint beyond the last, no named evals, no samples: the
                "data.evals": {},  # compared figures do not need them (held-out sets never change training)
                "train.samples": dataclasses.replace(self.cfg.train.samples, count=0),
                "logging.tensorboard": False,
                "logging.plot": False,
                "logging.wandb_project": None,
                "logging.mlflow_experiment": None,
                "logging.profile_steps": None,
                "logging.progress": "none",
                **over,
            },
        )
        where.mkdir(parents=True, exist_ok=True)
        (where / MARK).touch()
        # what a launch says is in its own logs/driver.log; verify says one line per check
        with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):
            if self.cluster is None or local:
                summary = launch_local(cfg, quiet=True, rows=rows)
            else:
                summary = launch_ray(cfg, self.cluster, quiet=True, rows=rows)
        again = {"over": over, "rows": rows, "local": local}
        return dataclasses.replace(_trace(name, where, summary), again=again)

    def _compare(self, check: str, a: Trace, b: Trace, what: str) -> Outcome:
        floor = self.fp32_twin(a)
        figures: dict[str, Any] = {"runs": [a.name, b.name], "what": what, "dtype": a.dtype}
        worst: list[str] = []
        for key in ("tokens", "loss", "grad_norm"):
            xs, ys = getattr(a, key), getattr(b, key)
            diffs = [abs(x - y) / max(abs(x), 1e-12) for x, y in zip(xs, ys, strict=False)]
            tol = [FP32[key]] * len(diffs)
            if floor is not None:
                fs = getattr(floor, key)
                tol = [FP32[key] + 2 * abs(x - f) / max(abs(x), 1e-12) for x, f in zip(xs, fs, strict=False)]
            figures[key] = {"a": xs, "b": ys, "rel_diff": diffs, "tolerance": tol}
            if len(xs) != len(ys):
                worst.append(f"{key}: {len(xs)} steps vs {len(ys)}")
            bad = [i for i, (d, t) in enumerate(zip(diffs, tol, strict=True)) if d > t]
            if bad:
                i = bad[0]
                worst.append(f"step {i + 1} {key} {xs[i]:.6g} vs {ys[i]:.6g} (rel {diffs[i]:.1e} > {tol[i]:.1e})")
        dw, where = _weight_distance(a.weights, b.weights)
        wtol = FP32["weights"]
        if floor is not None:
            wtol += 2 * _weight_distance(a.weights, floor.weights)[0]
        figures["weights"] = {"rel_l2": dw, "most_in": where, "tolerance": wtol}
        if dw > wtol:
            worst.append(f"final weights differ by {dw:.1e} (relative L2; most in {where}) > {wtol:.1e}")
        steps = ", ".join(f"{x:.5f}/{y:.5f}" for x, y in zip(a.loss, b.loss, strict=False))
        summary = f"{what}; loss per step {steps}; max rel diff loss {max(figures['loss']['rel_diff'], default=0):.1e}"
        summary += f", grad norm {max(figures['grad_norm']['rel_diff'], default=0):.1e}; weights {dw:.1e}"
        if floor is not None:
            summary += " (bf16 tolerance: twice the run's own distance from fp32)"
        if worst:
            return Outcome(check, "FAIL", f"{worst[0]}; {summary}", figures)
        return Outcome(check, "pass", summary, figures)


ONE_DEVICE_BYTES = 0.6 * 80 * 2**30
"""What a one-worker variant may need for its model states: 60 % of an 80 GB GPU (activations come on top)."""


def fits_one_device(cfg: Config, cluster: ClusterConfig | None) -> bool:
    """Whether the run's model states fit one device, so that one worker can redo the cluster's step: always
    on CPU workers; on GPUs by the dry run's sizes (16 bytes a parameter for a full fine-tune: bf16 weights
    and gradients, fp32 master weights and Adam's two moments, none of it partitioned on one worker)."""
    if cluster is not None and not cluster.use_gpu:
        return True
    from distsft.launcher.dry_run import adapter_memory, model_sizes

    sizes = model_sizes(cfg)
    if sizes is None:
        return False
    if cfg.lora.r > 0:
        return sum(adapter_memory(cfg, 0, sizes, 1, 1)) <= ONE_DEVICE_BYTES
    return 16 * sizes.total <= ONE_DEVICE_BYTES


def with_overrides(cfg: Config, values: dict[str, Any]) -> Config:
    """``cfg`` with dotted keys replaced (``train.max_steps``), each section rebuilt with its own checks."""
    sections: dict[str, dict[str, Any]] = {}
    top: dict[str, Any] = {}
    for key, value in values.items():
        section, _, name = key.partition(".")
        if name:
            sections.setdefault(section, {})[name] = value
        else:
            top[section] = value
    for section, changes in sections.items():
        top[section] = dataclasses.replace(getattr(cfg, section), **changes)
    return dataclasses.replace(cfg, **top)


def _subset(data: PreparedData, first: int, dp: int) -> tuple[PreparedData | None, PreparedData | None]:
    """The first packed rows (``first`` of them, a step's worth, or a few more) whose count and whose
    examples' count divide over ``dp`` workers, as they are and split into one example per row."""
    from datasets import Dataset

    rows = data.train
    for k in range(first, min(len(rows), first + 8 * dp) + 1, dp):
        packed = [rows[i] for i in range(k)]
        single = [ex for r in packed for ex in _examples(r)]
        if len(single) % dp == 0 and len(single) > 1:
            empty = data.eval.select([]) if len(data.eval) else data.eval
            return (
                dataclasses.replace(data, train=Dataset.from_list(packed), eval=empty, cache_dir=None),
                dataclasses.replace(data, train=Dataset.from_list(single), eval=empty, cache_dir=None),
            )
    return None, None


def _examples(row: dict[str, Any]) -> list[dict[str, Any]]:
    out, start = [], 0
    for n in row["seq_lens"]:
        part = {k: row[k][start : start + n] for k in ("input_ids", "labels", "position_ids")}
        out.append({**part, "seq_lens": [n]})
        start += n
    return out


def _trace(name: str, where: Path, summary: dict[str, Any]) -> Trace:
    from safetensors import safe_open

    from distsft.metrics.jsonl import read_metrics

    rows = read_metrics(where)
    final = Path(summary.get("final_dir") or where / "final")
    weights: dict[str, Any] = {}
    for f in sorted(final.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for k in st.keys():  # noqa: SIM118 - safe_open is not a mapping
                weights[k] = st.get_tensor(k).float()
    if not weights:
        raise DistsftError(f"verify: run {name} left no weights in {final}")
    return Trace(
        name,
        [r["loss"] for r in rows],
        [r["grad_norm"] for r in rows],
        [float(r["tokens"]) for r in rows],
        weights,
        str(summary.get("dtype", "fp32")),
    )


def _weight_distance(a: dict[str, Any], b: dict[str, Any]) -> tuple[float, str]:
    """``||a - b|| / ||a||`` over every tensor, and the tensor that holds most of the difference."""
    if a.keys() != b.keys():
        return float("inf"), f"other tensors ({sorted(a.keys() ^ b.keys())[:3]})"
    diff2, norm2, worst, where = 0.0, 0.0, 0.0, ""
    for k in a:
        d = float((a[k] - b[k]).double().pow(2).sum())
        diff2, norm2 = diff2 + d, norm2 + float(a[k].double().pow(2).sum())
        if d > worst:
            worst, where = d, k
    return (diff2 / norm2) ** 0.5 if norm2 else (0.0 if not diff2 else float("inf")), where


def _claim(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    if any(out.iterdir()) and not (out / MARK).exists():
        raise DistsftError(f"--out {out}: not empty and not made by distsft verify; give an empty or new directory")
    (out / MARK).touch()


def _clear(where: Path) -> None:
    """A variant's directory from an earlier verify (marked as ours) is cleared; anything else is refused."""
    if where.exists():
        if not (where / MARK).exists():
            raise DistsftError(f"verify: {where} exists and was not made by distsft verify; not touching it")
        shutil.rmtree(where)
