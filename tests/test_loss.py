"""The loss computes logits only where the next token is supervised; that must not change any number."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from tinymodels import tiny_llama

from distsft.data.collate import collate, supervised_tokens
from distsft.data.tokenize import IGNORE_INDEX
from distsft.training import loss as loss_mod


def rows(seed: int) -> list[dict]:
    """Two packed rows of different widths with prompt (-100) spans, so the batch is padded too."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for lens in ([5, 9, 4], [12, 3]):
        ids, labels, pos = [], [], []
        for n in lens:
            x = torch.randint(0, 101, (n,), generator=g).tolist()
            prompt = n // 2
            ids += x
            labels += [IGNORE_INDEX] * prompt + x[prompt:]
            pos += list(range(n))
        out.append({"input_ids": ids, "labels": labels, "position_ids": pos, "seq_lens": lens})
    return out


def selected_vs_full(model, monkeypatch) -> None:
    assert loss_mod.selects_logits(model)
    batch = collate(rows(1), pad_id=0)
    sel = loss_mod.token_loss_sum(model, batch)
    sel.loss_sum.backward()
    sel_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    with monkeypatch.context() as m:
        m.setattr(loss_mod, "selects_logits", lambda m: False)
        full = loss_mod.token_loss_sum(model, batch)
    full.loss_sum.backward()
    assert int(sel.tokens) == int(full.tokens) == supervised_tokens(rows(1))
    assert supervised_tokens(rows(1)) == sum(
        int((torch.tensor(r["labels"][1:]) != IGNORE_INDEX).sum()) for r in rows(1)
    )
    torch.testing.assert_close(sel.loss_sum, full.loss_sum, rtol=1e-6, atol=1e-6)
    for n, p in model.named_parameters():
        torch.testing.assert_close(sel_grads[n], p.grad, rtol=1e-5, atol=1e-7, msg=n)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_selected_logits_give_the_full_logits_loss_and_gradients(attn, monkeypatch):
    selected_vs_full(tiny_llama(attn), monkeypatch)


def test_gemma2_soft_capping_holds_on_the_selected_logits(monkeypatch):
    """Gemma-2 caps attention scores and final logits with tanh; the cap applies to the selected logits
    exactly as to the full ones (caps small enough that they change the numbers)."""
    from families import family_model

    model = family_model("gemma2", vocab_size=101, attn="eager")
    assert model.config.final_logit_softcapping == 5.0 and model.config.attn_logit_softcapping == 3.0
    with torch.no_grad():  # random-init logits are tiny; make them large enough for the cap to bite
        model.lm_head.weight.mul_(50.0)
    selected_vs_full(model, monkeypatch)
    batch = collate(rows(1), pad_id=0)
    capped = loss_mod.token_loss_sum(model, batch).loss_sum.item()
    model.config.final_logit_softcapping = None
    uncapped = loss_mod.token_loss_sum(model, batch).loss_sum.item()
    assert abs(uncapped - capped) > 0.05 * capped, (capped, uncapped)


def test_a_batch_without_supervised_tokens_gives_zero_and_still_runs_the_model():
    model = tiny_llama("sdpa")
    row = {"input_ids": [1, 2, 3], "labels": [IGNORE_INDEX] * 3, "position_ids": [0, 1, 2], "seq_lens": [3]}
    parts = loss_mod.token_loss_sum(model, collate([row], pad_id=0))
    assert int(parts.tokens) == 0 and parts.loss_sum.item() == 0.0
    parts.loss_sum.backward()  # ZeRO-3 ranks with nothing to learn must still take part in forward and backward


def test_models_without_logits_to_keep_use_the_full_logits():
    class Plain(torch.nn.Module):
        def forward(self, input_ids, use_cache=False):  # no logits_to_keep
            raise AssertionError

    assert not loss_mod.selects_logits(Plain())


def _loss_and_grads(model, batch, mode):
    model.zero_grad()
    parts = loss_mod.token_loss_sum(model, batch, mode=mode)
    parts.loss_sum.backward()
    return parts.loss_sum.item(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("family", ["llama", "llama-tied", "gemma2"])
@pytest.mark.parametrize("mode", ["fused", "chunked"])
def test_fused_and_chunked_losses_equal_todays_path(family, mode, monkeypatch):
    """Loss and every gradient equal the plain path (fp32, 1e-5), with several chunks per batch, a tied
    output layer, and Gemma-2's final soft-capping biting (large logits)."""
    from families import family_model

    model = family_model(family, vocab_size=3001, attn="eager")
    if family == "gemma2":
        with torch.no_grad():
            model.lm_head.weight.mul_(50.0)
    monkeypatch.setattr(loss_mod, "CHUNK_TOKENS", 7)  # the batch has 18 supervised tokens: 3 chunks
    batch = collate(rows(2), pad_id=0)
    ref_loss, ref_grads = _loss_and_grads(model, batch, "plain")
    loss, grads = _loss_and_grads(model, batch, mode)
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    for n, g in ref_grads.items():  # within 1e-5 of the gradient's scale (summation order differs)
        assert (grads[n] - g).abs().max() <= 1e-5 * g.abs().max(), n


def test_the_fused_loss_never_holds_a_whole_batchs_logits(monkeypatch):
    """The output layer computes logits for no position; each chunk's exist only inside the loss."""
    from tinymodels import tiny_llama

    model = tiny_llama("sdpa", vocab_size=3001)
    shapes = []
    model.lm_head.register_forward_hook(lambda m, i, o: shapes.append(tuple(o.shape)))
    monkeypatch.setattr(loss_mod, "CHUNK_TOKENS", 7)
    loss_mod.token_loss_sum(model, collate(rows(2), pad_id=0), mode="fused").loss_sum.backward()
    assert shapes == [(0, 3001)]


def test_a_family_that_rescales_its_logits_is_not_given_the_fused_loss():
    """Granite divides its logits by `logits_scaling` after the output layer: the fused loss would not
    see it, and the first-batch check says so (distsft then uses the chunked path)."""
    from transformers import GraniteConfig, GraniteForCausalLM

    cfg = GraniteConfig(
        vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, logits_scaling=4.0,
    )  # fmt: skip
    torch.manual_seed(0)
    model = GraniteForCausalLM(cfg)
    batch = collate(rows(1), pad_id=0)
    assert not fused_matches(model, batch, rtol=1e-4)
    model.config.logits_scaling = 1.0
    assert fused_matches(model, batch, rtol=1e-4)


def fused_matches(model: Any, batch: dict[str, Any], rtol: float, compute_dtype: torch.dtype | None = None) -> bool:
    """The ground truth that ``choose_loss_kernel``'s static rule is tested against: whether this model's
    logits are exactly its output layer's (plus the soft-capping the fused loss applies), on one batch."""
    head = loss_mod.output_head(model)
    if head is None or getattr(head, "bias", None) is not None:
        return False
    with torch.no_grad():
        plain = loss_mod.token_loss_sum(model, batch, mode="plain").loss_sum
        fused = loss_mod.token_loss_sum(model, batch, mode="fused", compute_dtype=compute_dtype).loss_sum
    return bool(torch.isclose(plain, fused, rtol=rtol, atol=1e-3).item())


def test_the_loss_kernel_is_chosen_from_what_is_known_before_the_run():
    """No trial on the user's batch: the stage, the logits' size against the memory at hand, and whether the
    output layer's output is the model's logits decide."""
    from transformers import GraniteConfig, GraniteForCausalLM, LlamaConfig, LlamaForCausalLM

    from distsft.model.traits import read_traits

    def choose(**kw):
        args = dict(zero_stage=2, compiled=False, tokens_per_micro_batch=4096, vocab_size=128_256)
        args.update(device_memory=80 * 2**30, head_fusable=True)
        args.update(kw)
        return loss_mod.choose_loss_kernel("auto", **args).kernel

    assert choose() == "fused"  # 4k tokens x 128k vocabulary: 4 GiB of fp32 logits and gradients
    assert choose(head_fusable=False) == "chunked"
    assert choose(zero_stage=3) == "chunked" and choose(compiled=True) == "chunked"
    assert choose(vocab_size=3000) == "plain"  # the demo: 94 MiB
    asked = loss_mod.choose_loss_kernel(
        "chunked", zero_stage=0, compiled=False, tokens_per_micro_batch=1, vocab_size=1, device_memory=1, head_fusable=1
    )
    assert asked.kernel == "chunked"  # an explicit choice is kept
    small = dict(vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    granite = read_traits(GraniteConfig(**small, logits_scaling=4.0), GraniteForCausalLM)
    llama = read_traits(LlamaConfig(**small), LlamaForCausalLM)
    assert granite.rescales_logits and not llama.rescales_logits and llama.vocab_size == 101
    torch.manual_seed(0)
    batch = collate(rows(1), pad_id=0)
    for cfg, cls, traits in ((GraniteConfig(**small, logits_scaling=4.0), GraniteForCausalLM, granite),
                             (LlamaConfig(**small), LlamaForCausalLM, llama)):  # fmt: skip
        model = cls(cfg)
        assert loss_mod.head_fusable(model, traits.rescales_logits) == fused_matches(model, batch, rtol=1e-4)
