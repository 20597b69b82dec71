"""Shared fixtures: everything is built from the bundled demo files; nothing touches a hub."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# Hermetic caches: prepared data and the demo init live in a fresh directory per test session.
os.environ["DISTSFT_CACHE"] = tempfile.mkdtemp(prefix="distsft-test-cache-")
# The checkpoint key (checkpoint/auth.py) is made where a user's would be, in a fresh config home.
os.environ["XDG_CONFIG_HOME"] = tempfile.mkdtemp(prefix="distsft-test-config-")

REPO = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures"


@pytest.fixture(autouse=True)
def _checkpoint_authentication_restored():
    """A launch sets whether manifests are checked for its process (``checkpoint.authenticate``); a test
    that turns it off leaves it on for the next."""
    yield
    os.environ.pop("DISTSFT_CHECKPOINT_AUTH", None)


@pytest.fixture(scope="session")
def demo_tokenizer():
    from distsft.config import ModelConfig
    from distsft.model.loading import load_tokenizer

    return load_tokenizer(ModelConfig(path="demo"))


@pytest.fixture
def cli(capsys):
    """Run the CLI in-process; returns (exit code, stdout, stderr)."""
    from distsft.cli import main

    def run(*args: str) -> tuple[int, str, str]:
        try:
            code = main(list(args))
        except SystemExit as e:  # argparse exits on --help and usage errors
            code = e.code if isinstance(e.code, int) else 1
        out = capsys.readouterr()
        return code, out.out, out.err

    return run


@pytest.fixture(scope="module")
def ray_instance():
    """A local Ray instance shared by one test module's in-process launches (4 CPUs: 4 workers at most; no
    dashboard). Per module, not per session: an idle instance left up through the multi-host tests slows
    their replacement hosts' start past its timeout on 2 cores."""
    import ray

    ray.init(num_cpus=4, include_dashboard=False, logging_level="WARNING")
    yield
    ray.shutdown()


def python_exe() -> str:
    return sys.executable


@pytest.fixture(scope="session")
def host_reference(tmp_path_factory):
    """The multi-host tests' config (``hosts.SETS``) in one process: one worker, accumulation 4."""
    from hosts import SETS

    from distsft.config import load_config
    from distsft.launcher.run import launch_local

    out = tmp_path_factory.mktemp("one-process")
    launch_local(load_config(None, [f"output_dir={out}", *SETS]), quiet=True)
    return out


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server on loopback with a bucket ``ckpt``; yields the environment that reaches it."""
    pytest.importorskip("moto")
    import socket
    import subprocess
    import time

    from distsft.checkpoint import storage

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [os.path.join(os.path.dirname(sys.executable), "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
    }
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.1)
    import pyarrow.fs as pafs

    pafs.S3FileSystem(endpoint_override=f"127.0.0.1:{port}", scheme="http", allow_bucket_creation=True).create_dir(
        "ckpt"
    )
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    storage._buckets.clear()
    yield env
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    storage._buckets.clear()
    server.terminate()
    server.wait(timeout=30)
