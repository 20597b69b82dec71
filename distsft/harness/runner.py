"""lm-evaluation-harness on one model directory, offline.

The model is loaded here (``model.generate.load_for_inference``: local files only, a LoRA export on the base
it names) and handed to lm-eval as an ``HFLM`` instance, so lm-eval never resolves a model name itself; the
hub is switched off for the run (environment and the already-imported libraries' flags), so anything that
still tries the network fails at once instead of waiting on it.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from distsft.harness.compare import Row, compare

OFFLINE_ENV = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")


@dataclass(frozen=True)
class HarnessOptions:
    """How every model of one ``distsft eval --tasks`` is run, so that base and fine-tuned compare."""

    limit: int | None = None
    """Only the first N examples of each task (a quick look; stderr grows)."""
    chat_template: bool = False
    """Render each prompt as a user turn in the model's chat template (lm-eval's apply_chat_template)."""
    batch_size: int = 8
    trust_remote_code: bool = False


@contextlib.contextmanager
def offline() -> Iterator[None]:
    """HF_HUB_OFFLINE / HF_DATASETS_OFFLINE for the block. huggingface_hub and datasets read them once, at
    import, so their module flags are set too (and everything restored after)."""
    import datasets.config
    import huggingface_hub.constants

    saved_env = {k: os.environ.get(k) for k in OFFLINE_ENV}
    flags = [(huggingface_hub.constants, "HF_HUB_OFFLINE"), (datasets.config, "HF_HUB_OFFLINE")]
    flags += [(datasets.config, "HF_DATASETS_OFFLINE")]
    saved_flags = [(mod, name, getattr(mod, name)) for mod, name in flags]
    os.environ.update(dict.fromkeys(OFFLINE_ENV, "1"))
    for mod, name in flags:
        setattr(mod, name, True)
    try:
        yield
    finally:
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        for mod, name, value in saved_flags:
            setattr(mod, name, value)


class _DropPassedModelNotes(logging.Filter):
    """lm-eval warns that a model passed as an object ignores its loading arguments and runs in one process:
    both are the point here."""

    NOTES = ("`pretrained` model kwarg is not of type `str`", "Passed an already-initialized model")

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.NOTES)


def run_tasks(
    model_dir: str, tasks: list[dict[str, Any]], options: HarnessOptions, tokenizer_dir: str | None = None
) -> dict[str, Any]:
    """lm-eval's results for ``tasks`` (configs from ``harness.tasks.resolve``) on the model in ``model_dir``
    (with ``tokenizer_dir``'s tokenizer when given): its ``results`` (metric values and stderrs per task) and
    ``n-samples``."""
    import datasets
    import torch
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from distsft.model.generate import ensure_chat_template, load_for_inference

    hflm_logger, quiet = logging.getLogger(HFLM.__module__), _DropPassedModelNotes()
    hflm_logger.addFilter(quiet)  # a filter acts on the logger a record starts at, not on its parents
    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # "Generating test split" per task; lm-eval's own bars stay
    try:
        with offline():
            model, tokenizer = load_for_inference(model_dir, options.trust_remote_code, tokenizer_dir)
            if options.chat_template:
                ensure_chat_template(tokenizer)
            model = model.to("cuda" if torch.cuda.is_available() else "cpu")
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=options.batch_size)
            out = simple_evaluate(
                model=lm,
                tasks=tasks,
                limit=options.limit,
                apply_chat_template=options.chat_template,
                task_manager=TaskManager(include_defaults=False),  # the configs come whole; index nothing
                log_samples=False,
            )
    finally:
        hflm_logger.removeFilter(quiet)
        if bars:
            datasets.enable_progress_bars()
    return {"results": out["results"], "n-samples": out.get("n-samples", {})}


def base_tokenizer(base_dir: str, model_dir: str) -> str | None:
    """None (the base's own) when the base directory holds a tokenizer, else the fine-tuned model's: the
    base a LoRA adapter names may be bare weights (the demo's initialisation, a hub id's cached snapshot), and
    the fine-tuned tokenizer then renders the same prompts for both."""
    here = Path(base_dir)
    return None if (here / "tokenizer_config.json").is_file() or (here / "tokenizer.json").is_file() else model_dir


def benchmark(
    model_dir: str, base_dir: str | None, names: list[str], include_paths: list[str], options: HarnessOptions
) -> tuple[list[Row], dict[str, Any]]:
    """Both models on the same tasks with the same options: the rows of the table, and the report ``--out``
    writes (the rows as dicts, lm-eval's results of each model). The tasks are resolved and checked before
    any model loads."""
    import lm_eval

    from distsft.harness import tasks

    configs = tasks.resolve(names, include_paths)
    tuned = run_tasks(model_dir, configs, options)
    base = run_tasks(base_dir, configs, options, base_tokenizer(base_dir, model_dir)) if base_dir else None
    rows = compare(tuned, base)
    return rows, {
        "model": model_dir,
        "base": base_dir,
        "tasks": [c["task"] for c in configs],
        "options": asdict(options),
        "lm_eval_version": lm_eval.__version__,
        "rows": [r.as_dict() for r in rows],
        "results": {"model": tuned["results"], "base": base["results"] if base else None},
    }
