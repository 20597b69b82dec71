"""What the driver shows a person, and what it keeps.

The console carries the run's own lines: config, model, data, workers, progress, warnings that matter
and the summary. Libraries are asked to keep their internals to themselves (DeepSpeed's accelerator
guess, Ray's and transformers' info lines, progress bars of file writes) unless ``--verbose``. Every
line the driver prints also goes to ``output_dir/logs/driver.log``.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

from distsft.host import strip_ansi


def quiet_libraries(verbose: bool = False) -> None:
    """Before the libraries are imported where possible: their chatter off the console."""
    if "DS_ACCELERATOR" not in os.environ:  # DeepSpeed warns when it has to guess
        import torch

        os.environ["DS_ACCELERATOR"] = "cuda" if torch.cuda.is_available() else "cpu"
    if verbose:
        return
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass
    for category in (FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category, module=r"(torch|transformers|deepspeed|ray|peft)\.")


class _Tee(io.TextIOBase):
    """Writes to the console stream and, line by line, to the log file (progress-bar redraws excepted)."""

    def __init__(self, stream, log, quiet: bool = False) -> None:
        self.stream, self.log, self.quiet = stream, log, quiet
        self._held = False

    def write(self, text: str) -> int:
        # Ray's notices from the raylet (a node marked dead, ...) go to the log only unless --verbose: the
        # console says what the run does about them, in one line of ours (``restart 1/2: ...``).
        if self.quiet and (RAY_NOTICE in text or (self._held and text == "\n")):
            self._held = text != "\n"
            self.log.write(strip_ansi(text))
            return len(text)
        self._held = False
        self.stream.write(text)
        if "\r" not in text:
            self.log.write(text)
        return len(text)

    def flush(self) -> None:
        self.stream.flush()
        self.log.flush()

    def isatty(self) -> bool:
        # asked after the run too: colorama's exit hook (Ray initialises it) keeps the stdout it first saw
        return not getattr(self.stream, "closed", False) and self.stream.isatty()

    def fileno(self) -> int:
        return self.stream.fileno()


RAY_NOTICE = "(raylet)"
LIBRARIES = ("DeepSpeed", "ray", "transformers", "datasets", "huggingface_hub", "bitsandbytes", "torch", "py.warnings")


@contextlib.contextmanager
def driver_log(output_dir: Path, verbose: bool = False) -> Iterator[Path]:
    """Everything printed inside also lands in ``output_dir/logs/driver.log``; so do the libraries' log
    records and Python warnings (warning level and up), which reach the console only with ``verbose``."""
    quiet_libraries(verbose)
    path = Path(output_dir) / "logs" / "driver.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(sys.stdout, _Tee):  # nested (a launch inside a launch's process, as in tests)
        yield path
        return
    with open(path, "a", encoding="utf-8") as log:
        old = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = _Tee(old[0], log, not verbose), _Tee(old[1], log, not verbose)
        to_file = logging.StreamHandler(log)
        to_file.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        saved = {}
        if not verbose:
            logging.captureWarnings(True)
            for name in LIBRARIES:
                lg = logging.getLogger(name)
                saved[name] = (lg.handlers[:], lg.propagate, lg.level)
                lg.handlers, lg.propagate = [to_file], False
                lg.setLevel(logging.WARNING)
        try:
            yield path
        finally:
            for name, (handlers, propagate, level) in saved.items():
                lg = logging.getLogger(name)
                lg.handlers, lg.propagate = handlers, propagate
                lg.setLevel(level)
            if saved:
                logging.captureWarnings(False)
            sys.stdout.flush()
            sys.stderr.flush()
            sys.stdout, sys.stderr = old
