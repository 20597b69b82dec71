"""Samples during training, named eval sets and the best checkpoint: one small local run read several ways,
and one two-rank ZeRO-3 LoRA run (the generation collective) without Ray."""

from __future__ import annotations

import json
import os
import random
import shutil

import pytest
import torch
from raytest import SMALL, free_port, run_cfg

from distsft.errors import ConfigError, DataError

STEPS = 3


def odd_eval_set(path) -> None:
    """Replies of Cyrillic and digits that the support data never shows: as the model learns the training
    text, its loss here rises after the first step, so the best checkpoint is not the last one."""
    r = random.Random(0)
    chars = [chr(c) for c in range(0x0400, 0x0450)] + list("0123456789")
    with open(path, "w") as f:
        for i in range(4):
            text = " ".join("".join(r.choice(chars) for _ in range(r.randint(2, 6))) for _ in range(12))
            turns = [{"role": "user", "content": f"code {i}"}, {"role": "assistant", "content": text}]
            f.write(json.dumps({"messages": turns}) + "\n")


def config(out, *extra: str):
    return run_cfg(
        out,
        "train.micro_batch_size=4",
        "train.lr=2e-3",
        f"train.max_steps={STEPS}",
        "train.eval_every=1",
        "data.eval_fraction=0.2",
        f'data.evals={{"odd": "{out / "odd.jsonl"}"}}',
        "checkpoint.every_steps=1",
        "checkpoint.keep_last=1",
        "checkpoint.best_by=odd",
        "train.samples.max_new_tokens=12",
        "checkpoint.verify_export=false",
        "logging.plot=false",
        *extra,
    )


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from distsft.launcher.run import launch_local

    out = tmp_path_factory.mktemp("evals")
    odd_eval_set(out / "odd.jsonl")
    launch_local(config(out), quiet=True)
    return out


def metrics(out) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def samples(out) -> list[dict]:
    return [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_samples_are_the_eval_prompts_and_the_exported_models_greedy_replies(run):
    """Each eval step's samples answer the first held-out conversations up to their last assistant turn,
    rendered with the generation prompt; at the last step the reply is what greedy decoding of the
    exported model gives (``distsft generate``'s path), and not what the initial weights say."""
    from transformers import AutoModelForCausalLM

    from distsft.data.prompts import prompts_from_rows
    from distsft.launcher.prepare import prepare_data
    from distsft.model.generate import greedy_reply, load_for_inference
    from distsft.model.loading import load_tokenizer, materialize_demo
    from distsft.training.evaluate import eval_sets

    cfg = config(run)
    rows = samples(run)
    assert [r["step"] for r in rows] == [s for s in range(1, STEPS + 1) for _ in range(2)]
    assert {r["eval"] for r in rows} == {"eval_loss"}
    assert all(r.get("samples_s", 0) > 0 for r in metrics(run)) and all("samples" not in r for r in metrics(run))
    tokenizer = load_tokenizer(cfg.model)
    conversations = [json.loads(x)["messages"] for x in open(SMALL)]
    render = tokenizer.apply_chat_template
    rendered = {render(c[:-1], tokenize=False, add_generation_prompt=True) for c in conversations}
    assert all(r["prompt"] in rendered for r in rows)
    data = prepare_data(cfg)
    prompts = prompts_from_rows(eval_sets(data.eval, {n: d.train for n, d in data.evals.items()}), 2)
    assert [tokenizer.decode(p.ids) for p in prompts] == [r["prompt"] for r in rows[-2:]]
    final, tok = load_for_inference(str(run / "final"))
    for p, r in zip(prompts, rows[-2:], strict=True):
        assert greedy_reply(final, tok, p.ids, 12) == r["reply"]
    initial = AutoModelForCausalLM.from_pretrained(materialize_demo(cfg.train.seed)).eval()
    assert greedy_reply(initial, tok, prompts[0].ids, 12) != rows[-2]["reply"]


@pytest.mark.slow
def test_each_named_eval_is_evaluate_dir_of_its_set_for_the_final_model(run):
    from distsft.training.evaluate import evaluate_dir

    last = metrics(run)[-1]
    assert set(last) >= {"eval_loss", "eval_loss/odd"} and last["eval_loss"] != last["eval_loss/odd"]
    loss = evaluate_dir(config(run), str(run / "final"), "odd")["loss"]
    assert loss == pytest.approx(last["eval_loss/odd"], rel=1e-5)


@pytest.mark.slow
def test_the_best_checkpoint_survives_rotation_and_export_best_exports_it(run, cli, tmp_path):
    from distsft.checkpoint import auth, best_checkpoint

    odd = [r["eval_loss/odd"] for r in metrics(run)]
    best = 1 + odd.index(min(odd))
    assert best < STEPS, odd  # the set's loss rose: the best is not the last step
    root = run / "checkpoints"
    assert sorted(p.name for p in root.glob("step-*")) == [f"step-{best:08d}", f"step-{STEPS:08d}"]
    code, out, err = cli("export", str(run), "--best", "--out", str(tmp_path / "best"))
    assert code == 0, err
    assert f"exported step {best} " in out and (tmp_path / "best" / "config.json").is_file()
    # a checkpoint claiming a better loss in a manifest this run's key did not sign is never the best
    forged = tmp_path / "ckpts"
    shutil.copytree(root, forged)
    shutil.copytree(forged / f"step-{best:08d}", forged / "step-00000009")
    manifest = json.loads((forged / "step-00000009" / "MANIFEST.json").read_text())
    manifest.update(step=9, evals={"eval_loss/odd": 0.0})
    (forged / "step-00000009" / "MANIFEST.json").write_text(json.dumps(manifest))
    assert best_checkpoint(forged).step == best
    # a run that recorded no eval at its checkpoints: one line says so
    plain = tmp_path / "plain"
    shutil.copytree(root / f"step-{STEPS:08d}", plain / f"step-{STEPS:08d}")
    manifest = json.loads((plain / f"step-{STEPS:08d}" / "MANIFEST.json").read_text())
    manifest = auth.sign({k: v for k, v in manifest.items() if k not in ("evals", "best_by", auth.FIELD)})
    (plain / f"step-{STEPS:08d}" / "MANIFEST.json").write_text(json.dumps(manifest))
    code, _, err = cli("export", str(plain), "--best")
    assert code == 2 and err.count("\n") == 1 and "no best checkpoint recorded" in err, err


@pytest.mark.slow
def test_report_shows_the_latest_samples(run, cli):
    code, out, _ = cli("report", str(run))
    lines = [x for x in out.splitlines() if x.startswith("sample ")]
    assert code == 0 and len(lines) == 2 and all(x.startswith(f"sample (step {STEPS}, eval_loss)") for x in lines)


@pytest.mark.slow
def test_samples_under_zero3_lora_on_two_ranks_are_the_exported_models_replies(tmp_path):
    """Generation under ZeRO-3 is a collective (every rank gathers each layer's weights): both ranks
    generate in step, and rank 0's reply at the last step is the exported adapter's greedy reply."""
    from evaltest import train_rank

    from distsft.checkpoint import find_latest
    from distsft.checkpoint.export import export
    from distsft.data.prompts import prompts_from_rows
    from distsft.launcher.prepare import prepare_data
    from distsft.model.generate import greedy_reply, load_for_inference
    from distsft.training.evaluate import eval_sets

    overrides = ["train.micro_batch_size=2", "train.zero_stage=3", "lora.r=8", "train.lr=1e-2", "train.max_steps=1",
                 "data.eval_fraction=0.2", "train.samples.count=1", "train.samples.max_new_tokens=12"]  # fmt: skip
    cfg = run_cfg(tmp_path, *overrides)
    data = prepare_data(cfg)
    env = {k: os.environ[k] for k in ("DISTSFT_CACHE", "XDG_CONFIG_HOME")}
    torch.multiprocessing.spawn(train_rank, args=(2, free_port(), overrides, str(tmp_path), env), nprocs=2)
    by_rank = [json.loads((tmp_path / f"records-{r}.json").read_text()) for r in range(2)]
    assert all(recs[-1]["samples_s"] > 0 for recs in by_rank) and "samples" not in by_rank[1][-1]
    (sample,) = by_rank[0][-1]["samples"]
    export(find_latest(tmp_path / "checkpoints"), tmp_path / "final")
    model, tok = load_for_inference(str(tmp_path / "final"))
    (prompt,) = prompts_from_rows(eval_sets(data.eval, {}), 1)
    assert sample["prompt"] == tok.decode(prompt.ids)
    assert greedy_reply(model, tok, prompt.ids, 12) == sample["reply"]


def test_prompts_from_a_file_are_rendered_as_generate_renders_them(tmp_path, demo_tokenizer):
    from distsft.data.prompts import prompts_from_file

    path = tmp_path / "prompts.jsonl"
    turns = [{"role": "user", "content": "Where is my parcel?"}, {"role": "assistant", "content": "Let me look."}]
    path.write_text(json.dumps({"prompt": "Hello?"}) + "\n\n" + json.dumps({"messages": turns}) + "\n")
    first, second = prompts_from_file(str(path), demo_tokenizer, 5)
    for p, messages in ((first, [{"role": "user", "content": "Hello?"}]), (second, turns[:1])):
        text = demo_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert p.ids == demo_tokenizer(text, add_special_tokens=False)["input_ids"]
    path.write_text(json.dumps({"prompt": "ok"}) + "\n" + json.dumps({"text": "no"}) + "\n")
    with pytest.raises(DataError, match=rf"{path}:2: train.samples.path: expected"):
        prompts_from_file(str(path), demo_tokenizer, 5)


def test_best_by_must_name_an_eval_that_runs():
    from distsft.config import load_config

    with pytest.raises(ConfigError, match="checkpoint.best_by: 'odd' is not an eval of this run"):
        load_config(None, ["checkpoint.best_by=odd"])
    with pytest.raises(ConfigError, match="data.evals: 'a/b': a name of letters"):
        load_config(None, ['data.evals={"a/b": "x.jsonl"}'])
