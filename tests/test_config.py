from __future__ import annotations

import pytest
import yaml

from distsft.config import BatchPlan, Config, build_config, dump_config, load_config, parse_override
from distsft.errors import ConfigError


def write(tmp_path, text: str):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_demo_config_loads_with_defaults():
    cfg = load_config()
    assert cfg.model.path == "demo" and cfg.data.path == "demo"
    assert cfg.train.micro_batch_size >= 1


def test_unknown_key_names_file_line_and_nearest_key(tmp_path):
    p = write(tmp_path, "output_dir: x\ntrain:\n  lr: 1.0e-4\n  micro_bach_size: 2\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert f"{p}:4" in msg
    assert "train.micro_bach_size" in msg
    assert "did you mean train.micro_batch_size" in msg


def test_unknown_section_suggests_nearest(tmp_path):
    p = write(tmp_path, "trian:\n  lr: 1.0\n")
    with pytest.raises(ConfigError, match=r"unknown key 'trian'; did you mean train\?"):
        load_config(p)


def test_wrong_type_names_key_and_allowed(tmp_path):
    p = write(tmp_path, "data:\n  packing: maybe\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert f"{p}:2" in str(e.value) and "data.packing" in str(e.value) and "true or false" in str(e.value)


def test_out_of_range_names_key_and_allowed(tmp_path):
    p = write(tmp_path, "train:\n  micro_batch_size: 0\n")
    with pytest.raises(ConfigError, match=r"train.micro_batch_size = 0 is out of range; allowed: an integer >= 1"):
        load_config(p)


def test_literal_typo_suggests_choice(tmp_path):
    p = write(tmp_path, "data:\n  format: alpacca\n")
    with pytest.raises(ConfigError, match="did you mean 'alpaca'"):
        load_config(p)


def test_invalid_yaml_names_line(tmp_path):
    p = write(tmp_path, "train:\n  lr: [1, 2\n")
    with pytest.raises(ConfigError, match=r"c.yaml:\d+: invalid YAML"):
        load_config(p)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_overrides_are_typed():
    cfg = load_config(
        None,
        ["train.lr=1e-5", "train.micro_batch_size=3", "data.packing=false", "data.path=[a.jsonl, b.jsonl]"],
    )
    assert cfg.train.lr == 1e-5 and isinstance(cfg.train.lr, float)
    assert cfg.train.micro_batch_size == 3
    assert cfg.data.packing is False
    assert cfg.data.path == ["a.jsonl", "b.jsonl"]


def test_override_errors_point_at_set():
    with pytest.raises(ConfigError, match=r"--set: train.epochs = -1 is out of range"):
        load_config(None, ["train.epochs=-1"])
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        parse_override("train.lr")
    with pytest.raises(ConfigError, match="did you mean train.lr"):
        load_config(None, ["train.lrr=1"])


def test_zero_stage_accepts_stages_and_json_paths():
    assert build_config({"train": {"zero_stage": 3}}).train.zero_stage == 3
    assert build_config({"train": {"zero_stage": "3_offload"}}).train.zero_stage == "3_offload"
    assert build_config({"train": {"zero_stage": "my.json"}}).train.zero_stage == "my.json"
    with pytest.raises(ConfigError, match="train.zero_stage"):
        build_config({"train": {"zero_stage": 4}})


def test_batch_arithmetic_lives_in_one_place():
    cfg = build_config({"train": {"micro_batch_size": 3, "grad_accum_steps": 4}})
    plan = cfg.batch_plan(world_size=8)
    assert plan == BatchPlan(3, 4, 8)
    assert plan.global_batch == 96 and plan.rows_per_rank == 12


def test_dump_round_trips():
    cfg = load_config(None, ["train.lr=0.5"])
    again = build_config(yaml.safe_load(dump_config(cfg)))
    assert again == cfg
    assert isinstance(again, Config)


def test_config_is_frozen():
    cfg = load_config()
    with pytest.raises(AttributeError):
        cfg.train.lr = 1.0  # type: ignore[misc]


def test_zero_stage_0_and_deepspeed_json_paths_are_settled_at_load(tmp_path):
    """Stage 0 (DeepSpeed without ZeRO) is a stage like the others, on any number of workers; a JSON path
    that does not exist, or holds no usable config, is refused when the config is loaded, naming the key."""
    from distsft.training.engine import deepspeed_plan

    cfg = load_config(None, ["train.zero_stage=0"])
    assert deepspeed_plan(cfg, 4).stage == 0 and deepspeed_plan(cfg, 4).loop_clips
    assert deepspeed_plan(load_config(None, ["train.zero_stage=2"]), 1).stage == 0  # one worker partitions nothing
    assert deepspeed_plan(load_config(None, ["train.zero_stage=2"]), 2).stage == 2
    with pytest.raises(ConfigError, match=r"--set: train.zero_stage: .*nope.json: DeepSpeed config file not found"):
        load_config(None, [f"train.zero_stage={tmp_path / 'nope.json'}"])
    bad = tmp_path / "bad.json"
    bad.write_text('{"zero_optimization": {"stage": 5}}')
    with pytest.raises(
        ConfigError, match=r"train.zero_stage: .*bad.json: zero_optimization.stage must be 0, 1, 2 or 3"
    ):
        load_config(None, [f"train.zero_stage={bad}"])
    good = tmp_path / "mine.json"
    good.write_text('{"train_batch_size": "auto", "zero_optimization": {"stage": 3}}')
    assert deepspeed_plan(load_config(None, [f"train.zero_stage={good}"]), 2).stage == 3


def test_every_problem_of_a_config_is_reported_at_once(tmp_path):
    p = write(tmp_path, "train:\n  lr: -1\n  micro_bach_size: 2\ndata:\n  packing: maybe\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert msg.startswith("3 problems:")
    assert f"{p}:2: train.lr" in msg and f"{p}:3: unknown key 'train.micro_bach_size'" in msg
    assert f"{p}:5: data.packing" in msg
    with pytest.raises(ConfigError) as e:  # valid keys that do not fit together: every pair is named
        load_config(None, ["model.quantization=4bit", "lora.modules_to_save=[lm_head]", "train.sequence_parallel=3"])
    msg = str(e.value)
    assert msg.startswith("3 problems:")
    assert "model.quantization: 4bit quantises" in msg and "lora.modules_to_save" in msg
    assert "train.sequence_parallel: 3 does not divide" in msg


def test_a_chat_template_is_a_file_or_inline_jinja(tmp_path):
    with pytest.raises(ConfigError, match=r"--set: model.chat_template: .*none.jinja: no such file"):
        load_config(None, [f"model.chat_template={tmp_path / 'none.jinja'}"])
    assert load_config(None, ["model.chat_template={{ messages[0]['content'] }}"]).model.chat_template.startswith("{{")
    (tmp_path / "t.jinja").write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    assert load_config(None, [f"model.chat_template={tmp_path / 't.jinja'}"]).model.chat_template.endswith("t.jinja")


def test_a_weighted_mixture_needs_every_weight_and_weighs_or_counts_an_entry(tmp_path):
    base = "data.path=[{path: a.jsonl, weight: 0.7}, {path: b.jsonl}]"
    with pytest.raises(ConfigError, match="give every entry one"):
        load_config(None, [base])
    with pytest.raises(ConfigError, match=r"weighed \(weight\) or counted \(epochs, max_examples\), not both"):
        load_config(None, ["data.path=[{path: a.jsonl, weight: 0.7, epochs: 2}, {path: b.jsonl, weight: 1}]"])
    with pytest.raises(ConfigError, match="weight"):
        load_config(None, ["data.path=[{path: a.jsonl, weight: -1}, {path: b.jsonl, weight: 1}]"])
    cfg = load_config(None, ["data.path=[{path: a.jsonl, weight: 0.7}, {path: b.jsonl, weight: 0.3}]"])
    assert [e.weight for e in cfg.data.path] == [0.7, 0.3]


@pytest.mark.parametrize(
    "override", ["train.lr=.inf", "train.epochs=.inf", "train.lr=.nan", "train.max_grad_norm=-.inf"]
)
def test_non_finite_numbers_are_refused_at_load(override):
    """``v > 0`` holds for inf: a run on ``train.lr=.inf`` trained on NaN, saved and exported it."""
    with pytest.raises(ConfigError, match="expected a finite number"):
        load_config(None, [override])


def test_duplicate_keys_alias_bombs_and_other_encodings_are_one_line(tmp_path):
    """YAML keeps a duplicate key's last value silently; nested aliases expand to billions of values (the
    loader hung); a Latin-1 byte gave a traceback. Each is one line naming the file (and line)."""
    dup = tmp_path / "dup.yaml"
    dup.write_text("train:\n  lr: 1e-4\n  epochs: 2\n  lr: 3e-4\n")
    with pytest.raises(ConfigError, match=r"dup.yaml:4: duplicate key train.lr \(first at line 2\)"):
        load_config(dup)
    levels = ['a: &a ["x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    for prev, name in zip("abcdef", "bcdefg", strict=True):
        levels.append(f"{name}: &{name} [{', '.join([f'*{prev}'] * 9)}]")
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("\n".join(levels) + "\ntrain: {lr: *g}\n")
    with pytest.raises(ConfigError, match="values once its aliases are expanded"):
        load_config(bomb)
    latin = tmp_path / "latin.yaml"
    latin.write_bytes(b"train:\n  lr: 1e-4  # caf\xe9\n")
    with pytest.raises(ConfigError, match=r"latin.yaml:2: not UTF-8 text"):
        load_config(latin)


TRL_STYLE = """\
model_name_or_path: demo
learning_rate: 1.0e-4
num_train_epochs: 2
per_device_train_batch_size: 2
gradient_accumulation_steps: 4
warmup_ratio: 0.03
lr_scheduler_type: constant_with_warmup
weight_decay: 0.01
adam_beta2: 0.999
adam_epsilon: 1.0e-6
logging_steps: 5
save_steps: 50
save_total_limit: 3
max_length: 512
assistant_only_loss: true
bf16: true
train:
  seed: 7
"""


def test_a_migrating_teams_names_are_read_as_ours_each_with_one_notice(tmp_path, capsys):
    p = tmp_path / "sft.yaml"
    p.write_text(TRL_STYLE)
    cfg = load_config(p)
    t = cfg.train
    assert (t.lr, t.epochs, t.micro_batch_size, t.grad_accum_steps, t.warmup_ratio) == (1e-4, 2.0, 2, 4, 0.03)
    assert (t.lr_scheduler, t.weight_decay, t.adam_betas, t.adam_eps, t.log_every) == (
        "constant", 0.01, (0.9, 0.999), 1e-6, 5
    )  # fmt: skip
    assert (cfg.checkpoint.every_steps, cfg.checkpoint.keep_last, cfg.data.max_seq_len) == (50, 3, 512)
    assert (cfg.data.train_on, cfg.model.dtype, cfg.model.path, t.seed) == ("assistant", "bfloat16", "demo", 7)
    assert cfg.output_dir == "runs/sft"  # its own, from the file's name: never the demo's runs/demo
    notices = capsys.readouterr().err.splitlines()
    assert len(notices) == 16 and f"config: {p}:2: learning_rate (TrainingArguments) read as train.lr" in notices
    assert (
        f"config: {p}:4: per_device_train_batch_size (TrainingArguments) read as train.micro_batch_size" in (notices[3])
    )


def test_foreign_names_without_an_equal_or_set_twice_are_refused_in_one_line_each(tmp_path):
    p = tmp_path / "sft.yaml"
    p.write_text("learning_rate: 1.0e-4\ntrain:\n  lr: 2.0e-5\n  optim: adamw_torch\nreport_to: wandb\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    said = str(e.value)
    assert said.startswith("3 problems:\n")
    assert f"{p}:1: learning_rate (TrainingArguments's name for train.lr) and train.lr are both set" in said
    assert f"{p}:4: train.optim has no equal in distsft: distsft trains with AdamW" in said
    assert f"{p}:5: report_to has no equal in distsft: logging.tensorboard" in said
    # a value of the wrong type is named at the alias's own line
    p.write_text("learning_rate: fast\n")
    with pytest.raises(ConfigError, match=rf"^{p}:1: train.lr = 'fast' is invalid: expected a number$"):
        load_config(p)


def test_the_schedules_and_warmup_ratio_mean_what_hugging_face_means():
    from distsft.training.engine import lr_lambda, warmup_steps

    cfg = load_config(None, ["train.warmup_ratio=0.1", "train.warmup_steps=0"])  # the demo warms up by steps
    assert warmup_steps(cfg, 95) == 10  # ceil(9.5), as transformers' get_warmup_steps
    cos, lin, const = (lr_lambda(11, 1, 0.0, s) for s in ("cosine", "linear", "constant"))
    assert [round(lin(s), 6) for s in range(11)] == [1.0, 1.0, 0.888889, 0.777778, 0.666667, 0.555556, 0.444444,
                                                     0.333333, 0.222222, 0.111111, 0.0]  # fmt: skip
    cos = lr_lambda(12, 1, 0.0, "cosine")
    assert cos(0) == 1.0 and abs(cos(6) - 0.5) < 1e-9 and cos(11) == 0.0
    assert [const(s) for s in (0, 5, 10)] == [1.0, 1.0, 1.0]
    assert lr_lambda(11, 1, 0.1, "linear")(10) == pytest.approx(0.1)  # ours floors at min_lr_ratio
    with pytest.raises(ConfigError, match="train.warmup_ratio: set together with train.warmup_steps"):
        load_config(None, ["train.warmup_ratio=0.1", "train.warmup_steps=5"])
