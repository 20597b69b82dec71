"""Two engines, one set of data rules: preparing on Ray Data gives exactly the local engine's rows, the
prepared cache is built atomically, and a launch that prepares on Ray Data trains as the local one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import REPO

from distsft.config import DataConfig, DataSource
from distsft.data import chunks
from distsft.data.passes import LocalRunner
from distsft.data.prepare import prepare

pytestmark = pytest.mark.slow


def _mixed_corpus(tmp_path):
    """Several chunks (CHUNK_ROWS is cut to 40), bad rows and blank lines across chunk boundaries: a JSONL
    file, a Parquet file with its own format, a saved DatasetDict."""
    import datasets

    demo = [json.loads(x) for x in (REPO / "distsft/demo/data/support.jsonl").read_text().splitlines()][:150]
    lines = [json.dumps(r) for r in demo]
    lines[41:41] = ["{broken", "", '{"messages": []}']
    (tmp_path / "a.jsonl").write_text("\n".join(lines))  # no newline at the end: the last line still counts
    rows = [{"instruction": f"Question {i}?", "input": "", "output": f"Answer {i}."} for i in range(90)]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "b.parquet"), batch_size=16)  # 6 row groups
    prompts = [{"prompt": f"Say {i}.", "completion": f"{i}"} for i in range(45)]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(prompts)}).save_to_disk(str(tmp_path / "saved"))
    return [str(tmp_path / "a.jsonl"), DataSource(path=str(tmp_path / "b.parquet"), format="alpaca"),
            str(tmp_path / "saved")]  # fmt: skip


def _table(data):
    return {"train": data.train.to_dict(), "eval": data.eval.to_dict() if len(data.eval) else {}}


def test_ray_data_and_local_engines_prepare_the_same_rows(ray_instance, tmp_path, demo_tokenizer, monkeypatch):
    from distsft.launcher.ray_data import RayRunner

    monkeypatch.setattr(chunks, "CHUNK_ROWS", 40)
    spec = _mixed_corpus(tmp_path)

    def cfg(cache: str) -> DataConfig:
        return DataConfig(path=spec, cache_dir=str(tmp_path / cache), max_seq_len=256, eval_fraction=0.05,
                          on_error="skip")  # fmt: skip

    local = prepare(cfg("local"), demo_tokenizer, seed=3, runner=LocalRunner(1))
    forked = prepare(cfg("forked"), demo_tokenizer, seed=3, runner=LocalRunner(2))
    ray = prepare(cfg("ray"), demo_tokenizer, seed=3, runner=RayRunner())
    assert not ray.cache_hit and ray.cache_dir.name == local.cache_dir.name  # one fingerprint for both
    assert _table(ray) == _table(local) == _table(forked)
    assert ray.stats == local.stats
    assert local.stats.rows_read == 240 + 2 + 45 and local.stats.rejected == 2 and local.stats.eval_rows > 0
    assert [(r["line"], r["reason"].split(":")[0]) for r in ray.rejected] == [
        (42, "invalid JSON"),
        (44, "empty conversation"),
    ]
    parts = list((tmp_path / "ray" / ray.cache_dir.name / "train").glob("*.arrow"))
    assert len(parts) == 4 + 2 + 2  # 153 lines in chunks of 40; 6 row groups of 16 rows -> 48 + 42; 40 + 5
    # every example exactly once: the supervised tokens of the rows are the examples'
    total = sum(sum(1 for t in r if t != -100) for r in list(ray.train["labels"]) + list(ray.eval["labels"]))
    assert total == ray.stats.supervised_tokens


def test_a_source_ray_data_cannot_read_is_one_line(ray_instance, tmp_path, demo_tokenizer):
    from distsft.errors import DataError
    from distsft.launcher.ray_data import RayRunner

    (tmp_path / "b.json").write_text(json.dumps([{"instruction": "a", "output": "b"}]))
    cfg = DataConfig(path=str(tmp_path / "b.json"), cache_dir=str(tmp_path / "c"))
    with pytest.raises(DataError, match=r"data.engine = ray reads JSONL and Parquet files and saved .*b.json \(json\)"):
        prepare(cfg, demo_tokenizer, seed=0, runner=RayRunner())
    assert not list((tmp_path / "c").glob("*"))  # refused before any work: nothing half-built left behind


def test_a_preparation_killed_midway_leaves_no_cache_that_is_used(tmp_path):
    """SIGKILL while chunks are being written: the half-built entry is never read; the next prepare builds
    the entry whole (and removes what the dead one left)."""
    rows = [{"messages": [{"role": "user", "content": f"q{i} " * 20}, {"role": "assistant", "content": f"a{i} " * 40}]}
            for i in range(30_000)]  # fmt: skip
    data = tmp_path / "big.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cache = tmp_path / "cache"
    cmd = [sys.executable, "-m", "distsft", "prepare", "--set", f"data.path={data}", "--set", f"data.cache_dir={cache}"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not list(cache.glob("*.tmp*/examples/*.arrow")):
        time.sleep(0.05)
    time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert list(cache.glob("*.tmp*")), "the kill came too late to test anything"
    assert not list(cache.glob("*/meta.json"))  # nothing complete, so nothing a launch would use
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "cache               built" in done.stdout and "rows_read           30000" in done.stdout
    assert not list(cache.glob("*.tmp*")) and len(list(cache.glob("*/meta.json"))) == 1


def test_a_launch_that_prepares_on_ray_data_trains_as_the_local_run(ray_instance, tmp_path):
    """Loss equivalence through the whole path: rows prepared by Ray Data, read memory-mapped by 2 Ray
    workers, against one process that prepared them locally."""
    from raytest import assert_same_run, cluster, run_cfg

    from distsft.launcher.run import launch_local, launch_ray

    ref, run = tmp_path / "ref", tmp_path / "ray"
    caches = tmp_path / "cache-local", tmp_path / "cache-ray"
    launch_local(run_cfg(ref, "train.micro_batch_size=1", "train.grad_accum_steps=4",
                         f"data.cache_dir={caches[0]}"), quiet=True)  # fmt: skip
    launch_ray(run_cfg(run, "train.micro_batch_size=1", "train.grad_accum_steps=2", "data.engine=ray",
                       f"data.cache_dir={caches[1]}"), cluster(2), quiet=True)  # fmt: skip
    assert_same_run(ref, run)
    assert "on Ray Data]" in (run / "logs" / "driver.log").read_text()


def test_a_weighted_mixture_is_the_same_on_every_engine_and_holds_the_shares_asked(
    ray_instance, tmp_path, demo_tokenizer, monkeypatch
):
    """Two sources weighed 0.7 / 0.3 of the tokens (the small one repeated, the large one sampled down),
    a third counted (epochs 1.5): a seeded choice, the same rows on Ray Data and locally, the shares
    reported per source, and another seed another mixture."""
    from distsft.launcher.ray_data import RayRunner

    monkeypatch.setattr(chunks, "CHUNK_ROWS", 40)
    demo = (REPO / "distsft/demo/data/support.jsonl").read_text().splitlines()
    (tmp_path / "big.jsonl").write_text("\n".join(demo[:300]) + "\n")
    (tmp_path / "small.jsonl").write_text("\n".join(demo[300:340]) + "\n")

    def cfg(cache: str, spec) -> DataConfig:
        return DataConfig(path=spec, cache_dir=str(tmp_path / cache), max_seq_len=256, eval_fraction=0.05)

    weighed = [DataSource(path=str(tmp_path / "big.jsonl"), weight=0.7),
               DataSource(path=str(tmp_path / "small.jsonl"), weight=0.3)]  # fmt: skip
    local = prepare(cfg("local", weighed), demo_tokenizer, seed=3, runner=LocalRunner(1))
    ray = prepare(cfg("ray", weighed), demo_tokenizer, seed=3, runner=RayRunner())
    assert _table(ray) == _table(local) and ray.stats == local.stats
    shares = [s["share"] for s in local.stats.sources]
    assert abs(shares[0] - 0.7) < 0.03 and abs(shares[1] - 0.3) < 0.03, local.stats.sources
    assert local.stats.sources[1]["examples"] > 40  # the small source repeated to reach its share
    plain = prepare(cfg("plain", [str(tmp_path / "big.jsonl"), str(tmp_path / "small.jsonl")]), demo_tokenizer, 3)
    assert plain.cache_dir.name != local.cache_dir.name  # the weights are part of the data's fingerprint
    assert [s["examples"] for s in plain.stats.sources] == [285, 38]  # 5 % held out of 323 kept examples
    other = prepare(cfg("other", weighed), demo_tokenizer, seed=4, runner=LocalRunner(1))
    assert _table(other) != _table(local)
    counted = [DataSource(path=str(tmp_path / "small.jsonl"), epochs=1.5), str(tmp_path / "big.jsonl")]
    once = prepare(cfg("once", [str(tmp_path / "small.jsonl"), str(tmp_path / "big.jsonl")]), demo_tokenizer, 3)
    data = prepare(cfg("counted", counted), demo_tokenizer, seed=3)
    small, big = (s["examples"] for s in once.stats.sources)
    assert [s["examples"] for s in data.stats.sources] == [round(1.5 * small), big]  # the other one once
