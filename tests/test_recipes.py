"""The shipped recipes (``distsft/recipes/``, ``configs/`` and ``cluster/`` in a checkout): each loads, its dry
run with its own cluster file plans from its architecture file (no weights, no Hub) and fits, its header says
what that dry run prints, ``distsft recipes`` lists them all, and a copy is one that runs where it was copied to.
Dry runs build no model (the meta device): the file takes seconds."""

from __future__ import annotations

import fnmatch
import re
import tomllib

import pytest
import yaml
from conftest import REPO

from distsft import recipes

ALL = recipes.recipes()
NAMES = [r.name for r in ALL]


def plan_values(out: str, key: str) -> float:
    """A ``key: N GiB per GPU`` line of a plan, in GiB."""
    m = re.search(rf"^{key}:\s+([\d.]+) (GiB|MiB) per GPU", out, re.M)
    assert m, f"no '{key}: ... per GPU' line in:\n{out}"
    return float(m.group(1)) / (1024 if m.group(2) == "MiB" else 1)


def test_the_shipped_files_are_where_the_checkout_and_the_package_find_them():
    assert (REPO / "configs").resolve() == recipes.CONFIGS and (REPO / "cluster").resolve() == recipes.CLUSTERS
    assert {p.stem for p in (REPO / "configs").glob("*.yaml")} == set(NAMES)
    expected = {"demo", "qwen3-8b-full", "qwen3-30b-a3b-lora", "gemma3-1b-full", "mistral-7b-full",
                "gpt-oss-20b-lora", "qwen3-8b-qlora-24gb", "llama3-70b-zero3-offload"}  # fmt: skip
    assert expected <= set(NAMES)


def test_package_data_ships_every_recipe_file():
    """pyproject's package-data globs cover every file under distsft/recipes/ but the code."""
    with open(REPO / "pyproject.toml", "rb") as f:
        globs = tomllib.load(f)["tool"]["setuptools"]["package-data"]["distsft"]
    package = REPO / "distsft"
    files = [p.relative_to(package).as_posix() for p in (package / "recipes").rglob("*") if p.is_file()]
    data = [f for f in files if not f.endswith((".py", ".pyc"))]
    assert len(data) > 20
    assert [f for f in data if not any(fnmatch.fnmatch(f, g) for g in globs)] == []


@pytest.mark.parametrize("recipe", ALL, ids=NAMES)
def test_a_recipe_dry_runs_with_its_own_cluster_file_and_fits(recipe, cli, monkeypatch):
    monkeypatch.chdir(REPO)  # config_path and the command's paths are relative to a checkout (or a copy)
    assert recipe.description and recipe.command.startswith(f"distsft launch --config configs/{recipe.name}.yaml")
    args = recipe.command.split()[2:]
    code, out, err = cli("launch", *args, "--dry-run")
    assert code == 0, err
    assert re.search(r"^model:\s+\S+: [\d.]+B parameters", out, re.M), out  # planned from its architecture file
    states, act = plan_values(out, "model states"), plan_values(out, "activations")
    assert "fits:           no" not in out and "needs:" not in out, out
    cluster = yaml.safe_load((REPO / recipe.cluster).read_text()) if recipe.cluster else {}
    if (cluster.get("resources_per_worker") or {}).get("accelerator_type"):
        assert "fits:           yes" in out, out
    if recipe.name == "demo":
        return
    # the header's --dry-run line is what the dry run prints
    m = re.match(r"([\d.]+) GiB per GPU \(model states ([\d.]+) \+ activations ([\d.]+)\)", recipe.memory)
    assert m, f"{recipe.path.name}: header has no '--dry-run: N GiB per GPU (model states S + activations A)' line"
    total, s, a = map(float, m.groups())
    assert (s, a) == (states, act), out
    fits = re.search(r"^fits:\s+yes: .* = ([\d.]+) GiB of", out, re.M)
    assert total == (float(fits.group(1)) if fits else pytest.approx(states + act, abs=0.051)), out


def test_the_24gb_recipe_fits_a_24_gib_gpu(cli, monkeypatch, tmp_path):
    """cluster/single-gpu.yaml names no accelerator (any GPU can run it), so its dry run cannot say whether it
    fits; the same cluster with an L4's 24 GiB can."""
    monkeypatch.chdir(REPO)
    spec = yaml.safe_load((REPO / "cluster" / "single-gpu.yaml").read_text())
    spec["resources_per_worker"]["accelerator_type"] = "L4"
    (tmp_path / "l4.yaml").write_text(yaml.safe_dump(spec))
    code, out, err = cli(
        "launch", "--config", "configs/qwen3-8b-qlora-24gb.yaml", "--cluster", str(tmp_path / "l4.yaml"), "--dry-run"
    )
    assert code == 0, err
    assert "QLoRA (4-bit NF4 base)" in out and re.search(r"^fits:\s+yes: .* of 24 GiB \(L4", out, re.M), out


def test_the_70b_recipe_plans_4_nodes_of_8():
    r = recipes.find("llama3-70b-zero3-offload")
    assert r.cluster == "cluster/h100.yaml" and r.architecture == "configs/models/llama-3.1-70b/config.json"
    cluster = yaml.safe_load((REPO / r.cluster).read_text())
    assert (cluster["num_nodes"], cluster["workers_per_node"]) == (4, 8)


def test_every_architecture_file_is_a_plain_hf_config_a_recipe_uses():
    from transformers import AutoConfig

    used = {r.architecture for r in ALL if r.architecture}
    shipped = {p.relative_to(REPO).as_posix() for p in (REPO / "configs" / "models").glob("*/config.json")}
    assert used == shipped
    for path in shipped:
        config = AutoConfig.from_pretrained(REPO / path)
        assert config.architectures and not [k for k in config.to_dict() if k.startswith("_source")], path
        assert "quantization_config" not in config.to_dict(), path  # what trains: gpt-oss's bf16 copy


def test_distsft_recipes_lists_every_recipe(cli):
    code, out, err = cli("recipes")
    assert code == 0, err
    for r in ALL:
        assert re.search(rf"^{re.escape(r.name)}\s+{re.escape(r.description)}$", out, re.M), r.name
        assert f"model {r.model}; cluster {r.cluster or '(a Ray instance of its own)'}" in out
        if r.memory:
            assert f"dry run: {r.memory}" in out


def test_a_copied_recipe_runs_as_written_where_it_was_copied_and_nothing_is_overwritten(cli, monkeypatch, tmp_path):
    out_dir = tmp_path / "mine"
    code, out, err = cli("recipes", "qwen3-8b-full", "--out", str(out_dir))
    assert code == 0, err
    copied = {p.relative_to(out_dir).as_posix() for p in out_dir.rglob("*") if p.is_file()}
    assert copied == {"configs/qwen3-8b-full.yaml", "cluster/h100-node.yaml", "configs/models/qwen3-8b/config.json"}
    assert all((REPO / f).read_bytes() == (out_dir / f).read_bytes() for f in copied)
    command = out.strip().splitlines()[-1]
    assert "distsft launch --config configs/qwen3-8b-full.yaml --cluster cluster/h100-node.yaml --dry-run" in command

    monkeypatch.chdir(out_dir)  # the command, from the copy: the architecture file is found there
    code, plan, err = cli("launch", "--config", "configs/qwen3-8b-full.yaml", "--cluster", "cluster/h100-node.yaml",
                          "--dry-run")  # fmt: skip
    assert code == 0 and "Qwen/Qwen3-8B: 8.19B parameters" in plan and "fits:           yes" in plan, plan + err

    # a recipe sharing the cluster file: the same file is kept; a file that differs stops the copy, in one line
    code, out, err = cli("recipes", "gpt-oss-20b-lora")
    assert code == 0 and "kept  cluster/h100-node.yaml (already there, the same)" in out, err
    mine = out_dir / "configs" / "qwen3-8b-full.yaml"
    mine.write_text(mine.read_text().replace("lr: 1.0e-5", "lr: 2.0e-5"))
    before = mine.read_text()
    code, out, err = cli("recipes", "qwen3-8b-full")
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1, (out, err)
    assert "configs/qwen3-8b-full.yaml exists and differs from the recipe's: not overwritten" in err
    assert mine.read_text() == before

    code, out, err = cli("recipes", "qwen3-8b-ful")
    assert code == 2 and err.strip() == "distsft recipes: error: no recipe 'qwen3-8b-ful'; did you mean qwen3-8b-full?"
