"""What a run shows and leaves behind: FLOPs/MFU, progress, TensorBoard, trackers, summary, loss curve."""

from __future__ import annotations

import io
import json
import sys
import types

import pytest
import torch
from raytest import run_cfg
from tinymodels import tiny_llama

from distsft.errors import ConfigError
from distsft.metrics.display import Display, Progress, check_logging
from distsft.metrics.jsonl import MetricsLog
from distsft.metrics.records import merge
from distsft.metrics.summary import plot_loss, summarize
from distsft.model.flops import FlopsModel, flops_model, peak_flops, rows_flops


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("length", [7, 33])
def test_flops_formula_matches_counted_matmuls_of_forward_and_backward(tied, length):
    """torch's FlopCounterMode counts every matmul of a real forward + backward; for one example the
    formula 6N + 12*L*H*hd*n per token must equal it (eager attention computes the full n x n scores)."""
    from torch.utils.flop_counter import FlopCounterMode

    model = tiny_llama("eager", tied=tied, vocab_size=97)
    n_params = sum(p.numel() for p in model.parameters())
    fm = flops_model(model, n_params)
    emb = model.config.vocab_size * model.config.hidden_size
    assert fm.dense_params == (n_params if tied else n_params - emb)
    ids = torch.randint(0, model.config.vocab_size, (1, length))
    with FlopCounterMode(display=False) as counter:
        model(input_ids=ids, labels=ids).loss.backward()
    counted = counter.get_total_flops()
    # The formula is a convention (PaLM's); on this model it is within 0.7 % of the counted matmuls.
    assert fm.flops([length]) == pytest.approx(counted, rel=0.01), (fm.flops([length]), counted)


def test_packed_row_flops_count_each_example_with_its_own_context_and_no_padding():
    fm = FlopsModel(dense_params=1000, full_attention=2 * 4 * 8)
    attn = 12 * 2 * 4 * 8
    row = {"input_ids": [0] * 10, "seq_lens": [3, 7]}
    expected = 3 * (6000 + attn * 3) + 7 * (6000 + attn * 7)
    assert rows_flops(fm, [row]) == expected
    assert rows_flops(fm, [row]) < fm.flops([10])  # the row's length would overstate attention work
    # collate pads rows to the batch width; padding is not in seq_lens, so it is never counted
    assert rows_flops(fm, [row, {"seq_lens": [2]}]) == expected + 2 * (6000 + attn * 2)


@pytest.mark.parametrize(
    "name, expected",
    [
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA H200", 989e12),
        ("NVIDIA GH200 480GB", 989e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("NVIDIA L40S", 362e12),
        ("NVIDIA L4", 121e12),
        ("Some Unknown Accelerator", None),
        (None, None),
    ],
)
def test_peak_flops_table(name, expected):
    assert peak_flops(name) == expected


def test_peak_flops_override_wins():
    assert peak_flops("NVIDIA A100-SXM4-80GB", 100.0) == 100e12
    assert peak_flops(None, 0.5) == 0.5e12


def test_merged_mfu_uses_the_slowest_worker_and_all_devices():
    base = {"step": 1, "loss": 1.0, "tokens": 100, "input_tokens": 150, "flops": 8e12, "peak_flops": 1e12}
    recs = [
        {**base, "rank": 0, "world_size": 2, "step_time_s": 2.0},
        {**base, "rank": 1, "world_size": 2, "step_time_s": 4.0},
    ]
    m = merge(recs)
    assert m["mfu"] == pytest.approx(8e12 / (4.0 * 2 * 1e12))
    assert m["tflops_per_device"] == pytest.approx(1.0)
    assert "peak_flops" not in m and "world_size" not in m
    assert merge([{**recs[0], "peak_flops": None}])["mfu"] is None


def record(step: int, **kw) -> dict:
    r = {"step": step, "loss": 5.0 / step, "grad_norm": 1.0, "lr": 1e-3, "tokens": 100, "input_tokens": 120}
    return {**r, "step_time_s": 0.5, "elapsed_s": 0.5 * step, "tokens_per_s": 200.0, **kw}


def test_progress_prints_plain_lines_with_eta_when_not_a_terminal():
    out = io.StringIO()
    p = Progress(total_steps=10, start_step=0, log_every=2, mode="auto", out=out)
    for step in range(1, 11):
        p(record(step, **({"eval_loss": 1.5} if step == 5 else {})))
    p.close()
    lines = out.getvalue().splitlines()
    assert [ln.split()[1] for ln in lines] == ["2/10", "4/10", "5/10", "6/10", "8/10", "10/10"]
    assert lines[0].endswith("eta 4s")  # 8 steps left at 0.5 s each
    assert "eval_loss 1.5000" in lines[2]
    assert "eta" not in lines[-1]


def test_progress_bar_shows_step_loss_rate_and_eta():
    out = io.StringIO()
    p = Progress(total_steps=10, start_step=4, log_every=1, mode="bar", out=out)
    p(record(5, mfu=0.42))
    p(record(6, eval_loss=0.9, mfu=0.42))
    p.close()
    text = out.getvalue()
    last = text.rsplit("\r", 1)[-1]
    assert "6/10" in last and "loss=0.8333" in last and "tok/s=200" in last and "mfu=42.0%" in last
    assert "eta=2s" in last  # 4 steps left at 0.5 s each, from the workers' step clock
    assert "eval_loss 0.9000" in text  # evals are written above the bar


def test_resumed_metrics_log_keeps_history_up_to_the_checkpoint(tmp_path):
    log = MetricsLog(tmp_path)
    for step in range(1, 7):
        log.append(merge([record(step)]))
    log = MetricsLog(tmp_path, keep_through=4)  # resumed from step 4: steps 5 and 6 will run again
    log.append(merge([record(5, loss=0.123)]))
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5] and rows[-1]["loss"] == 0.123
    MetricsLog(tmp_path)  # a fresh run starts an empty file
    assert (tmp_path / "metrics.jsonl").read_text() == ""


def test_a_tracker_asked_for_but_not_installed_is_a_config_error(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    cfg = run_cfg(tmp_path, "logging.wandb_project=demo")
    with pytest.raises(ConfigError, match=r"logging\.wandb_project .* pip install wandb"):
        check_logging(cfg.logging)
    check_logging(run_cfg(tmp_path).logging)  # nothing asked, nothing needed


def test_wandb_and_mlflow_sinks_get_every_record_and_close(tmp_path, monkeypatch):
    """Stand-ins for the two client libraries record the calls distsft makes (no account, no server)."""
    calls: list[tuple] = []

    class Run:
        def log(self, data, step):
            calls.append(("wandb.log", step, data))

        def finish(self):
            calls.append(("wandb.finish",))

    wandb = types.SimpleNamespace(
        init=lambda **kw: calls.append(("wandb.init", kw)) or Run(),
        util=types.SimpleNamespace(generate_id=lambda: "abc123"),
    )
    mlflow = types.SimpleNamespace(
        set_tracking_uri=lambda uri: calls.append(("mlflow.uri", uri)),
        set_experiment=lambda name: calls.append(("mlflow.experiment", name)),
        start_run=lambda run_name: calls.append(("mlflow.start", run_name)),
        log_params=lambda params: calls.append(("mlflow.params", params)),
        log_metrics=lambda metrics, step: calls.append(("mlflow.log", step, metrics)),
        end_run=lambda: calls.append(("mlflow.end",)),
    )
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    monkeypatch.setitem(sys.modules, "mlflow", mlflow)
    cfg = run_cfg(
        tmp_path,
        "logging.wandb_project=proj",
        "logging.mlflow_experiment=exp",
        "logging.mlflow_tracking_uri=file:///tmp/x",
        "logging.progress=none",
        "logging.tensorboard=false",
    )
    rep = Display(cfg, total_steps=2, start_step=0)
    rep(record(1))
    rep(record(2, eval_loss=0.7))
    rep.close()
    init = next(c[1] for c in calls if c[0] == "wandb.init")
    assert init["project"] == "proj" and init["id"] == "abc123" and init["config"]["train"]["max_steps"] == 2
    logged = [c for c in calls if c[0] == "wandb.log"]
    assert [c[1] for c in logged] == [1, 2] and logged[1][2]["eval/loss"] == 0.7
    assert [c[1] for c in calls if c[0] == "mlflow.log"] == [1, 2]
    assert ("mlflow.experiment", "exp") in calls and ("mlflow.uri", "file:///tmp/x") in calls
    params = next(c[1] for c in calls if c[0] == "mlflow.params")
    assert params["train.lr"] == "0.0001"
    assert ("wandb.finish",) in calls and ("mlflow.end",) in calls
    assert (tmp_path / "wandb_run_id").read_text() == "abc123"


def test_a_failing_sink_is_switched_off_without_stopping_the_run(tmp_path, capsys):
    cfg = run_cfg(tmp_path, "logging.progress=none", "logging.tensorboard=false")
    rep = Display(cfg, total_steps=2, start_step=0)
    seen = []

    def broken(rec):
        raise ConnectionError("tracking server went away")

    rep.sinks = [broken, seen.append]
    rep(record(1))
    rep(record(2))
    assert [r["step"] for r in seen] == [1, 2] and rep.sinks == [seen.append]
    assert "tracking server went away" in capsys.readouterr().err


def test_summary_and_plot(tmp_path):
    recs = [record(s, mfu=0.1 * (s % 2 + 1), tflops_per_device=1.0) for s in range(1, 41)]
    recs[19]["eval_loss"], recs[39]["eval_loss"] = 0.5, 0.6
    s = summarize(recs, start_step=10)
    assert s["steps_run"] == 30 and s["supervised_tokens"] == 3000 and s["tokens_per_s"] == pytest.approx(200.0)
    assert s["mfu"] == pytest.approx(0.15)
    assert (s["final_eval_loss"], s["best_eval_loss"], s["best_eval_step"]) == (0.6, 0.5, 20)
    png = plot_loss(recs, tmp_path / "loss.png", title="t")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_local_run_reports_mfu_tensorboard_summary_and_loss_curve(tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from distsft.launcher.run import launch_local

    cfg = run_cfg(
        tmp_path, "train.max_steps=4", "train.eval_every=2", "data.eval_fraction=0.1", "logging.peak_tflops=0.05"
    )
    summary = launch_local(cfg, quiet=True)
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for r in rows:
        assert r["flops"] > 0
        assert r["mfu"] == pytest.approx(r["flops"] / r["step_time_s"] / 0.05e12)
    assert [r["step"] for r in rows if "eval_loss" in r] == [2, 4]
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    tb = acc.Scalars("train/loss")
    assert [e.step for e in tb] == [1, 2, 3, 4]
    assert [e.value for e in tb] == pytest.approx([r["loss"] for r in rows], rel=1e-6)
    assert [e.step for e in acc.Scalars("eval/loss")] == [2, 4]
    assert "perf/mfu" in acc.Tags()["scalars"]
    assert (tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG"
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["supervised_tokens"] == sum(r["tokens"] for r in rows) == summary["supervised_tokens"]
    assert saved["final_eval_loss"] == rows[-1]["eval_loss"] and saved["mfu"] > 0
    out = capsys.readouterr().out
    assert "done: 4 steps" in out and f"model: {tmp_path / 'final'}" in out and "loss curve:" in out


def test_report_command_summarises_a_running_run_and_draws_its_curve(tmp_path, cli):
    log = MetricsLog(tmp_path)
    for step in range(1, 13):
        log.append(merge([record(step, **({"eval_loss": 0.9} if step == 10 else {}))]))
    code, out, err = cli("report", str(tmp_path))
    assert code == 0, err
    assert out.startswith("so far (step 12): 12 steps") and "1,200 supervised tokens" in out
    assert "best 0.9000 at step 10" in out
    assert (tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG"
    code, out, err = cli("report", str(tmp_path / "nothing"))
    assert code == 2 and "no metrics" in err


def test_the_follower_survives_a_metrics_file_cut_back_and_rewritten_past_where_it_was(tmp_path):
    """A restarted worker group resumes earlier: the sink cuts metrics.jsonl back and writes again, and by
    the next poll the file may be longer than before, the follower's place now mid-line."""
    from distsft.metrics.display import Follower

    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (1, 2, 3)))
    seen: list[int] = []
    follower = Follower(path, lambda r: seen.append(r["step"]), poll_s=60)
    follower._pos = 0
    follower._drain()
    rewritten = [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.123456789, "grad_norm": 3.0}]
    rewritten += [{"step": s, "loss": 0.5} for s in (3, 4, 5)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rewritten))
    follower._drain()  # no JSONDecodeError: the tail of a line is skipped, the whole lines after it read
    assert seen[:3] == [1, 2, 3] and seen[3:] and seen[-1] == 5


def test_the_end_of_run_loss_is_a_mean_over_the_last_steps_not_one_noisy_step():
    """One step's loss is one global batch (4 rows on the demo): the summary's line says a figure over the
    last steps, token-weighted, and names it as such."""
    from distsft.metrics.summary import format_summary, summarize

    recs = [{"step": s, "loss": 0.25, "tokens": 100, "step_time_s": 1.0} for s in range(1, 20)]
    recs.append({"step": 20, "loss": 2.33, "tokens": 10, "step_time_s": 1.0})
    s = summarize(recs)
    assert s["final_loss"] == 2.33
    assert s["train_loss_window"] == pytest.approx((0.25 * 900 + 2.33 * 10) / 910)
    line = format_summary(s).splitlines()[1]
    assert "train loss 0.2729 (token-weighted mean of the last 10 steps)" in line and "2.33" not in line


def test_named_eval_sets_show_on_their_step_and_in_the_summary_even_without_a_default_set():
    """``data.evals`` alone (no eval_fraction or eval_path): the eval steps still print, each set's loss
    by its name, and the summary gives each set's last and best loss with its step."""
    from distsft.metrics.summary import format_summary

    out = io.StringIO()
    p = Progress(total_steps=10, start_step=0, log_every=4, mode="auto", out=out)
    recs = [record(s, **({"eval_loss/chat": 2.0 - s / 10, "eval_loss/code": 1.0 + s / 10} if s % 3 == 0 else {}))
            for s in range(1, 11)]  # fmt: skip
    for r in recs:
        p(r)
    p.close()
    lines = out.getvalue().splitlines()
    assert [ln.split()[1] for ln in lines] == ["3/10", "4/10", "6/10", "8/10", "9/10", "10/10"]
    assert "eval_loss/chat 1.7000  eval_loss/code 1.3000" in lines[0]
    s = summarize(recs)
    assert "final_eval_loss" not in s and s["named_evals"]["code"] == {"final": 1.9, "best": 1.3, "best_step": 3}
    summary = format_summary(s).splitlines()[1]
    assert "eval chat 1.1000 (best 1.1000 at step 9); eval code 1.9000 (best 1.3000 at step 3)" in summary
