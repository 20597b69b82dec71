"""The docs site: every config key documents itself (the reference is generated from the field docstrings), and the
site builds with ``mkdocs build --strict`` (no broken link or anchor, every page in the nav, every metrics.jsonl
field described)."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def gen_reference():
    """``docs/gen_reference.py``, the MkDocs hook that generates the reference pages, as a module."""
    spec = importlib.util.spec_from_file_location("gen_reference", ROOT / "docs" / "gen_reference.py")
    if spec.name not in sys.modules:  # its dataclasses look their module up there
        sys.modules[spec.name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[spec.name])
    return sys.modules[spec.name]


def test_every_run_config_and_cluster_key_has_a_docstring():
    ref = gen_reference()
    run, cluster = ref.run_config_keys(), ref.cluster_keys()
    found = {k.name for k in run} | {k.name for k in cluster}
    expected = {"train.lr", "data.path[].weight", "logging.profile_steps", "resources_per_worker.gpus", "storage_path"}
    assert expected <= found, "the walk found too little"
    missing = [f"run config: {k}" for k in ref.undocumented(run)] + [f"cluster: {k}" for k in ref.undocumented(cluster)]
    assert not missing, (
        "config keys without a docstring (add a string literal on the line after the field in distsft/config/):\n"
        + "\n".join(missing)
    )


def test_the_docstring_check_finds_a_field_without_one():
    from dataclasses import dataclass

    ref = gen_reference()

    @dataclass(frozen=True)
    class Section:
        documented: int = 1
        """Said."""
        bare: str = "x"

    keys = ref.config_keys(Section)
    assert [(k.name, k.type, k.default) for k in keys] == [("documented", "int", "1"), ("bare", "str", "x")]
    assert ref.undocumented(keys) == ["bare"]


def test_every_metrics_field_written_is_described():
    ref = gen_reference()
    written = ref.metric_keys_in_code()
    assert {"loss", "grad_norm", "tokens_per_s", "mfu", "eval_loss", "step_time_s"} <= written, (
        "the walk found too little"
    )
    assert written == set(ref.METRIC_FIELDS), (
        f"metrics.jsonl fields written but not described in docs/gen_reference.py METRIC_FIELDS: "
        f"{sorted(written - set(ref.METRIC_FIELDS))}; described but no longer written: "
        f"{sorted(set(ref.METRIC_FIELDS) - written)}"
    )


def test_the_docs_site_builds_strictly(tmp_path):
    mkdocs = shutil.which("mkdocs", path=str(Path(sys.executable).parent)) or shutil.which("mkdocs")
    if mkdocs is None or importlib.util.find_spec("material") is None:
        pytest.skip("mkdocs and mkdocs-material are not installed (pip install -e '.[docs]')")
    site = tmp_path / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    done = subprocess.run(
        [mkdocs, "build", "--strict", "-d", str(site)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stdout + done.stderr
    for page in ("index.html", *(f"reference/{p}/index.html" for p in ("config", "cluster", "cli", "metrics"))):
        assert (site / page).is_file(), page
    config = (site / "reference/config/index.html").read_text(encoding="utf-8")
    said = next(k.doc for k in gen_reference().run_config_keys() if k.name == "model.path").split(",")[0]
    assert 'id="model.path"' in config and said in config  # a field's docstring reached its page
    assert not (ROOT / "docs" / "reference").exists(), "generated pages must stay out of docs/ (and git)"
