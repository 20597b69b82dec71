"""Model families: what distsft reads from each (attention, tied weights, windows, experts), and the
numerical proofs that packing stays exact for sliding-window and soft-capped families."""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch
from families import FAMILIES, MOES, SLIDING, family_config, family_model
from isolation import make_examples, packed_vs_alone

from distsft.data.collate import collate
from distsft.data.packing import pack
from distsft.errors import ConfigError
from distsft.model.traits import (
    check_training_fit,
    choose_attention,
    expert_blocks,
    expert_count,
    model_class,
    read_traits,
    routed_experts,
    text_config,
)


def traits_of(name: str, **overrides):
    cfg = family_config(name, **overrides)
    return read_traits(cfg, model_class(cfg))


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_every_family_gets_an_attention_it_declares(name):
    traits = traits_of(name)
    attn = choose_attention("auto", traits, "cpu")
    assert attn in traits.supports and attn in ("sdpa", "eager")
    assert attn == ("eager" if name == "gemma2" else "sdpa")  # Gemma-2 declares no sdpa (soft-capping)
    assert traits.packs, traits.why_not_packs
    assert traits.tied_embeddings == family_config(name).tie_word_embeddings
    assert bool(traits.sliding_window) == (name in SLIDING)
    assert bool(traits.experts) == (name in MOES) == traits.router_loss
    line = traits.describe(attn)
    assert traits.class_name in line and f"attention {attn}" in line


def test_an_attention_the_model_or_device_cannot_run_is_a_one_line_error():
    gemma2 = traits_of("gemma2")
    with pytest.raises(ConfigError) as e:
        choose_attention("sdpa", gemma2, "cpu")
    msg = str(e.value)
    assert "\n" not in msg and "Gemma2ForCausalLM does not support it" in msg and "eager" in msg
    with pytest.raises(ConfigError, match="no backward pass on CPU"):
        choose_attention("flex_attention", traits_of("llama"), "cpu")
    assert choose_attention("eager", gemma2, "cpu") == "eager"
    # on a GPU without flash-attn, auto still picks what the class declares and the device runs
    assert choose_attention("auto", gemma2, "cuda") in ("flex_attention", "eager", "flash_attention_2")


def _attentions(name: str) -> list[str]:
    return [a for a in ("sdpa", "eager") if a in traits_of(name).supports]


@pytest.mark.parametrize(
    "name,attn", [(n, a) for n in SLIDING + ["gemma2", "llama-tied"] for a in _attentions(n)], ids=str
)
def test_packed_equals_unpacked_with_windows_and_soft_capping(name, attn):
    """Examples longer than the window (16), packed into one row with a padded second row: loss, logits
    and gradients equal the examples run alone (fp32, 1e-5), for every attention usable on CPU."""
    model = family_model(name, attn=attn, vocab_size=211).train()
    packed, alone, logit_diff, grad_diff = packed_vs_alone(model, [40, 23, 50, 9], max_len=128)
    assert packed == pytest.approx(alone, rel=1e-5)
    assert logit_diff < 1e-5 and grad_diff < 1e-5, (logit_diff, grad_diff)


def test_a_packing_mask_that_forgets_the_window_is_caught():
    """Control: a block-diagonal mask without the window (what a hand-made 4D mask gives every layer)
    changes the logits of tokens further than the window from their example's start."""
    model = family_model("mistral", attn="eager", vocab_size=211).eval()
    row = pack(make_examples([40, 23], 211), max_len=128, seed=0)[0]
    batch = collate([row], pad_id=0)
    seg = torch.repeat_interleave(torch.arange(len(row["seq_lens"])), torch.tensor(row["seq_lens"]))
    width = len(row["input_ids"])
    allowed = (seg[:, None] == seg[None, :]) & torch.ones(width, width, dtype=torch.bool).tril()
    no_window = torch.zeros(1, 1, width, width).masked_fill(~allowed, torch.finfo(torch.float32).min)
    with torch.no_grad():
        right = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
        wrong = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], attention_mask=no_window).logits
    assert not torch.allclose(right, wrong, atol=1e-4)


def test_gemma2_packed_equals_unpacked_with_the_caps_biting():
    """Soft-capping with large activations (the caps change the numbers) keeps packing exact."""
    model = family_model("gemma2", attn="eager", vocab_size=211).train()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(30.0)
        model.lm_head.weight.mul_(20.0)
    packed, alone, logit_diff, grad_diff = packed_vs_alone(model, [40, 23, 50, 9], max_len=128)
    assert packed == pytest.approx(alone, rel=1e-5)
    assert logit_diff < 1e-4 and grad_diff < 1e-5, (logit_diff, grad_diff)


# --- mixture of experts -------------------------------------------------------------------------------
def _moe_model_types() -> list[str]:
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    out = []
    for model_type in sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES):
        try:
            cfg = AutoConfig.for_model(model_type)
        except Exception:  # noqa: BLE001 - families that need arguments to build a config
            continue
        if hasattr(text_config(cfg), "output_router_logits") and expert_count(cfg):
            out.append(model_type)
    return out


@pytest.mark.parametrize("model_type", _moe_model_types())
def test_every_moe_family_transformers_ships_is_found(model_type):
    """Built on the meta device (no memory) from its default config: distsft sees the experts, finds the block
    that holds them (the ZeRO-3 leaf), and counts only the routed experts' FLOPs a token uses."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from distsft.model.flops import flops_model

    cfg = AutoConfig.for_model(model_type)
    with torch.device("meta"):
        try:
            model = AutoModelForCausalLM.from_config(cfg)
        except Exception:  # noqa: BLE001 - a default config with holes (None sizes): read the code instead
            source = inspect.getsource(inspect.getmodule(model_class(cfg)))
            assert "self.experts = " in source, model_type  # the child name distsft's detection keys on
            return
    traits = read_traits(cfg, type(model))
    assert traits.experts > 1
    pairs = routed_experts(model)
    assert pairs and expert_blocks(model), model_type
    total = sum(p.numel() for p in model.parameters())
    routed = sum(p.numel() for _, experts in pairs for p in experts.parameters())
    assert 0 < routed < total
    emb = model.get_input_embeddings().weight.numel()
    assert flops_model(model, total).dense_params < total - emb + model.get_output_embeddings().weight.numel()


def test_a_moe_with_a_module_list_of_experts_gets_its_block_as_a_zero3_leaf(tmp_path):
    from toymoe import save_toymoe

    from distsft.config import ModelConfig
    from distsft.model.loading import traits_and_attention

    path = save_toymoe(tmp_path / "toymoe")
    traits, attn = traits_and_attention(ModelConfig(path=str(path), trust_remote_code=True), "cpu")
    assert traits.experts == 16 and traits.packs and attn == "sdpa"
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)
    assert [c.__name__ for c in expert_blocks(model)] == ["ToyMoeBlock"]


def test_router_loss_and_packing_are_refused_where_the_model_cannot_have_them():
    with pytest.raises(ConfigError, match="LlamaForCausalLM has no experts"):
        check_training_fit(traits_of("llama"), packing=True, router_aux_loss_coef=0.01)
    check_training_fit(traits_of("mixtral"), packing=True, router_aux_loss_coef=0.01)
    from transformers import AutoConfig

    jamba = AutoConfig.for_model("jamba", num_hidden_layers=2)
    traits = read_traits(jamba, model_class(jamba))
    assert not traits.packs and "mamba" in traits.why_not_packs
    with pytest.raises(ConfigError, match="set data.packing=false"):
        check_training_fit(traits, packing=True, router_aux_loss_coef=None)
    check_training_fit(traits, packing=False, router_aux_loss_coef=None)


def test_sliding_window_flops_count_at_most_the_window_of_context():
    from distsft.model.flops import flops_model

    model = family_model("mistral")  # window 16 on both layers
    fm = flops_model(model, sum(p.numel() for p in model.parameters()))
    assert fm.full_attention == 0 and fm.sliding_attention == 2 * 4 * 8 and fm.window == 16
    # past the window a token's cost no longer grows with the example: 64 tokens cost 4 x 16 tokens
    assert fm.flops([64]) == pytest.approx(4 * fm.flops([16]), rel=1e-12)
    unwindowed = dataclasses.replace(fm, full_attention=fm.sliding_attention, sliding_attention=0)
    assert unwindowed.flops([64]) > 4 * unwindowed.flops([16])


def test_moe_flops_count_the_routed_experts_a_token_uses():
    from distsft.model.flops import flops_model

    model = family_model("mixtral")  # 4 experts, 2 per token
    total = sum(p.numel() for p in model.parameters())
    emb = model.get_input_embeddings().weight.numel()
    routed = sum(p.numel() for layer in model.model.layers for p in layer.mlp.experts.parameters())
    assert flops_model(model, total).dense_params == total - emb - routed // 2


def test_gpt_oss_with_attention_sinks_and_alternating_windows_packs_exactly(tmp_path):
    """gpt-oss builds its masks without the position ids (transformers 5), so packed examples attended to
    one another (logits 0.2 apart, loss 1e-4): loaded through distsft its decoder gets the masks the
    builders make from the position ids, and packed = unpacked (fp32, 1e-5) with sinks that bite, on
    every attention implementation it runs on a CPU (eager; sdpa it refuses, flex needs CUDA for sinks)."""
    import transformers
    from families import SHAPE, WINDOW

    from distsft.config import ModelConfig
    from distsft.model.loading import load_model, traits_and_attention

    layers = ["sliding_attention", "full_attention"]
    experts = {"num_local_experts": 4, "num_experts_per_tok": 2}
    cfg = transformers.GptOssConfig(
        **{**SHAPE, **experts, "vocab_size": 211, "sliding_window": WINDOW, "layer_types": layers}
    )
    torch.manual_seed(0)
    raw = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").float()
    with torch.no_grad():
        for module in raw.modules():
            if hasattr(module, "sinks"):
                module.sinks.normal_(0, 1.0)
    raw.save_pretrained(tmp_path / "oss")
    _, alone, logit_diff, _ = packed_vs_alone(raw, [40, 23, 50, 9], max_len=128)
    assert logit_diff > 1e-2  # the model as transformers builds it mixes packed examples
    model_cfg = ModelConfig(path=str(tmp_path / "oss"), tokenizer="demo")
    traits, attn = traits_and_attention(model_cfg, "cpu", torch.float32)
    assert traits.packs and attn == "eager"
    model = load_model(model_cfg, torch.float32, attn, seed=0).train()
    packed, alone, logit_diff, grad_diff = packed_vs_alone(model, [40, 23, 50, 9], max_len=128)
    assert packed == pytest.approx(alone, rel=1e-5)
    assert logit_diff < 1e-5 and grad_diff < 1e-5, (logit_diff, grad_diff)
