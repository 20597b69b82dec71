"""A pre-trained *base* model (GPT-2's shape: no chat template, no pad token) becomes a chat model: the
chosen template's markers become real tokens, the embeddings grow (new rows from the mean of the old
ones), and the exported model reloads and stops at its one ``<|im_end|>`` token; full and LoRA."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import REPO
from raytest import run_cfg

from distsft.launcher.run import launch_local

DATA = REPO / "tests" / "fixtures" / "support_small.jsonl"


@pytest.fixture(scope="module")
def base_model(tmp_path_factory):
    """A tiny GPT-2 with its own byte-level BPE (trained here on the fixture's text): the markers of ChatML
    are not tokens of it, and it has neither a chat template nor a pad token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    out = tmp_path_factory.mktemp("gpt2-base")
    text = [json.dumps(json.loads(line)) for line in DATA.read_text().splitlines()]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    bpe.train_from_iterator(text, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    assert tok.pad_token is None and not tok.chat_template
    tok.save_pretrained(out)
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tok), n_positions=512, n_embd=64, n_layer=2, n_head=2, n_inner=128)
    GPT2LMHeadModel(config).save_pretrained(out)
    return out


def test_a_chosen_template_adds_its_markers_as_tokens_and_the_embeddings_grow_from_their_mean(base_model):
    from distsft.config import ModelConfig
    from distsft.model.loading import load_model, load_tokenizer

    cfg = ModelConfig(path=str(base_model))
    tok = load_tokenizer(cfg)  # no template: ChatML, with its markers as tokens
    assert len(tok.encode("<|im_end|>", add_special_tokens=False)) == 1 and tok.pad_token is not None
    model = load_model(cfg, torch.float32, "eager", 0, vocab_size=len(tok))
    emb = model.get_input_embeddings().weight
    assert emb.shape[0] == len(tok) == 602
    old = emb[:600]
    torch.testing.assert_close(emb[600:], old.mean(0).expand(2, -1), rtol=0, atol=1e-3)


@pytest.mark.slow
@pytest.mark.parametrize("lora", [0, 4])
def test_a_base_model_trains_exports_reloads_and_stops_at_its_new_end_of_turn_token(base_model, tmp_path, lora):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distsft.cli import main
    from distsft.model.generate import generate, stop_ids

    out = tmp_path / "run"
    cfg = run_cfg(out, f"model.path={base_model}", "train.max_steps=3", f"lora.r={lora}", "train.micro_batch_size=2")
    summary = launch_local(cfg, quiet=True)
    assert summary["steps_run"] == 3
    final = out / "final"
    # the launch's own proof of final/: the grown embeddings' logits equal the checkpoint's (LoRA: base +
    # the run's adapters with the trained embedding layers)
    found = {f["name"]: f for f in json.loads((out / "verify-export.json").read_text())}
    assert found["weights"]["ok"] and found["logits"]["ok"] and "max |diff| 0 " in found["logits"]["detail"], found
    if lora:  # a server runs the adapter with the base's generation config, which knows no <|im_end|>
        assert not found["stops"]["ok"] and "export with --merge" in found["stops"]["detail"], found
        merged = tmp_path / "merged"
        assert main(["export", str(out), "--merge", "--out", str(merged)]) == 0
        assert main(["verify", "--export", str(merged)]) == 0  # weights, logits and the run's stops
    else:
        assert all(f["ok"] for f in found.values()), found
    tok = AutoTokenizer.from_pretrained(final)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert tok.encode("<|im_end|>", add_special_tokens=False) == [im_end] and tok.chat_template
    if lora:  # an adapter directory: the embedding and output layers saved whole beside the adapters
        adapter = json.loads((final / "adapter_config.json").read_text())
        assert "wte" in adapter["modules_to_save"]
        from distsft.model.lora import with_adapter

        model = with_adapter(AutoModelForCausalLM.from_pretrained(base_model), final)
    else:
        model, info = AutoModelForCausalLM.from_pretrained(final, output_loading_info=True)
        assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
        assert model.config.vocab_size == len(tok) and im_end in model.generation_config.eos_token_id
    assert model.get_input_embeddings().weight.shape[0] == len(tok)
    assert im_end in stop_ids(model, tok)
    assert isinstance(generate(str(final), "My router blinks red.", max_new_tokens=8), str)
