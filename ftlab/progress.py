"""The training progress bar: optimizer steps, not epochs or batches.

ftlab counts a run in optimizer steps (``trainer.max_steps``, ``max_epochs=-1``). Lightning's own bars
count the batches of an epoch: ``Epoch 0/-2`` (``max_epochs - 1``), a count that is not the step count
under ``trainer.accumulate_grad_batches``, and metric names cut to ``train/tokens_per_…``.
``StepProgressBar`` keeps Lightning's ``RichProgressBar`` (its hooks, rich's task timing and live
display) and changes what it counts and shows; on a terminal::

    step 5/10            ━━━━━━━━━━╺━━━━━━━━━ 0:00:03 • ETA 0:00:04 loss 6.892  5,089 tok/s
    validate 2/2 batches ━━━━━━━━━━━━━━━━━━━━ 0:00:01               val loss 6.872

- the training line counts ``trainer.global_step`` against ``trainer.max_steps`` (or
  ``estimated_stepping_batches`` when epochs bound the run): it moves once per optimizer step,
  starts at the checkpoint's step when a run resumes, and spans the whole run (no epoch resets);
- validation has its own line, counted in batches, with its loss once known (the latest stays);
- metrics have short names (``loss``, ``tok/s``, ``val loss``); the logger's version is left out.

Rich rather than tqdm: on a terminal both redraw in place, but written to a file (CI logs, SLURM
output) tqdm appends every redraw with a carriage return, and Lightning's ``RichProgressBar`` prints
nothing until it stops, then one frame wrapped at 80 columns. Off a terminal this bar draws no live
display and prints plain lines instead: the first step, then one at most every ``log_every_s``
seconds, the step each validation follows, the last step, and each validation's result::

    step 1/10  0:00:01 elapsed, ETA 0:00:09  loss 6.929  3,700 tok/s
    step 5/10  0:00:03 elapsed, ETA 0:00:04  loss 6.892  5,186 tok/s
    validate 2/2 batches  0:00:01 elapsed  val loss 6.872

It is the ``callbacks.progress_bar`` node of ``callbacks=default``; ``ftlab.train`` adds one when
no bar is configured (else Lightning would add its own) and drops any under
``trainer.enable_progress_bar=false`` (Lightning refuses a bar then).
"""

from __future__ import annotations

import math
import time
from datetime import timedelta
from typing import Any, Mapping, Optional, Union

import pytorch_lightning as pl
from pytorch_lightning.callbacks import RichProgressBar
from pytorch_lightning.callbacks.progress.rich_progress import CustomBarColumn, RichProgressBarTheme
from rich.progress import ProgressColumn, Task, TaskID
from rich.style import Style
from rich.table import Column
from rich.text import Text

TOKENS_PER_S = "train/tokens_per_s"  # logged by ftlab.callbacks.TokenThroughput
LABELS = {"train/loss": "loss", "val/loss": "val loss"}
LEFT_OUT = {"v_num"}  # the logger's version number: says nothing about the run's progress


def metric_text(name: str, value: Any) -> Optional[str]:
    """One metric as the bar shows it: ``loss 6.954``, ``1,234 tok/s``, ``val accuracy 0.8125``."""
    if name in LEFT_OUT:
        return None
    if name == TOKENS_PER_S and isinstance(value, (int, float)):
        return f"{value:,.0f} tok/s"
    label = LABELS.get(name) or name.removeprefix("train/").replace("/", " ").replace("_", " ")
    if isinstance(value, float):
        number = f"{value:.3f}" if label.endswith("loss") else f"{value:.4g}"
    else:
        number = str(value)
    return f"{label} {number}"


def metrics_texts(metrics: Mapping[str, Any]) -> tuple[str, str]:
    """The training metrics (loss and tokens/s first) and the validation ones, each one line."""
    rank = {"train/loss": 0, TOKENS_PER_S: 1}
    train, val = [], []
    for name in sorted(metrics, key=lambda n: rank.get(n, 2)):
        text = metric_text(name, metrics[name])
        if text is not None:
            (val if name.startswith("val/") else train).append(text)
    return "  ".join(train), "  ".join(val)


def _is_training_line(task: Task) -> bool:
    return "first" in task.fields  # the step the run started from (set when the line is created)


def _clock(seconds: Optional[float]) -> str:
    return "-:--:--" if seconds is None or not math.isfinite(seconds) else str(timedelta(seconds=int(seconds)))


class _BarTextColumn(ProgressColumn):
    """A column whose text the bar writes: ``StepProgressBar.count_text`` or ``clock_text``."""

    def __init__(self, text: Any, style: Union[str, Style]) -> None:
        self.text, self.style = text, style
        super().__init__(table_column=Column(no_wrap=True))

    def render(self, task: Task) -> Text:
        return Text(self.text(task), style=self.style)


class _MetricsColumn(ProgressColumn):
    """A task's metrics, formatted when they were logged (not in the refresh thread)."""

    def __init__(self, style: Union[str, Style]) -> None:
        self.style = style
        super().__init__()

    def render(self, task: Task) -> Text:
        return Text(task.fields.get("metrics", ""), style=self.style)


class StepProgressBar(RichProgressBar):
    """Lightning's rich progress bar counting optimizer steps for the whole run (see the module).

    Args:
        refresh_rate: redraws per second on a terminal (0 disables the bar).
        log_every_s: off a terminal, the most seconds between two printed step lines.
        theme: Lightning's ``RichProgressBarTheme`` (styles of the parts).
        console_kwargs: arguments of rich's ``Console`` (``force_terminal``, ``width``, ...).
    """

    def __init__(self, refresh_rate: int = 10, log_every_s: float = 30.0,
                 theme: Optional[RichProgressBarTheme] = None, console_kwargs: Optional[dict[str, Any]] = None) -> None:
        super().__init__(refresh_rate=refresh_rate, leave=True, theme=theme or RichProgressBarTheme(),
                         console_kwargs=dict(console_kwargs or {}))
        self.log_every_s = float(log_every_s)
        self.live = True  # the console redraws in place (a terminal); false: plain lines are printed
        self._printed_step: Optional[int] = None
        self._printed_at = -math.inf

    # -- what is counted and named -------------------------------------------------------------

    @property
    def train_description(self) -> str:
        return "step"

    @property
    def validation_description(self) -> str:
        return "validate"

    @property
    def sanity_check_description(self) -> str:
        return "sanity check"

    @property
    def test_description(self) -> str:
        return "test"

    @property
    def predict_description(self) -> str:
        return "predict"

    def _get_train_description(self, current_epoch: int) -> str:
        return self.train_description  # never an epoch

    def total_steps(self) -> Union[int, float]:
        """The optimizer steps this run will take: ``max_steps``, or what the epochs allow when
        they bound it (``inf`` when nothing does)."""
        trainer = self.trainer
        try:
            return trainer.estimated_stepping_batches  # max_steps under max_epochs=-1
        except Exception:  # e.g. an accumulation schedule that changes between epochs
            return trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else math.inf

    def count_text(self, task: Task) -> str:
        total = int(task.total) if task.total is not None and math.isfinite(task.total) else "?"
        unit = "" if _is_training_line(task) else " batches"
        return f"{task.description} {int(task.completed)}/{total}{unit}"

    def _eta(self, task: Task) -> Optional[str]:
        """The estimated time left of the training line (``None`` for the other lines, once done, or
        before anything is known)."""
        if not _is_training_line(task) or task.finished:
            return None
        left = task.time_remaining  # rich's: from the last 30 s of steps, once there are two
        done = task.completed - task.fields.get("first", 0)
        if left is None and done > 0 and task.elapsed and task.total is not None and math.isfinite(task.total):
            left = task.elapsed / done * (task.total - task.completed)  # from the steps of this run so far
        return None if left is None else _clock(left)  # unknown before the first step

    def clock_text(self, task: Task) -> str:
        elapsed = _clock(task.finished_time if task.finished else task.elapsed)
        eta = self._eta(task)
        return elapsed if eta is None else f"{elapsed} • ETA {eta}"

    def line(self, task: Task) -> str:
        """A task as one line of plain text, for consoles that are not terminals."""
        eta = self._eta(task)
        clock = f"{_clock(task.finished_time if task.finished else task.elapsed)} elapsed"
        parts = [self.count_text(task), clock if eta is None else f"{clock}, ETA {eta}"]
        metrics = task.fields.get("metrics")
        return "  ".join([*parts, metrics] if metrics else parts)

    def configure_columns(self, trainer: pl.Trainer) -> list:
        width = self._console.width if self._console is not None else 120
        return [
            _BarTextColumn(self.count_text, self.theme.description or self.theme.batch_progress),
            # the bar gives way to the numbers: 8 characters in 80 columns, 40 from 120 on
            CustomBarColumn(bar_width=max(8, min(40, width - 80)), complete_style=self.theme.progress_bar,
                            finished_style=self.theme.progress_bar_finished, pulse_style=self.theme.progress_bar_pulse),
            _BarTextColumn(self.clock_text, self.theme.time),
            _MetricsColumn(self.theme.metrics),
        ]  # Lightning appends its own metrics column after these: it stays empty (see _update_metrics)

    # -- the display -----------------------------------------------------------------------------

    def _init_progress(self, trainer: pl.Trainer) -> None:
        fresh = self.is_enabled and (self.progress is None or self._progress_stopped)
        super()._init_progress(trainer)
        if not fresh or self.progress is None:
            return
        console = self.progress.console
        self.live = console.is_interactive or console.is_jupyter
        if not self.live:  # a file or a dumb terminal: no frames at all, the lines below instead
            self.progress.live.transient = True  # nor the last frame when it stops
            self.progress.live.stop()
            self.progress.disable = True

    def _add_task(self, total_batches: Union[int, float], description: str, visible: bool = True) -> TaskID:
        assert self.progress is not None
        return self.progress.add_task(description, total=total_batches, visible=visible)  # styled by its column

    def _initialize_train_progress_bar_id(self) -> None:
        assert self.progress is not None
        step = self.trainer.global_step  # a resumed run starts at its checkpoint's step
        self.train_progress_bar_id = self.progress.add_task(self.train_description, total=self.total_steps(),
                                                            completed=step, first=step)

    def _print(self, text: str) -> None:
        if self._console is not None:
            self._console.print(text, markup=False, highlight=False, emoji=False, soft_wrap=True)

    def _print_step(self) -> None:
        task = self.train_progress_bar
        self._print(self.line(task))
        self._printed_step, self._printed_at = int(task.completed), time.monotonic()

    def _update_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """The training line's metrics (Lightning's metrics column is left empty)."""
        if self.is_disabled or self.progress is None or self.train_progress_bar_id is None:
            return
        train, _ = metrics_texts(self.get_metrics(trainer, pl_module))
        self.progress.update(self.train_progress_bar_id, metrics=train)

    # -- training --------------------------------------------------------------------------------

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """One training line for the whole run, created here (a run resumed mid-epoch gets no
        ``on_train_epoch_start``) and never reset at an epoch."""
        super().on_train_start(trainer, pl_module)
        self._printed_step, self._printed_at = None, -math.inf
        if self.is_disabled or self.progress is None:
            return
        self._initialize_train_progress_bar_id()
        self.refresh()
        if not self.live and trainer.global_step > 0:
            self._print_step()  # where a resumed run starts

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pass  # no epochs on the bar (Lightning resets its line here)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.is_disabled or self.progress is None:
            return
        if self.train_progress_bar_id is None:
            self._initialize_train_progress_bar_id()
        task = self.train_progress_bar
        step = trainer.global_step
        if step == task.completed:  # a batch that accumulated gradients: no optimizer step yet
            return
        self._update_metrics(trainer, pl_module)
        self.progress.update(self.train_progress_bar_id, completed=step)
        self.refresh()
        if not self.live and (self._printed_step is None or step >= task.total
                              or time.monotonic() - self._printed_at >= self.log_every_s):
            self._print_step()

    def _print_step_if_new(self, trainer: pl.Trainer) -> None:
        """Off a terminal: the training line, unless the current step's is printed already."""
        if (not self.live and self.is_enabled and self.progress is not None and self.train_progress_bar_id is not None
                and self._printed_step != trainer.global_step):
            self._print_step()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._print_step_if_new(trainer)  # where training stopped (interrupted, pruned, out of data)

    # -- validation ------------------------------------------------------------------------------

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._print_step_if_new(trainer)  # the step this validation follows
        super().on_validation_start(trainer, pl_module)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pass  # the latest validation's line stays (Lightning hides it), with its result

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if self.is_disabled or self.progress is None or self.val_progress_bar_id is None or trainer.sanity_checking:
            return
        _, val = metrics_texts(self.get_metrics(trainer, pl_module))
        self.progress.update(self.val_progress_bar_id, metrics=val)
        self.refresh()
        if not self.live:
            self._print(self.line(self.val_progress_bar))
