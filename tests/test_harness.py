"""`distsft eval --tasks`: lm-evaluation-harness on local task files, a fine-tuned model beside its base.

The accuracies the harness reports are checked against log-likelihoods computed here with the model itself,
and generation against the model's own greedy answers, on two tiny models saved with the demo tokenizer.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval")

TASK_YAML = """
task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
"""
MC = """output_type: multiple_choice
doc_to_text: "Q: {{question}}\\nA:"
doc_to_choice: choices
doc_to_target: answer
metric_list:
  - {metric: acc, aggregation: mean, higher_is_better: true}
  - {metric: acc_norm, aggregation: mean, higher_is_better: true}
"""
GEN = """output_type: generate_until
doc_to_text: "Q: {{question}}\\nA:"
doc_to_target: answer
generation_kwargs:
  until: ["\\n"]
  do_sample: false
  max_gen_toks: 6
metric_list:
  - {metric: exact_match, aggregation: mean, higher_is_better: true}
"""
WORDS = "router refund parcel invoice password modem signal plan update cable phone account".split()


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """A 32-wide model's matmuls gain nothing from threads and lose much on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Two tiny Llamas with the demo tokenizer: "base", and "tuned" (the same weights, perturbed)."""
    from tinymodels import tiny_llama
    from transformers import AutoTokenizer

    from distsft.model.loading import DEMO_TOKENIZER

    tok = AutoTokenizer.from_pretrained(str(DEMO_TOKENIZER))
    root = tmp_path_factory.mktemp("harness")
    for name, scale in (("base", 0.0), ("tuned", 0.5)):
        model = tiny_llama(vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(scale * p.std() * torch.randn(p.shape, generator=gen))
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    return root / "base", root / "tuned"


@pytest.fixture(scope="module")
def mc_tasks(tmp_path_factory):
    """A multiple-choice task of 40 rows (4 choices of 1-3 words each), in a directory of its own."""
    rng = random.Random(0)
    root = tmp_path_factory.mktemp("tasks")
    rows = [
        {
            "question": " ".join(rng.choices(WORDS, k=4)),
            "choices": [" ".join(rng.choices(WORDS, k=rng.randint(1, 3))) for _ in range(4)],
            "answer": rng.randrange(4),
        }
        for _ in range(40)
    ]
    (root / "data").mkdir()
    (root / "data" / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "mc.yaml").write_text(TASK_YAML.format(name="toy_mc", data="data/mc.jsonl") + MC)
    return root, rows


def loglikelihood(model, tok, context: str, continuation: str) -> float:
    """log p(continuation | context), split into tokens as a causal LM harness does: the pair encoded whole,
    the context's own tokens cut off the front (trailing spaces moved to the continuation)."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    ctx = tok.encode(context)
    whole = tok.encode(context + continuation)
    cont = whole[len(ctx) :]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([whole[:-1]])).logits[0].double(), -1)
    return sum(logp[len(ctx) - 1 + i, t].item() for i, t in enumerate(cont))


def expected_accuracy(model_dir: Path, rows: list[dict], chat: bool) -> dict[str, float]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    acc = acc_norm = 0
    for row in rows:
        prompt = f"Q: {row['question']}\nA:"
        if chat:  # the prompt as the user's turn; the choice follows the assistant header with no space
            msgs = [{"role": "user", "content": prompt}]
            context, delimiter = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True), ""
        else:
            context, delimiter = prompt, " "
        scores = [loglikelihood(model, tok, context, delimiter + c) for c in row["choices"]]
        lengths = [len(c) for c in row["choices"]]  # characters of the choice alone
        acc += max(range(4), key=lambda i: scores[i]) == row["answer"]
        acc_norm += max(range(4), key=lambda i: scores[i] / lengths[i]) == row["answer"]
    return {"acc": acc / len(rows), "acc_norm": acc_norm / len(rows)}


@pytest.mark.parametrize("chat", [False, True], ids=["plain", "chat-template"])
def test_multiple_choice_accuracy_equals_one_computed_from_the_models_loglikelihoods(
    cli, tmp_path, models, mc_tasks, chat
):
    base, tuned = models
    root, rows = mc_tasks
    out = tmp_path / "report.json"
    args = ["eval", "--model", str(tuned), "--base", str(base), "--tasks", "toy_mc", "--include-path", str(root)]
    code, stdout, err = cli(*args, "--out", str(out), *(["--chat-template"] if chat else []))
    assert code == 0, err
    report = json.loads(out.read_text())
    got = {
        (r["metric"], which): r[key] for r in report["rows"] for which, key in (("base", "base"), ("tuned", "tuned"))
    }
    for which, model_dir in (("base", base), ("tuned", tuned)):
        want = expected_accuracy(model_dir, rows, chat)
        for metric in ("acc", "acc_norm"):
            assert got[(metric, which)] == pytest.approx(want[metric]), (which, metric)
    acc = next(r for r in report["rows"] if r["metric"] == "acc")
    assert acc["tuned"] != acc["base"]  # the two models really are told apart
    assert acc["delta"] == pytest.approx(acc["tuned"] - acc["base"]) and acc["samples"] == 40
    assert 0 < acc["stderr"] < 0.2 and acc["base_stderr"] > 0
    table = stdout.strip().splitlines()
    assert table[0].split() == ["task", "metric", "n", "base", "fine-tuned", "delta", "stderr"]
    assert table[2].split() == [
        "toy_mc", "acc", "40", f"{acc['base']:.4f}", f"{acc['tuned']:.4f}", f"{acc['delta']:+.4f}",
        f"{acc['stderr']:.4f}",
    ]  # fmt: skip


def test_generation_exact_match_counts_the_rows_whose_answer_is_the_models_greedy_output(cli, tmp_path, models):
    """Half the answers are set to what the model generates greedily (up to the stop string), half to text it
    cannot produce: exact_match is then 0.5, for the shipped example's metric settings too."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, tuned = models
    tok = AutoTokenizer.from_pretrained(str(tuned))
    model = AutoModelForCausalLM.from_pretrained(str(tuned)).eval()
    rows = []
    for i, question in enumerate(["router", "refund parcel", "modem signal plan", "phone cable"]):
        ids = torch.tensor([tok.encode(f"Q: {question}\nA:")])
        with torch.no_grad():
            new = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)[
                0, ids.shape[1] :
            ]
        greedy = tok.decode(new).split("\n")[0].split(tok.eos_token)[0]
        rows.append({"question": question, "answer": greedy if i % 2 == 0 else "Zq Zq"})
    (tmp_path / "gen.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "gen.yaml").write_text(TASK_YAML.format(name="toy_gen", data="gen.jsonl") + GEN)
    code, stdout, err = cli("eval", "--model", str(tuned), "--tasks", str(tmp_path / "gen.yaml"))
    assert code == 0, err
    line = stdout.strip().splitlines()[2].split()
    assert line[:3] == ["toy_gen", "exact_match", "4"] and line[3] == "-" and float(line[4]) == 0.5


def test_the_shipped_examples_run_and_a_lora_adapter_is_compared_with_its_base(cli, tmp_path, models):
    """An adapter directory (how distsft exports a LoRA run) loads on the base it names, which is then the
    default --base; that base is bare weights (as the demo's is), so it is read with the adapter's tokenizer.
    An adapter initialised to zero scores exactly as its base."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = tmp_path / "bare"
    AutoModelForCausalLM.from_pretrained(str(models[0])).save_pretrained(base)  # no tokenizer files
    adapter = tmp_path / "adapter"
    peft_model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(str(base)), LoraConfig(r=2, target_modules=["q_proj"])
    )
    peft_model.save_pretrained(adapter)
    AutoTokenizer.from_pretrained(str(models[0])).save_pretrained(adapter)
    code, stdout, err = cli("eval", "--model", str(adapter), "--tasks", "distsft_support_mc,distsft_support_gen")
    assert code == 0, err
    assert f"base: {base}" in err
    rows = [line.split() for line in stdout.strip().splitlines()[2:]]
    assert [r[:3] for r in rows] == [
        ["distsft_support_mc", "acc", "6"],
        ["distsft_support_mc", "acc_norm", "6"],
        ["distsft_support_gen", "exact_match", "4"],
    ]
    assert all(r[3] == r[4] and float(r[5]) == 0 for r in rows)  # B = 0: the adapter changes nothing yet


def test_user_errors_are_one_line(cli, tmp_path, models, monkeypatch):
    base, _ = models
    hub = tmp_path / "hub"
    hub.mkdir()
    (hub / "mmlu.yaml").write_text("task: my_mmlu\ndataset_path: cais/mmlu\ntest_split: test\n" + MC)
    (hub / "missing.yaml").write_text(TASK_YAML.format(name="no_file", data="nowhere.jsonl") + MC)
    cases = {
        ("--tasks", "distsft_suport_mc"): "unknown task 'distsft_suport_mc'; did you mean distsft_support_mc? "
        "the task paths hold distsft_support_gen, distsft_support_mc",
        ("--tasks", "my_mmlu", "--include-path", str(hub)): "dataset_path 'cais/mmlu' would be read from the "
        "Hugging Face hub, and distsft eval runs offline",
        ("--tasks", "no_file", "--include-path", str(hub)): f"data file {hub / 'nowhere.jsonl'} not found",
        ("--limit", "3"): "--limit go with --tasks",
        ("--tasks", "distsft_support_mc", "--set", "train.lr=1"): "--config/--set choose the loss evaluation's",
        # before --model's tasks run (they once did, then this failed)
        ("--tasks", "distsft_support_mc", "--base", "demo"): "--base demo: not a model directory",
    }
    for args, message in cases.items():
        code, _, err = cli("eval", "--model", str(base), *args)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (args, err)
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if the extra were not installed
    code, _, err = cli("eval", "--model", str(base), "--tasks", "distsft_support_mc")
    assert code == 2 and err.strip().endswith("is not installed: pip install 'distsft[eval]'"), err


def test_shipped_example_tasks_are_package_data():
    import tomllib

    from distsft.harness.tasks import EXAMPLES

    with open(Path(__file__).resolve().parent.parent / "pyproject.toml", "rb") as f:
        globs = tomllib.load(f)["tool"]["setuptools"]["package-data"]["distsft"]
    files = sorted(p for p in EXAMPLES.rglob("*") if p.is_file())
    assert {p.suffix for p in files} == {".yaml", ".jsonl"}
    package = EXAMPLES.parent.parent
    assert all(any(p.relative_to(package).match(g) for g in globs) for p in files), files
