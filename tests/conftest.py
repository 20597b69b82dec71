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

REPO = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures"


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
    """A local Ray instance shared by one test module's in-process launches (4 CPUs: 4 workers at most)."""
    import ray

    ray.init(num_cpus=4, dashboard_host="127.0.0.1", logging_level="WARNING")
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
