"""The third-party warnings ftlab filters: each listed with its reason, gone from a default run's
stderr, shown again with ``-v``; ftlab's own and torch's correctness warning never filtered."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from ftlab import known_warnings
from ftlab.known_warnings import KNOWN, LIGHTNING_LOG, filter_known, matches, show_known

# one message of each entry, as the library prints it
EXAMPLES = {
    KNOWN[0]: "Failed to load CPU gemm_4bit_forward from kernels-community: No module named 'kernels'. Please make sure "
              "you already `pip install kernels` and the kernels >= 0.11.1",
    KNOWN[1]: "Paged optimizers are not supported on CPU. Falling back to non-paged optimizer behavior.",
    KNOWN[2]: "`isinstance(treespec, LeafSpec)` is deprecated, use `isinstance(treespec, TreeSpec) and "
              "treespec.is_leaf()` instead.",
    KNOWN[3]: "`is_gradient_checkpointing` is deprecated and will be removed in v6. Use `is_activation_checkpointing` "
              "instead.",
    KNOWN[4]: "`past_key_values` is deprecated and will be removed in version 5.40.0 for `LlamaForCausalLM.forward`. "
              "Use `cache` instead.",
    KNOWN[5]: "\n\t'hydra/launcher/submitit_local' is validated against ConfigStore schema with the same name.",
    KNOWN[6]: "💡 Tip: For seamless cloud logging and experiment tracking, try installing [litlogger]",
    KNOWN[7]: "`Trainer(limit_val_batches=1.0)` was configured so 100% of the batches will be used..",
}
NEVER = [  # correctness signals and ftlab's own warnings stay visible
    "aten::_foo: an autograd kernel was not registered to the Autograd key(s) but we are trying to backprop through "
    "it. This may lead to silently incorrect behavior. This behavior is deprecated and will be removed in a future "
    "version of PyTorch.",
    "objective=mean_reward: the run record has no number under that name (it has: val_loss)",
    "stopped by a signal with 2 processes: no checkpoint now; the newest periodic one is kept",
]


def test_every_entry_has_a_reason_and_matches_its_message_only() -> None:
    assert set(EXAMPLES) == set(KNOWN)
    for known, message in EXAMPLES.items():
        assert len(known.reason) > 30, known.pattern
        assert matches(message, known.source) is known
    for message in NEVER:
        assert all(matches(message, source) is None for source in {k.source for k in KNOWN})


def test_filtered_in_process_and_shown_with_verbose(monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    monkeypatch.delenv(known_warnings.VERBOSE_ENV, raising=False)
    filter_known()  # what `import ftlab` did
    with warnings.catch_warnings(record=True) as seen:
        warnings.warn(EXAMPLES[KNOWN[2]], FutureWarning)
        warnings.warn(NEVER[0], UserWarning)
    assert [str(w.message) for w in seen] == [NEVER[0]]
    caplog.set_level(logging.INFO)
    logging.getLogger(LIGHTNING_LOG).info(EXAMPLES[KNOWN[6]])
    logging.getLogger(LIGHTNING_LOG).info("GPU available: False, used: False")
    assert [r.getMessage() for r in caplog.records] == ["GPU available: False, used: False"]
    try:
        show_known()
        with warnings.catch_warnings(record=True) as seen:
            warnings.warn(EXAMPLES[KNOWN[2]], FutureWarning)
        assert len(seen) == 1  # control: the same warning, no longer filtered
        logging.getLogger(LIGHTNING_LOG).info(EXAMPLES[KNOWN[6]])
        assert caplog.records[-1].getMessage() == EXAMPLES[KNOWN[6]]
    finally:  # show_known set the variable itself (for child processes): not monkeypatch's to restore
        os.environ.pop(known_warnings.VERBOSE_ENV, None)
        filter_known()


def _run(tmp_path: Path, cache: Path, *flags: str) -> str:
    done = subprocess.run([sys.executable, "-m", "ftlab", *flags, "model=tiny", "method=qlora", "trainer.max_steps=2",
                           "data.num_train=32", "data.num_val=8", "eval.num_prompts=4", f"hydra.run.dir={tmp_path}",
                           f"paths.cache_dir={cache}"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stderr


@pytest.mark.slow  # two runs in subprocesses, as a user starts them
def test_a_default_run_stderr_is_ftlab_first(tmp_path: Path, cache_dir: Path) -> None:
    """method=qlora meets most of the list (bitsandbytes' kernel notice appears on AVX512-BF16 CPUs
    only, its paged-optimizer notice on CPUs); none of it is printed, ftlab's start-up line is."""
    quiet = _run(tmp_path / "quiet", cache_dir)
    assert "method qlora on tiny-llama: trainable params 32,768 || all params" in quiet
    for line in quiet.splitlines():
        assert not any(re.search(k.pattern.lstrip("\\s*"), line) for k in KNOWN), line
    loud = _run(tmp_path / "loud", cache_dir, "-v")  # control: the same run shows them with -v
    assert "💡 Tip: For seamless cloud" in loud and "Paged optimizers are not supported on CPU" in loud
