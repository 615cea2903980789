"""The progress bar (ftlab.progress): optimizer steps, short metric names, plain lines off a terminal.

Each run is a tiny model trained a few steps with ``callbacks=default``; what the bar wrote to
stdout is captured, on a forced terminal (the live display, ANSI codes removed) and as a file
(the plain lines CI logs get). Lightning's own RichProgressBar rendered the same way is the control.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import pytorch_lightning as pl
import rich
from pytorch_lightning.utilities.exceptions import MisconfigurationException

from ftlab.build import build
from ftlab.checkpoints import newest_checkpoint
from ftlab.progress import StepProgressBar, metric_text, metrics_texts
from ftlab.train import fit

pytestmark = pytest.mark.usefixtures("one_thread")

SHOWN = ("callbacks=default", "trainer.enable_progress_bar=true", "eval.generate=false", "eval.num_samples=0",
         "save_model=false", "trainer.enable_checkpointing=false")
TTY = "+callbacks.progress_bar.console_kwargs={force_terminal:true,width:120}"
STOCK = ("callbacks.progress_bar._target_=pytorch_lightning.callbacks.RichProgressBar",)
EVERY_STEP = "+callbacks.progress_bar.log_every_s=0"
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


@pytest.fixture(autouse=True)
def _default_console():
    yield
    rich.reconfigure()  # the bar reconfigures rich's global console (as Lightning's does): put it back


def _shown(tiny_cfg, capsys, *overrides: str, steps: int = 3, ckpt: Path | None = None,
           raw: list[str] | None = None) -> list[str]:
    """Train and return the distinct lines the bar wrote (every frame's, on a terminal); stdout's
    other lines (a library's import-time notice) are left out. ``raw`` gets stdout as written."""
    cfg = tiny_cfg(*SHOWN, *overrides, steps=steps)
    capsys.readouterr()
    fit(build(cfg), Path(cfg.paths.output_dir), ckpt)
    out = capsys.readouterr().out
    if raw is not None:
        raw.append(out)
    text = ANSI.sub("", out)
    lines = []
    for line in (part.rstrip() for part in re.split(r"[\r\n]+", text)):
        if line.startswith(("step ", "validate ", "Epoch ")) and line not in lines:
            lines.append(line)
    return lines


def _problems(lines: list[str]) -> list[str]:
    """What the issue reported: an epoch count, a negative total, batches for steps, cut names."""
    text = "\n".join(lines)
    found = [word for word in ("Epoch", "/-", "…", "train/", "v_num") if word in text]
    for wanted in ("step 3/3", "loss ", " tok/s", "validate 1/1 batches", "val loss "):
        if wanted not in text:
            found.append(f"no {wanted!r}")
    return found


@pytest.mark.parametrize("where", ["terminal", "file"])
def test_the_bar_counts_optimizer_steps_with_short_names(tiny_cfg, capsys, where: str) -> None:
    raw: list[str] = []
    lines = _shown(tiny_cfg, capsys, *([TTY] if where == "terminal" else []), raw=raw)
    assert _problems(lines) == [], lines
    if where == "file":  # plain lines, none of a live display's redraws
        assert "\r" not in raw[0] and "\x1b" not in raw[0]
        assert [line.split("  ")[0] for line in lines] == ["step 1/3", "step 3/3", "validate 1/1 batches"]
        assert re.fullmatch(r"step 3/3  0:00:\d\d elapsed  loss \d+\.\d{3}  [\d,]+ tok/s", lines[1]), lines[1]
        assert re.fullmatch(r"validate 1/1 batches  0:00:\d\d elapsed  val loss \d+\.\d{3}", lines[2]), lines[2]
        assert not any("━" in line for line in lines)


@pytest.mark.parametrize("where", ["terminal", "file"])
def test_control_lightnings_bar_shows_the_epoch_count(tiny_cfg, capsys, where: str) -> None:
    """The assertions above can fail: Lightning's RichProgressBar, rendered the same way, fails them."""
    lines = _shown(tiny_cfg, capsys, *STOCK, *([TTY] if where == "terminal" else []))
    problems = _problems(lines)
    assert "Epoch" in problems and "/-" in problems and "no 'step 3/3'" in problems
    assert any("Epoch 0/-2" in line for line in lines)


def test_accumulated_batches_advance_the_bar_once_per_optimizer_step(tiny_cfg, capsys) -> None:
    lines = _shown(tiny_cfg, capsys, "trainer.accumulate_grad_batches=2", EVERY_STEP)  # 6 batches
    assert [line.split("  ")[0] for line in lines] == ["step 1/3", "step 2/3", "step 3/3", "validate 1/1 batches"]
    assert re.match(r"step 1/3  0:00:\d\d elapsed, ETA 0:00:\d\d  loss ", lines[0]), lines[0]


def test_a_resumed_run_counts_on_from_its_checkpoint(tiny_cfg, capsys) -> None:
    first = tiny_cfg("checkpoint.every_n_steps=4", steps=4)
    fit(build(first), Path(first.paths.output_dir))
    ckpt = newest_checkpoint(Path(first.paths.output_dir))
    assert ckpt is not None and "step-000004" in ckpt.name
    lines = _shown(tiny_cfg, capsys, EVERY_STEP, "trainer.enable_checkpointing=true", "checkpoint.every_n_steps=null",
                   steps=10, ckpt=ckpt)
    steps = [line.split("  ")[0] for line in lines if line.startswith("step ")]
    assert steps == [f"step {k}/10" for k in range(4, 11)], lines


def test_disabled_bar_and_no_callbacks(tiny_cfg, capsys) -> None:
    """``trainer.enable_progress_bar=false`` with ``callbacks=default`` trains with no bar (Lightning
    refuses a bar callback then: the control), and ``callbacks=none`` still gets ftlab's bar, not
    Lightning's own ``Epoch 0/-2``."""
    with pytest.raises(MisconfigurationException, match="enable_progress_bar=False"):
        pl.Trainer(enable_progress_bar=False, callbacks=[StepProgressBar()], logger=False)
    assert _shown(tiny_cfg, capsys, "trainer.enable_progress_bar=false") == []
    lines = _shown(tiny_cfg, capsys, "callbacks=none")
    assert any(line.startswith("step 3/3") for line in lines) and not any(line.startswith("Epoch") for line in lines)


def test_metric_names_are_short() -> None:
    assert metric_text("train/loss", 6.95412) == "loss 6.954"
    assert metric_text("train/tokens_per_s", 1234.4) == "1,234 tok/s"
    assert metric_text("val/accuracy", 0.8125) == "val accuracy 0.8125"
    assert metric_text("v_num", 3) is None
    train, val = metrics_texts({"train/tokens_per_s": 5060.77, "v_num": 0, "train/loss": 6.954, "val/loss": 6.899})
    assert (train, val) == ("loss 6.954  5,061 tok/s", "val loss 6.899")
