"""What the driver shows and writes while a run goes: a progress bar (or plain lines), TensorBoard, and
optionally Weights & Biases or MLflow.

Everything here consumes the merged records (``distsft/metrics/records.py``) and nothing else, so a
``--local`` run (records handed over in-process) and a Ray run (records followed in ``metrics.jsonl``,
which the record sink writes) look the same. A sink that fails (a tracking server going away) is switched off with a
warning; it never stops training.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from distsft.config import Config, LoggingConfig, flatten
from distsft.errors import ConfigError
from distsft.metrics.samples import format_samples, read_samples

# metrics.jsonl key -> TensorBoard / W&B / MLflow tag
SCALARS = {
    "loss": "train/loss",
    "grad_norm": "train/grad_norm",
    "lr": "train/lr",
    "aux_loss": "train/router_aux_loss",
    "eval_loss": "eval/loss",
    "tokens_per_s": "perf/supervised_tokens_per_s",
    "input_tokens_per_s": "perf/input_tokens_per_s",
    "mfu": "perf/mfu",
    "tflops_per_device": "perf/tflops_per_device",
    "step_time_s": "perf/step_time_s",
    "peak_mem_mb": "perf/peak_mem_mb",
    "samples_s": "eval/samples_s",
}


def scalars(rec: dict[str, Any]) -> dict[str, float]:
    """A record's figures by tag: ``SCALARS``, and each named eval set's ``eval_loss/<name>`` as
    ``eval/loss/<name>``."""
    out = {tag: rec[k] for k, tag in SCALARS.items() if rec.get(k) is not None}
    prefix = "eval_loss/"
    out.update({f"eval/loss/{k[len(prefix) :]}": v for k, v in rec.items() if k.startswith(prefix) and v is not None})
    return out


def check_logging(cfg: LoggingConfig) -> None:
    """Fail before any work when the config asks for a tracker that is not installed."""
    for key, value, package in (
        ("logging.wandb_project", cfg.wandb_project, "wandb"),
        ("logging.mlflow_experiment", cfg.mlflow_experiment, "mlflow"),
    ):
        if value and importlib.util.find_spec(package) is None:
            raise ConfigError(f"{key} is set but the {package} package is not installed: pip install {package}")


def format_duration(seconds: float) -> str:
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def format_record(rec: dict[str, Any], total_steps: int | None) -> str:
    total = f"/{total_steps}" if total_steps else ""
    gn = rec.get("grad_norm")
    parts = [
        f"step {rec['step']}{total}",
        f"loss {rec['loss']:.4f}",
        *([f"aux_loss {rec['aux_loss']:.4f}"] if "aux_loss" in rec else []),
        f"grad_norm {gn:.3f}" if gn is not None else "grad_norm -",
        f"lr {rec['lr']:.2e}",
        f"tok/s {rec['tokens_per_s']:.0f}",
    ]
    if rec.get("mfu") is not None:
        parts.append(f"mfu {rec['mfu']:.1%}")
    parts += [f"{key} {value:.4f}" for key, value in eval_losses(rec).items()]
    return "  ".join(parts)


def eval_losses(rec: dict[str, Any]) -> dict[str, float]:
    """The record's eval losses: ``eval_loss`` (the default held-out set) and each named set's
    ``eval_loss/<name>``, in that order."""
    return {k: v for k, v in rec.items() if (k == "eval_loss" or k.startswith("eval_loss/")) and v is not None}


def should_print(rec: dict[str, Any], total_steps: int | None, log_every: int) -> bool:
    return rec["step"] % log_every == 0 or rec["step"] == total_steps or bool(eval_losses(rec))


class Progress:
    """A tqdm bar (step, loss, tokens/s, MFU, ETA) on a terminal; plain lines with an ETA otherwise."""

    def __init__(
        self, total_steps: int, start_step: int, log_every: int, mode: str = "auto", out: TextIO | None = None
    ) -> None:
        self.out = out or sys.stdout  # log lines belong on stdout (where the rest of the run's output goes)
        if mode == "auto":
            mode = "bar" if _is_terminal(self.out) else "lines"
        self.mode, self.total, self.every, self.start_step = mode, total_steps, log_every, start_step
        self._first: tuple[int, float] | None = None  # (step, elapsed_s) of this launch's first record
        self._bar = None

    def _open_bar(self):
        """Opened at the first record, so start-up messages (Ray, DeepSpeed) print before it, not through it.

        The ETA comes from the workers' own step clock (``elapsed_s``), not from when records reach the
        driver: Ray delivers them in batches, and start-up would skew a wall-clock rate."""
        from tqdm.auto import tqdm

        return tqdm(
            total=self.total,
            initial=self.start_step,
            unit="step",
            file=self.out,
            dynamic_ncols=True,
            bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]",
        )

    def eta_s(self, rec: dict[str, Any]) -> float | None:
        if self._first is None:
            self._first = (rec["step"] - 1, rec["elapsed_s"] - rec["step_time_s"])
        done = rec["step"] - self._first[0]
        if done <= 0 or not self.total:
            return None
        return (rec["elapsed_s"] - self._first[1]) / done * (self.total - rec["step"])

    def __call__(self, rec: dict[str, Any]) -> None:
        eta = self.eta_s(rec)
        if self.mode == "bar" and self._bar is None:
            self._bar = self._open_bar()
        if self._bar is not None:
            post = {"loss": f"{rec['loss']:.4f}", "tok/s": f"{rec['tokens_per_s']:.0f}"}
            if rec.get("mfu") is not None:
                post["mfu"] = f"{rec['mfu']:.1%}"
            if eta is not None:
                post["eta"] = format_duration(eta)
            self._bar.set_postfix(post, refresh=False)
            self._bar.update(rec["step"] - self._bar.n)
            if "eval_loss" in rec:
                self._bar.write(format_record(rec, self.total), file=self.out)
        elif self.mode == "lines" and should_print(rec, self.total, self.every):
            line = format_record(rec, self.total)
            if eta is not None and rec["step"] != self.total:
                line += f"  eta {format_duration(eta)}"
            print(line, file=self.out, flush=True)

    def samples(self, step: int, rows: list[dict[str, Any]]) -> None:
        """The first sample of an eval step, one line: a glimpse; ``samples.jsonl`` has them all."""
        (line,) = format_samples(rows[:1])
        if self._bar is not None:
            self._bar.write(line, file=self.out)
        elif self.mode == "lines":
            print(line, file=self.out, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _is_terminal(stream: TextIO) -> bool:
    """A terminal wide enough to draw on (a pseudo-terminal of width 0 would swallow the bar)."""
    try:
        return stream.isatty() and os.get_terminal_size(stream.fileno()).columns > 0
    except (OSError, ValueError, AttributeError):
        return False


class TensorBoardSink:
    def __init__(self, output_dir: Path, start_step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # purge_step hides events of steps a resumed run repeats (written by the launch that crashed).
        self.writer = SummaryWriter(log_dir=str(output_dir), purge_step=start_step + 1 if start_step else None)

    def __call__(self, rec: dict[str, Any]) -> None:
        for tag, value in scalars(rec).items():
            self.writer.add_scalar(tag, value, rec["step"])

    def samples(self, step: int, rows: list[dict[str, Any]]) -> None:
        text = "\n\n".join(f"**{r['eval']}**\n\n```\n{r['prompt']}\n```\n\n{r['reply']}" for r in rows)
        self.writer.add_text("samples", text, step)

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    """A resumed run continues the same W&B run (its id is kept in ``output_dir/wandb_run_id``)."""

    def __init__(self, cfg: Config, output_dir: Path, resuming: bool) -> None:
        import wandb

        id_file = output_dir / "wandb_run_id"
        run_id = id_file.read_text().strip() if resuming and id_file.is_file() else wandb.util.generate_id()
        id_file.write_text(run_id)
        self.wandb = wandb
        self.run = wandb.init(
            project=cfg.logging.wandb_project,
            entity=cfg.logging.wandb_entity,
            name=output_dir.name,
            id=run_id,
            resume="allow",
            dir=str(output_dir),
            config=cfg.to_dict(),
        )

    def __call__(self, rec: dict[str, Any]) -> None:
        self.run.log(scalars(rec), step=rec["step"])

    def samples(self, step: int, rows: list[dict[str, Any]]) -> None:
        columns = ["step", "eval", "prompt", "reply"]
        table = self.wandb.Table(columns=columns, data=[[r[c] for c in columns] for r in rows])
        self.run.log({"samples": table}, step=step)

    def close(self) -> None:
        self.run.finish()


class MlflowSink:
    def __init__(self, cfg: Config, output_dir: Path) -> None:
        import mlflow

        if cfg.logging.mlflow_tracking_uri:
            mlflow.set_tracking_uri(cfg.logging.mlflow_tracking_uri)
        mlflow.set_experiment(cfg.logging.mlflow_experiment)
        self.mlflow = mlflow
        self.run = mlflow.start_run(run_name=output_dir.name)
        mlflow.log_params({k: str(v)[:500] for k, v in flatten(cfg.to_dict()).items()})

    def __call__(self, rec: dict[str, Any]) -> None:
        metrics = {tag.replace("/", "_"): v for tag, v in scalars(rec).items()}
        self.mlflow.log_metrics(metrics, step=rec["step"])

    def samples(self, step: int, rows: list[dict[str, Any]]) -> None:
        self.mlflow.log_dict({"step": step, "samples": rows}, f"samples/step-{step:08d}.json")

    def close(self) -> None:
        self.mlflow.end_run()


class Display:
    """The driver's sinks for merged records: progress display, TensorBoard, W&B, MLflow."""

    def __init__(self, cfg: Config, total_steps: int, start_step: int, out: TextIO | None = None) -> None:
        self.output_dir = output_dir = Path(cfg.output_dir)
        lc = cfg.logging
        self.sinks: list[Any] = []
        if lc.progress != "none":
            self.sinks.append(Progress(total_steps, start_step, cfg.train.log_every, lc.progress, out))
        factories: list[tuple[str, Callable[[], Any]]] = []
        if lc.tensorboard:
            factories.append(("tensorboard", lambda: TensorBoardSink(output_dir, start_step)))
        if lc.wandb_project:
            factories.append(("wandb", lambda: WandbSink(cfg, output_dir, resuming=start_step > 0)))
        if lc.mlflow_experiment:
            factories.append(("mlflow", lambda: MlflowSink(cfg, output_dir)))
        for name, make in factories:
            try:
                self.sinks.append(make())
            except Exception as e:  # noqa: BLE001 - a tracker must not stop training
                print(f"warning: {name} logging is off: {type(e).__name__}: {e}", file=sys.stderr, flush=True)

    def __call__(self, rec: dict[str, Any]) -> None:
        samples = read_samples(self.output_dir, rec["step"]) if "samples_s" in rec else []
        for sink in list(self.sinks):
            try:
                sink(rec)
                if samples and hasattr(sink, "samples"):
                    sink.samples(rec["step"], samples)
            except Exception as e:  # noqa: BLE001
                self.sinks.remove(sink)
                print(f"warning: {type(sink).__name__} switched off: {e}", file=sys.stderr, flush=True)

    def close(self) -> None:
        for sink in self.sinks:
            try:
                sink.close()
            except Exception as e:  # noqa: BLE001
                print(f"warning: closing {type(sink).__name__}: {e}", file=sys.stderr, flush=True)
        self.sinks = []


class Follower:
    """Hands each record appended to ``metrics.jsonl`` (by the record sink) to ``handler``, and prints one
    line per worker placement (from ``workers.json``) as workers start or restart."""

    def __init__(
        self,
        path: Path,
        handler: Callable[[dict[str, Any]], None],
        poll_s: float = 0.5,
        workers: Path | None = None,
        out: TextIO | None = None,
    ) -> None:
        self.path, self.handler, self.poll_s, self.workers = path, handler, poll_s, workers
        self.out = out
        self._pos = path.stat().st_size if path.exists() else 0
        self._placed: dict[str, Any] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="distsft-follow", daemon=True)

    def __enter__(self):
        if self.workers is not None:
            self.workers.unlink(missing_ok=True)  # a previous launch's placement is not this one's
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._drain()

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            self._drain()

    def _drain(self) -> None:
        self._placement()
        if not self.path.exists():
            return
        if self.path.stat().st_size < self._pos:  # truncated: a restarted worker group resumed earlier
            self._pos = self.path.stat().st_size
        with open(self.path, "rb") as f:
            f.seek(self._pos)
            for line in f:
                if not line.endswith(b"\n"):
                    break  # a record still being written; read it next time
                self._pos += len(line)
                try:
                    record = json.loads(line)
                except ValueError:  # the sink cut the file back (a restart resumed earlier) and wrote past
                    continue  # where we were: this was the tail of a line; the next one is whole
                self.handler(record)

    def _placement(self) -> None:
        if self.workers is None or not self.workers.exists():
            return
        try:
            placed = json.loads(self.workers.read_text())
        except ValueError:
            return
        for rank, where in sorted(placed.items(), key=lambda kv: int(kv[0])):
            if self._placed.get(rank) != where:
                again = "restarted: " if rank in self._placed else ""
                device, pid = where.get("device"), where.get("pid")
                print(
                    f"worker: {again}rank {rank} on {where.get('node')} ({device}, pid {pid})",
                    file=self.out or sys.stdout,
                    flush=True,
                )
        self._placed = placed
