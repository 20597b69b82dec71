"""The end of a run in one look: a summary (time, tokens, tokens/s, MFU, eval loss, where things are) and a
loss-curve PNG, both computed from ``metrics.jsonl`` so they can be redrawn for any run afterwards."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from distsft.metrics.display import eval_losses, format_duration

LOSS_WINDOW = 10
"""The end-of-run training loss is the token-weighted mean of this many last steps: one step's loss is one
global batch (4 rows on the demo) and jumps by 5x from step to step."""


def summarize(records: list[dict[str, Any]], start_step: int = 0) -> dict[str, Any]:
    """Throughput figures cover this launch's steps (after ``start_step``); eval figures the whole run.

    Tokens/s divides supervised tokens by the summed step times (the slowest worker's, which set the
    pace), so start-up, evaluation and checkpoint saves are left out; MFU is time-weighted the same way.
    """
    mine = [r for r in records if r["step"] > start_step]
    step_time = sum(r["step_time_s"] for r in mine)
    tokens = sum(r["tokens"] for r in mine)
    out: dict[str, Any] = {
        "steps_run": len(mine),
        "train_time_s": step_time,
        "supervised_tokens": tokens,
        "input_tokens": sum(r.get("input_tokens", 0) for r in mine),
        "tokens_per_s": tokens / step_time if step_time > 0 else 0.0,
    }
    timed = [r for r in mine if r.get("mfu") is not None]
    if timed:
        out["mfu"] = sum(r["mfu"] * r["step_time_s"] for r in timed) / sum(r["step_time_s"] for r in timed)
    if mine and mine[-1].get("tflops_per_device") is not None:
        out["tflops_per_device"] = sum(r["tflops_per_device"] * r["step_time_s"] for r in mine) / max(step_time, 1e-12)
    if records:
        out["final_loss"] = records[-1]["loss"]  # one step's loss: one global batch, noisy
        last = records[-LOSS_WINDOW:]
        tokens_in = sum(r["tokens"] for r in last)
        out["train_loss_window"] = sum(r["loss"] * r["tokens"] for r in last) / max(tokens_in, 1)
        out["train_loss_window_steps"] = len(last)
    ends = {}  # each eval set's last loss, and its best with the step: the default one and data.evals' names
    for key in sorted({k for r in records for k in eval_losses(r)}):
        seen = [r for r in records if r.get(key) is not None]
        best = min(seen, key=lambda r: r[key])
        ends[key] = {"final": seen[-1][key], "best": best[key], "best_step": best["step"]}
    if "eval_loss" in ends:
        e = ends.pop("eval_loss")
        out.update(final_eval_loss=e["final"], best_eval_loss=e["best"], best_eval_step=e["best_step"])
    if ends:
        out["named_evals"] = {key.split("/", 1)[1]: e for key, e in ends.items()}
    return out


def add_run_figures(
    summary: dict[str, Any],
    records: list[dict[str, Any]],
    run_dir: Path,
    start_step: int,
    plot: bool = True,
    png: Path | None = None,
) -> dict[str, Any]:
    """What the end of a launch and ``distsft report`` both add: the figures and the loss curve."""
    summary.update(summarize(records, start_step))
    if plot and records:
        summary["loss_plot"] = str(plot_loss(records, png or run_dir / "loss.png", title=f"{run_dir.name}: loss"))
    return summary


def format_summary(s: dict[str, Any], heading: str = "done") -> str:
    lines = [
        f"{heading}: {s.get('steps_run', 0)} steps in {format_duration(s.get('wall_s', 0.0))} "
        f"(training steps {format_duration(s.get('train_time_s', 0.0))}); "
        f"{s.get('supervised_tokens', 0):,} supervised tokens at {s.get('tokens_per_s', 0.0):,.0f} tok/s"
        + (f", MFU {s['mfu']:.1%}" if s.get("mfu") is not None else "")
        + (f", {s['tflops_per_device']:.2f} TFLOP/s per device" if s.get("tflops_per_device") is not None else ""),
    ]
    if "train_loss_window" in s:
        n = s["train_loss_window_steps"]
        loss = f"  train loss {s['train_loss_window']:.4f} (token-weighted mean of the last {n} step{'s' * (n > 1)})"
    else:
        loss = "  train loss -"
    if "final_eval_loss" in s:
        loss += f"; eval loss {s['final_eval_loss']:.4f} (best {s['best_eval_loss']:.4f} at step {s['best_eval_step']})"
    for name, e in s.get("named_evals", {}).items():
        loss += f"; eval {name} {e['final']:.4f} (best {e['best']:.4f} at step {e['best_step']})"
    lines.append(loss)
    for label, key in (("model", "final_dir"), ("checkpoint", "checkpoint"), ("loss curve", "loss_plot")):
        if s.get(key):
            lines.append(f"  {label}: {s[key]}")
    return "\n".join(lines)


def plot_loss(records: list[dict[str, Any]], path: Path, title: str = "") -> Path | None:
    """Train loss (raw and smoothed) and eval loss against the optimizer step; log scale when the loss
    falls by more than 20x, so the end of the curve stays readable."""
    if not records:
        return None
    # a worker-group restart repeats steps since the last checkpoint: draw the run that counts (the last)
    records = sorted({r["step"]: r for r in records}.values(), key=lambda r: r["step"])
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in records]
    loss = [r["loss"] for r in records]
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    ax.plot(steps, loss, color="tab:blue", alpha=0.3, linewidth=1, label="train loss (per step)")
    if len(loss) >= 10:
        ax.plot(steps, _ema(loss, 0.9), color="tab:blue", linewidth=1.8, label="train loss (EMA 0.9)")
    evals = [(r["step"], r["eval_loss"]) for r in records if r.get("eval_loss") is not None]
    if evals:
        ax.plot(*zip(*evals, strict=True), "o-", color="tab:orange", linewidth=1.8, markersize=4, label="eval loss")
    values = loss + [v for _, v in evals]
    if min(values) > 0 and max(values) / min(values) > 20:
        ax.set_yscale("log")
        ax.set_ylabel("loss (nats per supervised token, log scale)")
    else:
        ax.set_ylabel("loss (nats per supervised token)")
    ax.set_xlabel("optimizer step")
    ax.set_title(title or "loss")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def _ema(values: list[float], beta: float) -> list[float]:
    """Bias-corrected exponential moving average (TensorBoard's smoothing)."""
    out, avg = [], 0.0
    for i, v in enumerate(values, start=1):
        avg = beta * avg + (1 - beta) * v
        out.append(avg / (1 - beta**i))
    return out
