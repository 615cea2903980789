"""Third-party warnings that tell an ftlab user nothing to act on, each listed once with the reason.

A run used to open with a screen of other libraries' notices (a kernel package for a hub download,
deprecations inside Lightning and transformers, an advertisement) before ftlab's first line, and
the one warning that matters, torch's "This may lead to silently incorrect behavior", drowned in
them. ``KNOWN`` is the whole list: a ``warnings.warn`` message (``source="warning"``) or a log
record of a named logger, matched by a regular expression at the start of its message. ftlab's
import filters them (so Hydra's launcher, every job and every DDP rank do); ``ftlab -v`` or
``hydra.verbose=true`` shows them again (``show_known``). Nothing of ftlab's own and no
correctness warning is ever listed here (``tests/test_known_warnings.py`` checks both).
"""

from __future__ import annotations

import logging
import os
import re
import warnings
from dataclasses import dataclass

VERBOSE_ENV = "FTLAB_VERBOSE"  # set by ``ftlab -v``: child processes (DDP ranks, submitit jobs) show them too
LIGHTNING_LOG = "pytorch_lightning.utilities.rank_zero"


@dataclass(frozen=True)
class Known:
    pattern: str  # a regular expression matched at the start of the message
    source: str  # "warning" (warnings.warn) or the name of the logger that logs it
    reason: str  # why it tells an ftlab user nothing to act on
    category: type[Warning] = Warning


KNOWN: tuple[Known, ...] = (
    Known(r"Failed to load CPU gemm_4bit_forward from kernels-community", "bitsandbytes.backends.cpu.ops",
          "the optional kernel it names is downloaded from the Hugging Face hub at run time; without it bitsandbytes "
          "runs its own CPU 4-bit path, which ftlab's quantized tests and benches measure"),
    Known(r"Paged optimizers are not supported on CPU", "warning",
          "on a CPU the paged 8-bit AdamW of method=qlora runs unpaged, its state still 8-bit (the README says so); "
          "paging only matters on GPUs", UserWarning),
    Known(r"`isinstance\(treespec, LeafSpec\)` is deprecated", "warning",
          "a deprecation inside Lightning's own pytree helper (torch 2.10+), raised on every run", FutureWarning),
    Known(r"`is_gradient_checkpointing` is deprecated", "warning",
          "transformers' renamed property, read by PEFT and Lightning internals, not by ftlab's configs", FutureWarning),
    Known(r"`past_key_values` is deprecated and will be removed", "warning",
          "PEFT's prefix tuning passes its prefixes to transformers under the old argument name", FutureWarning),
    Known(r"\s*'hydra/launcher/submitit_(local|slurm)' is validated against ConfigStore schema", "warning",
          "ftlab's hydra/launcher presets take the plugin's names on purpose, so that Hydra checks them against "
          "the plugin's schema (a misspelt field is still an error)", UserWarning),
    Known(r"💡 Tip: For seamless cloud", LIGHTNING_LOG,
          "an advertisement for Lightning's cloud logging and model registry"),
    Known(r"`Trainer\(limit_val_batches=1.0\)` was configured so 100% of the batches will be used", LIGHTNING_LOG,
          "ftlab's default (validate on the whole validation set), restated"),
)


class _DropKnown(logging.Filter):
    """Drops the records of one logger whose message starts like one of ``patterns``."""

    def __init__(self, patterns: list[re.Pattern[str]]) -> None:
        super().__init__()
        self.patterns = patterns

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage().lstrip()
        return not any(p.match(message) for p in self.patterns)


_FILTERS: dict[str, _DropKnown] = {}


def matches(message: str, source: str = "warning") -> Known | None:
    """The entry of ``KNOWN`` that filters ``message`` from ``source``, if any."""
    for known in KNOWN:
        if known.source == source and re.match(known.pattern, message.lstrip()):
            return known
    return None


def verbose_requested(args: list[str]) -> bool:
    """``-v``/``--verbose`` or a true ``hydra.verbose`` on the command line, or ``FTLAB_VERBOSE`` set."""
    if os.environ.get(VERBOSE_ENV):
        return True
    return any(a in ("-v", "--verbose") or (a.startswith("hydra.verbose=") and a.split("=", 1)[1].lower() not in
                                            ("false", "null", "")) for a in args)


def filter_known() -> None:
    """Filter every entry of ``KNOWN`` in this process (unless ``FTLAB_VERBOSE`` is set)."""
    if os.environ.get(VERBOSE_ENV):
        return
    by_logger: dict[str, list[re.Pattern[str]]] = {}
    for known in KNOWN:
        if known.source == "warning":
            warnings.filterwarnings("ignore", message=known.pattern, category=known.category)
        else:
            by_logger.setdefault(known.source, []).append(re.compile(known.pattern))
    for name, patterns in by_logger.items():
        if name not in _FILTERS:
            _FILTERS[name] = _DropKnown(patterns)
            logging.getLogger(name).addFilter(_FILTERS[name])


def show_known() -> None:
    """Undo ``filter_known`` (``ftlab -v``), here and in the processes this one starts."""
    os.environ[VERBOSE_ENV] = "1"
    patterns = {k.pattern for k in KNOWN if k.source == "warning"}
    warnings.filters[:] = [f for f in warnings.filters
                           if not (f[0] == "ignore" and getattr(f[1], "pattern", None) in patterns)]
    for name, drop in _FILTERS.items():
        logging.getLogger(name).removeFilter(drop)
    _FILTERS.clear()
