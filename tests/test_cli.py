from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import REPO


def test_help_lists_every_command(cli):
    code, out, _ = cli("--help")
    assert code == 0
    for command in ("launch", "prepare", "eval", "generate"):
        assert command in out


def test_bad_config_is_one_line_without_traceback(cli, tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("train:\n  lr: fast\n")
    code, out, err = cli("launch", "--config", str(p), "--local")
    assert code == 2
    assert err.count("\n") == 1, err
    assert "Traceback" not in err
    assert f"{p}:2" in err and "train.lr" in err and "a number" in err


def test_missing_config_file_exits_nonzero(cli, tmp_path):
    code, _, err = cli("launch", "--config", str(tmp_path / "missing.yaml"))
    assert code == 2 and "config file not found" in err


def test_missing_data_file_is_a_clear_error(cli, tmp_path):
    code, _, err = cli(
        "launch", "--local", "--set", f"data.path={tmp_path}/nope.jsonl", "--set", f"output_dir={tmp_path}"
    )
    assert code == 2
    assert "nope.jsonl: no such file or directory" in err and "Traceback" not in err


def test_generate_rejects_non_model_dir(cli, tmp_path):
    code, _, err = cli("generate", "--model", str(tmp_path), "hi")
    assert code == 2 and "not a model directory" in err


def test_console_script_entry_point_runs():
    """The installed `distsft` command, in a fresh interpreter (how users call it)."""
    r = subprocess.run(
        [sys.executable, "-m", "distsft", "--version"], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0 and r.stdout.startswith("distsft ")


SMALL = str(REPO / "tests" / "fixtures" / "support_small.jsonl")


def test_prepare_prints_stats_shows_and_dumps_rows(cli, tmp_path):
    dump = tmp_path / "rows.jsonl"
    code, out, err = cli(
        "prepare", "--set", f"data.path={SMALL}", "--set", f"output_dir={tmp_path}", "--show", "2", "--dump", str(dump)
    )
    assert code == 0, err
    assert "rows_read           24" in out and "packing_efficiency" in out
    assert out.count("=== packed row") == 2 and "⟦" in out and "<|im_end|>⟧" in out
    rows = [json.loads(x) for x in dump.read_text().splitlines()]
    assert rows and all(len(r["input_ids"]) == len(r["labels"]) == len(r["position_ids"]) for r in rows)
    code, out2, _ = cli("prepare", "--set", f"data.path={SMALL}", "--set", f"output_dir={tmp_path}")
    assert "cache               hit" in out2


def test_prepare_show_says_turn_by_turn_what_is_learnt(cli, tmp_path):
    """Tool calls, reasoning and tool results, each on its own line with its state, and the exact text
    learnt of each assistant turn; a row the template cannot take shows why."""
    import os

    import trl

    rows = tmp_path / "agent.jsonl"
    call = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    rows.write_text(
        json.dumps({"tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}],
                    "messages": [{"role": "user", "content": "Weather in Paris?"},
                                 {"role": "assistant", "content": "", "tool_calls": [call]},
                                 {"role": "tool", "tool_call_id": "c1", "name": "get_weather", "content": "18 C"},
                                 {"role": "assistant", "content": "It is 18 C."}]}) + "\n"
        + json.dumps({"messages": [{"role": "user", "content": "Say OK."},
                                   {"role": "assistant", "content": "Nope.", "train": False},
                                   {"role": "user", "content": "Please."},
                                   {"role": "assistant", "reasoning_content": "They insist.", "content": "OK"}]}) + "\n"
    )  # fmt: skip
    template = os.path.join(os.path.dirname(trl.__file__), "chat_templates", "qwen3.jinja")
    code, out, err = cli(
        "prepare", "--set", f"data.path={rows}", "--set", f"output_dir={tmp_path}", "--set", "data.eval_fraction=0",
        "--set", f"model.chat_template={template}", "--show", "2",
    )  # fmt: skip
    assert code == 0, err
    assert f"=== {rows}:1 ===" in out and f"=== {rows}:2 ===" in out
    assert '  tool      | get_weather returned "18 C"  [context]' in out
    assert "  assistant | (no text)  [learnt]" in out and 'tool call get_weather({"city": "Paris"})' in out
    assert '  assistant | "Nope."  [context (train: false)]' in out
    assert 'reasoning "They insist."  [learnt]' in out and "They insist.\n</think>\n\nOK<|im_end|>⟧" in out


def test_prepare_reports_bad_rows_and_exits_nonzero(cli, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": []}\n{oops\n')
    code, out, err = cli("prepare", "--set", f"data.path={bad}", "--set", f"output_dir={tmp_path}")
    assert code == 2
    assert f"{bad}:1: empty conversation" in err and f"{bad}:2: invalid JSON" in err and "Traceback" not in err


@pytest.fixture(scope="module")
def random_model_dir(tmp_path_factory):
    """An untrained demo-architecture model directory with the demo tokenizer (no training needed)."""
    import shutil

    from distsft.model.loading import DEMO_TOKENIZER, materialize_demo

    out = tmp_path_factory.mktemp("model")
    shutil.copytree(materialize_demo(0), out, dirs_exist_ok=True)
    shutil.copytree(DEMO_TOKENIZER, out, dirs_exist_ok=True)
    return out


def test_eval_prints_json_loss_and_packing_does_not_change_it(cli, tmp_path, random_model_dir):
    results = {}
    for packing in ("true", "false"):
        code, out, err = cli(
            "eval",
            "--model",
            str(random_model_dir),
            "--set",
            f"data.path={SMALL}",
            "--set",
            f"data.packing={packing}",
            "--set",
            f"data.cache_dir={tmp_path}",
        )
        assert code == 0, err
        results[packing] = json.loads(out.strip().splitlines()[-1])
    assert results["true"]["tokens"] == results["false"]["tokens"] > 0
    assert results["true"]["loss"] == pytest.approx(results["false"]["loss"], rel=1e-5)
    assert 5 < results["true"]["loss"] < 10  # an untrained model over a ~3k vocabulary: about ln(3072)


def test_eval_and_generate_on_a_directory_that_is_not_a_model_are_one_line(tmp_path, cli):
    empty, broken = tmp_path / "empty", tmp_path / "broken"
    empty.mkdir()
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    for args in (
        ("eval", "--model", str(empty)),
        ("eval", "--model", str(broken)),
        ("generate", "--model", str(broken), "hi"),
    ):
        code, _, err = cli(*args)
        assert (
            code == 2
            and len(err.strip().splitlines()) == 1
            and "not a model directory" in err
            or "cannot be loaded" in err
        ), (args, err)


def test_a_second_launch_into_a_busy_output_dir_is_refused_with_the_first_ones_pid(tmp_path, cli):
    import os

    from distsft.host import DirectoryLock

    out = tmp_path / "run"
    with DirectoryLock(out):  # the first launch, still running
        code, _, err = cli("launch", "--local", "--set", f"output_dir={out}")
        assert code == 2 and "a launch is already running there (host" in err and f"pid {os.getpid()})" in err
        assert len(err.strip().splitlines()) == 1
    assert not (out / "checkpoints").exists()  # refused before any work


def test_checkpoints_another_run_wrote_under_a_shared_storage_path_are_refused(tmp_path):
    """Two runs named alike (``/exp1/run`` and ``/exp2/run``) map to ``storage_path/run``: the second one
    must not resume from (or rotate away) the first one's checkpoints."""
    import json

    from distsft.checkpoint import auth
    from distsft.config import load_config
    from distsft.errors import ConfigError
    from distsft.launcher.run import check_owner

    root = tmp_path / "shared" / "run" / "checkpoints"
    ckpt = root / "step-00000002"
    ckpt.mkdir(parents=True)
    manifest = {"step": 2, "files": {}, "config": {"output_dir": str(tmp_path / "exp1" / "run")}}
    (ckpt / "MANIFEST.json").write_text(json.dumps(auth.sign(manifest)))
    check_owner(load_config(None, [f"output_dir={tmp_path / 'exp1' / 'run'}"]), root, str(ckpt))
    with pytest.raises(ConfigError, match="belong to the run whose output_dir is"):
        check_owner(load_config(None, [f"output_dir={tmp_path / 'exp2' / 'run'}"]), root, str(ckpt))
