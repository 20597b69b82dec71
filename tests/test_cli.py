from __future__ import annotations

import subprocess
import sys

from conftest import REPO


def test_help_lists_every_command(cli):
    code, out, _ = cli("--help")
    assert code == 0
    for command in ("launch", "generate"):
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
