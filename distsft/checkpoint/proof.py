"""An export proven to load as a server would load it, and to hold what training held.

``distsft verify --export DIR`` (a fresh process), and the launch after its final export, load the directory
with ``AutoModelForCausalLM.from_pretrained`` and check four things:

- ``weights``: every tensor the model class expects is in the files, none is left over, none of another
  shape (what goes wrong when a tied weight is written under the wrong name, or a shard is missing);
- ``logits``: on probe conversations, the loaded model's logits equal those of the model class built from
  the checkpoint the export came from (the consolidated fp32 weights DeepSpeed trained, cast to the
  export's dtype), computed in the same dtype: the same weights give the same numbers, so the tolerance is
  tight (1e-5 of the largest logit in fp32, 1e-2 in bf16/fp16, where summation order may differ);
- ``template``: the exported tokenizer's chat template renders each probe, and the text tokenises back to
  itself (no token lost or merged across a special token);
- ``stops``: the token that ends an assistant turn in that template is an end-of-sequence token of the
  generation config, so a server stops there instead of running on.

A LoRA export (an adapter directory loaded on its base as a server does, or ``--merge``d) is compared
with a reference built independently of the export: the base the checkpoint names, the adapters the run's
own config describes (rank, alpha, targets, trained embeddings where tokens were added) and the
checkpoint's trained weights loaded into them, run unmerged.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from distsft.checkpoint import storage
from distsft.checkpoint import store as checkpoint
from distsft.errors import ConfigError, first_line

PROBES: list[list[dict[str, str]]] = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "user", "content": "List three prime numbers."},
        {"role": "assistant", "content": "2, 3 and 5."},
        {"role": "user", "content": "And the next one? Answer in one word."},
    ],
    [{"role": "user", "content": "Écris « bonjour » en japonais, s'il te plaît: 你好?"}],
]
"""Conversations rendered through the export's own chat template (plain text for a base model)."""

REPLY = "Paris is the capital of France."
"""An assistant turn appended to a probe, to see which token ends a turn in the template."""

TOLERANCE = {"float32": 1e-5, "bfloat16": 1e-2, "float16": 1e-2}
"""Largest |difference| of logits, as a share of the largest |logit|, for equal weights in that dtype."""


@dataclass
class Finding:
    name: str
    ok: bool
    detail: str

    def line(self) -> str:
        return f"verify: {self.name:<9} {'ok' if self.ok else 'FAILED'}: {self.detail}"


def prove(export_dir: Path, ckpt: checkpoint.Location | None = None, trust_remote_code: bool = False) -> list[Finding]:
    """The four checks on ``export_dir``; ``ckpt``: the checkpoint it came from (default: the one its
    marker names). ``trust_remote_code``: the model ships its own code and the run was told to run it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distsft.checkpoint.export import MARKER
    from distsft.model.loading import NO_HUB_KERNELS
    from distsft.model.lora import adapter_base, is_adapter_dir, with_adapter

    export_dir = Path(export_dir)
    if not export_dir.is_dir():
        raise ConfigError(f"--export {export_dir}: no such directory")
    remote = {"trust_remote_code": trust_remote_code}
    tokenizer = AutoTokenizer.from_pretrained(str(export_dir), **remote)
    adapter = is_adapter_dir(export_dir)
    findings = []
    try:
        if adapter:
            base = AutoModelForCausalLM.from_pretrained(adapter_base(export_dir), **remote, **NO_HUB_KERNELS)
            model, info = with_adapter(base, export_dir), {}
        else:
            model, info = AutoModelForCausalLM.from_pretrained(
                str(export_dir), dtype="auto", output_loading_info=True, **remote, **NO_HUB_KERNELS
            )
    except Exception as e:  # noqa: BLE001 - what a server would meet: said, not raised
        return [Finding("weights", False, f"transformers cannot load it: {first_line(e)}")]
    model.eval()
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    wrong = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    count = sum(1 for _ in model.state_dict())
    findings.append(
        Finding("weights", not wrong, f"{count} tensors in {dtype}, none missing, left over or misshapen")
        if not wrong
        else Finding("weights", False, "; ".join(f"{k.replace('_', ' ')}: {sorted(v)[:5]}" for k, v in wrong.items()))
    )
    rows = [_ids(tokenizer, probe) for probe in PROBES]
    marker = json.loads((export_dir / MARKER).read_text()) if (export_dir / MARKER).is_file() else {}
    source = ckpt or marker.get("checkpoint")
    if source is None:
        findings.append(Finding("logits", False, f"no checkpoint to compare with ({MARKER} names none)"))
    elif not wrong:
        findings.append(_compare_logits(model, rows, source, dtype, trust_remote_code))
    findings += _template_and_stop(tokenizer, export_dir)
    return findings


def _ids(tokenizer: Any, conversation: list[dict[str, str]]) -> list[int]:
    if tokenizer.chat_template:
        text = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    else:
        text = "\n".join(m["content"] for m in conversation)
    return tokenizer(text, add_special_tokens=tokenizer.chat_template is None).input_ids


def _compare_logits(model: Any, rows: list[list[int]], source: str, dtype: str, trust_remote_code: bool) -> Finding:
    import torch
    from transformers import AutoModelForCausalLM

    from distsft.checkpoint.export import consolidated_state
    from distsft.checkpoint.safe_load import no_code_from_checkpoints
    from distsft.model.lora import is_adapter_dir

    local = checkpoint.fetch(source) if storage.is_remote(source) else Path(source)
    want = getattr(torch, dtype)
    try:
        with no_code_from_checkpoints():
            lora = is_adapter_dir(local / checkpoint.HF_DIR)
            state, _aliases = consolidated_state(local, trainable_only=lora)
            weights = {}
            for k, v in state.items():  # one tensor at a time (ZeRO's are read lazily)
                t = v.contiguous()
                weights[k] = t.to(want) if t.dtype.is_floating_point else t
        if lora:
            reference, problem = _lora_reference(local, weights, want, trust_remote_code)
        else:
            reference = AutoModelForCausalLM.from_config(model.config, dtype=want, trust_remote_code=trust_remote_code)
            missing, unexpected = reference.load_state_dict(weights, strict=False)
            reference.tie_weights()
            named = {n for n, _ in reference.named_parameters(remove_duplicate=False)}
            tied = named - set(dict(reference.named_parameters()))
            problem = f"{(unexpected or sorted(set(missing) - tied))[:3]}" if unexpected or set(missing) - tied else ""
        del state, weights
    finally:
        if storage.is_remote(source):
            storage.remove(local)
    if problem:
        return Finding("logits", False, f"the checkpoint's weights do not fit the exported config: {problem}")
    reference.eval()
    worst, scale = 0.0, 0.0
    with torch.no_grad():
        for ids in rows:
            x = torch.tensor([ids])
            a, b = model(input_ids=x).logits.float(), reference(input_ids=x).logits.float()
            worst, scale = max(worst, (a - b).abs().max().item()), max(scale, b.abs().max().item())
    share = worst / max(scale, 1e-12)
    ok = share <= TOLERANCE.get(dtype, 1e-2)
    detail = (
        f"{len(rows)} probes ({sum(map(len, rows))} tokens): max |diff| {worst:.3g} = {share:.2g} of max |logit| "
        f"{scale:.3g} against checkpoint {storage.name(source)}'s weights in {dtype} (tolerance {TOLERANCE.get(dtype)})"
    )
    return Finding("logits", ok, detail)


def _lora_reference(ckpt: Path, weights: dict[str, Any], dtype: Any, trust_remote_code: bool) -> tuple[Any, str]:
    """The base the checkpoint names, under adapters made as the run made them (``model/lora.py`` from the
    run's config, not from any adapter file), holding the checkpoint's trained weights; and what of those
    did not fit ('' when all did)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from distsft.config import build_config
    from distsft.model.loading import NO_HUB_KERNELS
    from distsft.model.lora import adapter_base, apply_lora

    hf_logging.disable_progress_bar()
    cfg = build_config(checkpoint.read_manifest(ckpt)["config"])
    hf = ckpt / checkpoint.HF_DIR
    base = AutoModelForCausalLM.from_pretrained(
        adapter_base(hf), dtype=dtype, trust_remote_code=trust_remote_code, **NO_HUB_KERNELS
    )
    vocab = len(AutoTokenizer.from_pretrained(str(hf), trust_remote_code=trust_remote_code))
    grown = vocab > base.get_input_embeddings().weight.shape[0]
    if grown:  # the trained rows come from the checkpoint (its embedding layers trained whole)
        base.resize_token_embeddings(vocab, mean_resizing=False)
    reference = apply_lora(base, cfg.lora, quantized=False, seed=cfg.train.seed, train_embeddings=grown)
    _missing, unexpected = reference.load_state_dict(weights, strict=False)
    # what trains only: a QLoRA checkpoint also holds the frozen 4-bit base's quantisation state
    unexpected = [k for k in unexpected if "lora_" in k or "modules_to_save" in k]
    trained = {n for n, p in reference.named_parameters() if p.requires_grad}
    absent = sorted(trained - set(weights))
    return reference, f"{(unexpected or absent)[:3]}" if unexpected or absent else ""


def _template_and_stop(tokenizer: Any, export_dir: Path) -> list[Finding]:
    from transformers import GenerationConfig

    if not tokenizer.chat_template:
        return [Finding("template", True, "no chat template (a base model's export): probes are plain text")]
    bad = []
    for probe in PROBES:
        text = tokenizer.apply_chat_template([*probe, {"role": "assistant", "content": REPLY}], tokenize=False)
        back = tokenizer.decode(tokenizer(text, add_special_tokens=False).input_ids)
        if back != text:
            at = next(
                (i for i, (p, q) in enumerate(zip(text, back, strict=False)) if p != q), min(len(text), len(back))
            )
            bad.append(
                f"probe {PROBES.index(probe)} differs at character {at}: "
                f"{text[at : at + 30]!r} -> {back[at : at + 30]!r}"
            )
    findings = [
        Finding(
            "template",
            not bad,
            "; ".join(bad) if bad else f"renders and tokenises back exactly ({len(PROBES)} conversations)",
        )
    ]
    text = tokenizer.apply_chat_template([*PROBES[0], {"role": "assistant", "content": REPLY}], tokenize=False)
    after = text.split(REPLY, 1)[1] if REPLY in text else ""
    ids = tokenizer(after, add_special_tokens=False).input_ids
    if not ids:
        return [*findings, Finding("stops", False, "the template puts no token after an assistant turn")]
    end = ids[0]
    from distsft.model.lora import adapter_base, is_adapter_dir

    adapter = is_adapter_dir(export_dir)  # a server runs an adapter with its base's generation config
    try:
        gen = GenerationConfig.from_pretrained(adapter_base(export_dir) if adapter else str(export_dir))
        eos, where = gen.eos_token_id, "the base's generation_config.json" if adapter else "generation_config.json"
    except OSError:
        eos, where = tokenizer.eos_token_id, "the tokenizer (no generation_config.json)"
    eos = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    name = tokenizer.convert_ids_to_tokens(end)
    ok = end in eos
    detail = f"the turn ends with {name!r} (id {end}), " + (
        f"an end-of-sequence token of {where}" if ok else f"which is not among {where}'s eos ids {sorted(eos)}"
    )
    if adapter and not ok:
        detail += f"; give the server {name!r} as a stop, or export with --merge (the run's stops go with it)"
    return [*findings, Finding("stops", ok, detail)]


def report(findings: list[Finding], out: Path | None = None) -> bool:
    """Print the lines; with ``out``, also write them as JSON. True when every check passed."""
    for f in findings:
        print(f.line(), flush=True)
    if out is not None:
        out.write_text(json.dumps([asdict(f) for f in findings], indent=1) + "\n")
    return all(f.ok for f in findings)
