"""Models named by hub id: unreachable or missing ones fail in seconds with one line; a copy in the local
Hugging Face cache is used offline and when the hub cannot be reached. No test touches the network: the
"hub" is a closed port on 127.0.0.1."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from conftest import REPO
from families import save_family
from raytest import SMALL

CLOSED_PORT = "http://127.0.0.1:9"  # the discard port: nothing listens, the connection is refused at once


def run_cli(*args: str, env: dict[str, str], timeout: float = 300) -> tuple[subprocess.CompletedProcess, float]:
    full_env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    full_env["HF_DATASETS_OFFLINE"] = "1"  # only the model's source is under test
    full_env.update(env)
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "distsft", *args],
        cwd=REPO,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return proc, time.monotonic() - t0


def launch_args(out, model: str, *extra: str) -> list[str]:
    sets = [f"output_dir={out}", f"model.path={model}", f"data.path={SMALL}", "data.max_seq_len=128", *extra]
    return ["launch", "--local", *[a for s in sets for a in ("--set", s)]]


def test_an_unreachable_hub_id_fails_in_seconds_with_one_line(tmp_path):
    proc, seconds = run_cli(
        *launch_args(tmp_path, "acme/not-cached"), env={"HF_ENDPOINT": CLOSED_PORT, "HF_HUB_CACHE": str(tmp_path)}
    )
    assert proc.returncode == 2 and seconds < 30, (seconds, proc.stderr[-2000:])
    err = proc.stderr.strip()
    assert "\n" not in err and "Traceback" not in err, err
    for what in ("model.path: acme/not-cached", "could not be reached", "HF_HUB_OFFLINE is not set", str(tmp_path)):
        assert what in err, (what, err)


def test_offline_without_a_cached_copy_says_so(tmp_path):
    proc, _ = run_cli(
        *launch_args(tmp_path, "acme/not-cached"), env={"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path)}
    )
    assert proc.returncode == 2
    assert "HF_HUB_OFFLINE is set and the local cache" in proc.stderr and "has no copy" in proc.stderr


@pytest.mark.parametrize(
    "path,key", [("./no/such/model", "model.path"), ("/no/such/dir", "model.path"), ("a/b/c", "model.path")]
)
def test_a_local_path_that_does_not_exist_names_the_key(cli, tmp_path, path, key):
    code, _, err = cli(*launch_args(tmp_path, path))
    assert code == 2 and f"{key}: {path}: no such directory" in err and err.count("\n") == 1


def test_a_missing_tokenizer_path_names_its_key(cli, tmp_path):
    code, _, err = cli(*launch_args(tmp_path, "demo", "model.tokenizer=./no-tokenizer"))
    assert code == 2 and "model.tokenizer: ./no-tokenizer: no such directory" in err


def fake_hub_cache(root, repo_id: str, model_dir) -> None:
    """The layout huggingface_hub writes: models--org--name/{refs/main, snapshots/<commit>/files}."""
    import shutil

    from distsft.config import ModelConfig
    from distsft.model.loading import load_tokenizer

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = root / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / commit
    shutil.copytree(model_dir, snap)
    load_tokenizer(ModelConfig(path="demo")).save_pretrained(snap)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["offline", "hub unreachable"])
def test_a_cached_hub_model_trains_offline_or_without_the_hub(tmp_path, mode):
    cache = tmp_path / "hub"
    fake_hub_cache(cache, "acme/tiny-llama", save_family("llama-tied", tmp_path / "model"))
    env = {"HF_HUB_CACHE": str(cache)}
    env.update({"HF_HUB_OFFLINE": "1"} if mode == "offline" else {"HF_ENDPOINT": CLOSED_PORT})
    proc, _ = run_cli(*launch_args(tmp_path / "run", "acme/tiny-llama", "train.max_steps=1"), env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    if mode != "offline":
        assert "the hub is unreachable" in proc.stdout and "using acme/tiny-llama from the local cache" in proc.stdout
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()
