"""Stop a run whose training has diverged: ``DivergenceGuard``, a Lightning callback, and its rules.

A diverged run used to be saved and recorded ``completed``. The guard checks every optimizer step
and raises ``DivergedError`` (one line: the step, what it saw, the likely cause) when:

- the loss is not finite (``check_finite_loss``, which ``FineTuneModule.training_step`` calls on
  every batch, guard or not: nothing can be trained from a nan loss), or the total norm of the
  trainable gradients is not finite (before clipping; not under a GradScaler, which skips such
  steps itself);
- ``uniform_loss``: the loss sits at the value of a uniform output, ln of the head's size (the
  vocabulary, or the labels for ``task=classification``), for ``uniform_steps`` steps, after it had
  been elsewhere: only for a cross-entropy loss (``BaseMethod.loss_kind``);
- ``loss_rise``: the loss stays above ``rise_factor`` times its starting value for ``rise_steps``
  consecutive steps: not for a loss that can be <= 0 (RL surrogates);
- ``weight_growth``: the root mean square of the trainable weights grows more than
  ``max_weight_growth`` times its value at step 0.

The rules are pure functions of the numbers they look at, so they are tested on hand-made
sequences; the thresholds in ``ftlab/conf/train.yaml`` (``divergence:``) come from per-step
measurements of every built-in method on ``model=tiny`` at its own learning rate and at 10, 100
and 1000 (docs: divergence). Cost: one norm per trainable tensor for the gradients and one for the
weights per optimizer step, one host sync (about 1% of a ``model=tiny`` step on a CPU).
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

import pytorch_lightning as pl
import torch

from ftlab.errors import DivergedError, MethodError

__all__ = ["LOSS_KINDS", "START_STEPS", "WEIGHT_RMS_FLOOR", "Divergence", "DivergenceGuard", "check_finite_loss",
           "diverged_error", "loss_divergence", "loss_kind_of", "loss_rise", "nonfinite_grad", "nonfinite_loss",
           "output_size", "uniform_loss", "weight_growth"]

# what a method's loss is (``BaseMethod.loss_kind``): which rules can read it
LOSS_KINDS = ("cross_entropy", "positive", "any")
START_STEPS = 3  # the loss's starting value: the median of the first 3 steps (one bad batch or update moves it not)
# the weights' root mean square at step 0 is taken as at least this: a method whose trainable weights start
# at zero (OFT, LoRA-FA's B) has a growth measured against a typical small weight instead of nothing
WEIGHT_RMS_FLOOR = 0.01


@dataclass(frozen=True)
class Divergence:
    """What a rule saw: ``reason`` names the rule, ``seen`` says what, in words, for the message."""

    reason: str  # nonfinite_loss | nonfinite_grad | uniform_loss | loss_rise | weight_growth
    seen: str


# -- the rules ------------------------------------------------------------------------------------


def nonfinite_loss(loss: float) -> Optional[Divergence]:
    return None if math.isfinite(loss) else Divergence("nonfinite_loss", f"the loss is {loss}")


def nonfinite_grad(norm: float) -> Optional[Divergence]:
    if math.isfinite(norm):
        return None
    return Divergence("nonfinite_grad", f"the gradient norm is {norm} (before clipping)")


def uniform_loss(losses: Sequence[float], size: Optional[int], steps: Optional[int] = 5, tol: float = 1e-3,
                 left: bool = False) -> Optional[Divergence]:
    """The last ``steps`` losses (one per step) all lie within ``tol`` of ln(``size``), the loss of a
    uniform output over ``size`` classes, and some earlier one did not (or ``left``: one before
    ``losses``, for a caller that keeps only the recent ones): the model had left that value and fell
    back to it. A randomly initialised model starts near ln(size) and leaves it slowly, but its loss
    differs from batch to batch by 0.01 or more; a collapsed model gives ln(size) on every batch
    (within 1e-6). One that starts exactly there (a zero-initialised head) is not stopped before it leaves."""
    if not steps or size is None or size < 2 or len(losses) < steps:
        return None
    uniform = math.log(size)
    if any(abs(x - uniform) > tol for x in losses[-steps:]):
        return None
    if not left and all(abs(x - uniform) <= tol for x in losses[:-steps]):
        return None
    return Divergence("uniform_loss", f"the loss is stuck at {uniform:.4g} = ln({size}), the value of a uniform "
                                      f"output, for {steps} steps")


def loss_rise(losses: Sequence[float], factor: Optional[float] = 3.0, steps: Optional[int] = 5,
              start: Optional[float] = None) -> Optional[Divergence]:
    """The last ``steps`` losses all exceed ``factor`` times the starting value: the median of the
    first ``START_STEPS`` losses, checked once more steps than those have passed (or ``start``, for a
    caller that keeps only the recent losses; nan: not known yet). Off when the start is not positive."""
    if not factor or not steps:
        return None
    if start is None:
        if len(losses) < max(steps, START_STEPS) + 1:
            return None
        start = statistics.median(losses[:START_STEPS])
    if not start > 0 or len(losses) < steps:
        return None
    window = losses[-steps:]
    if all(x > factor * start for x in window):
        return Divergence("loss_rise", f"the loss stayed above {factor:g}x its starting value ({start:.4g}) for "
                                       f"{steps} steps (now {window[-1]:.4g})")
    return None


def weight_growth(rms0: float, rms: float, limit: Optional[float] = 1000.0,
                  floor: float = WEIGHT_RMS_FLOOR) -> Optional[Divergence]:
    """The trainable weights' root mean square ``rms`` is more than ``limit`` times ``rms0``, its
    value at step 0 (taken as at least ``floor``)."""
    if not limit:
        return None
    growth = rms / max(rms0, floor)
    if growth > limit:
        return Divergence("weight_growth", f"the trainable weights grew {growth:,.0f}x (root mean square {rms0:.3g} "
                                           f"at step 0, {rms:.3g} now; divergence.max_weight_growth={limit:g})")
    return None


def loss_divergence(losses: Sequence[float], kind: str, size: Optional[int] = None, *,
                    uniform_steps: Optional[int] = 5, uniform_tol: float = 1e-3, rise_factor: Optional[float] = 3.0,
                    rise_steps: Optional[int] = 5, left: bool = False,
                    start: Optional[float] = None) -> Optional[Divergence]:
    """The loss rules that apply to a loss of ``kind`` (``LOSS_KINDS``), on one loss per step (all so
    far, or the recent ones with ``left`` and ``start``): non-finite always, ``uniform_loss`` for a
    cross-entropy over ``size`` classes, ``loss_rise`` unless the loss can be <= 0 (``"any"``)."""
    found = nonfinite_loss(losses[-1]) if losses else None
    if found is None and kind == "cross_entropy":
        found = uniform_loss(losses, size, uniform_steps, uniform_tol, left)
    if found is None and kind != "any":
        found = loss_rise(losses, rise_factor, rise_steps, start)
    return found


# -- what the rules need from the method and the model ---------------------------------------------


def loss_kind_of(method: Any) -> str:
    """A method's (class or instance) ``loss_kind``; when empty, from its ``batch_kind`` and ``head``:
    ``"sft"`` with ``"lm"`` is a cross-entropy, ``"prompt"`` (RL surrogates) ``"any"``, the rest
    (preference and reward losses) ``"positive"``."""
    kind = getattr(method, "loss_kind", "") or ""
    if not kind:
        batch, head = getattr(method, "batch_kind", "sft"), getattr(method, "head", "lm")
        kind = "cross_entropy" if (batch, head) == ("sft", "lm") else "any" if batch == "prompt" else "positive"
    if kind not in LOSS_KINDS:
        raise MethodError(f"method '{getattr(getattr(method, 'config', None), 'name', method)}' declares "
                          f"loss_kind={kind!r}: use one of {', '.join(LOSS_KINDS)} (or leave it empty)")
    return kind


def output_size(model: torch.nn.Module, task: Optional[str] = None) -> Optional[int]:
    """How many classes the model's loss is a cross-entropy over: the LM head's outputs (the vocabulary),
    or the labels (``config.num_labels``) of a classifier (``task="classification"``; with no task
    given, a model without an LM head). None when it cannot be read (the uniform rule is then off)."""
    from ftlab.errors import ModelStructureError
    from ftlab.models.structure import lm_head

    if task != "classification":
        try:
            head = lm_head(model)
        except ModelStructureError:
            head = None
        if head is not None:
            weight = getattr(head, "weight", None)
            size = getattr(head, "out_features", None)  # also on quantized layers, whose weight is packed
            if size is None and isinstance(weight, torch.Tensor) and weight.dim() == 2:
                size = weight.shape[0]
            return int(size) if size else None
        if task is not None:
            return None
    labels = getattr(getattr(model, "config", None), "num_labels", None)
    return int(labels) if labels else None


# -- the error --------------------------------------------------------------------------------------


def diverged_error(divergence: Divergence, step: int, lr: Optional[float] = None,
                   lr_name: str = "method.lr") -> DivergedError:
    """The one-line ``DivergedError`` for what a rule saw at ``step``, with the likely cause."""
    if step == 0 and divergence.reason in ("nonfinite_loss", "nonfinite_grad"):
        cause = ("no update has been made yet, so the learning rate is not the cause: look at the method's loss, "
                 "the precision and the data (a batch without a labelled token gives a nan loss)")
    elif lr is None:
        cause = "the learning rate is the likely cause: try 10x lower"
    else:
        cause = (f"the learning rate ({lr_name}={float(lr)!r}) is the likely cause: "
                 f"try 10x lower ({lr_name}={lr / 10:g})")
    return DivergedError(f"training diverged at step {step}: {divergence.seen}; {cause}", step=step,
                         reason=divergence.reason)


def check_finite_loss(loss: torch.Tensor, step: int, lr: Optional[float] = None) -> float:
    """The loss as a float; a ``DivergedError`` when it is nan or inf (``FineTuneModule.training_step``)."""
    value = float(loss.detach())
    found = nonfinite_loss(value)
    if found is not None:
        raise diverged_error(found, step, lr)
    return value


# -- the callback -----------------------------------------------------------------------------------


class DivergenceGuard(pl.Callback):
    """Checks each optimizer step with the rules above and raises ``DivergedError`` when one fires.

    The gradient and weight rules run in ``on_before_optimizer_step`` (before clipping and before the
    update, with the step's gradients); the loss rules once the step's batches are done, on the
    step's mean loss. Each threshold set to None (or 0) turns its rule off. ``lr`` (the configured
    learning rate, for the message) defaults to the method's (``method.lr``) or the optimizer's.
    With several processes, the step's numbers are averaged over them first, so all stop together.
    It keeps only the recent losses (``recent``), the first ones and the step-0 weights' size, in
    Lightning checkpoints too: a resumed run is compared with the start of the run, not of the resume.
    """

    def __init__(self, *, uniform_steps: Optional[int] = 5, uniform_tol: float = 1e-3,
                 rise_factor: Optional[float] = 3.0, rise_steps: Optional[int] = 5,
                 max_weight_growth: Optional[float] = 1000.0, task: Optional[str] = None,
                 lr: Optional[float] = None) -> None:
        self.uniform_steps = uniform_steps
        self.uniform_tol = float(uniform_tol)
        self.rise_factor = rise_factor
        self.rise_steps = rise_steps
        self.max_weight_growth = max_weight_growth
        self.task = task
        self.lr = lr
        self._reset()

    @classmethod
    def from_config(cls, cfg: Any) -> Optional["DivergenceGuard"]:
        """The guard a composed run config asks for (its ``divergence`` section); None when disabled."""
        from ftlab.config import task_of

        section: Mapping[str, Any] = cfg.get("divergence") or {}
        if not section.get("enabled", True):
            return None
        method = cfg.get("method") or {}
        return cls(uniform_steps=section.get("uniform_steps", 5), uniform_tol=section.get("uniform_tol", 1e-3),
                   rise_factor=section.get("rise_factor", 3.0), rise_steps=section.get("rise_steps", 5),
                   max_weight_growth=section.get("max_weight_growth", 1000.0), task=task_of(cfg),
                   lr=method.get("lr"))

    def _reset(self) -> None:
        keep = max(self.uniform_steps or 0, self.rise_steps or 0, START_STEPS) + 1
        self.recent: deque[float] = deque(maxlen=keep)  # the mean loss of each of the last optimizer steps
        self.count = 0  # optimizer steps whose loss was checked
        self._first: list[float] = []  # the first START_STEPS of them (the start of loss_rise)
        self._left = False  # a loss before the last uniform_steps was off the uniform value
        self.loss_kind = "positive"
        self.size: Optional[int] = None  # classes of the cross-entropy (the uniform value is ln of it)
        self._rms0: Optional[float] = None
        self._batches: list[float] = []  # losses of the current step's batches
        self._step: Optional[int] = None  # the optimizer step just taken, whose loss is not checked yet
        self._lr, self._lr_name = self.lr, "method.lr"
        self._scaled = False  # a GradScaler handles non-finite gradients (it skips the step)

    def state_dict(self) -> dict[str, Any]:
        return {"recent": list(self.recent), "count": self.count, "first": list(self._first), "left": self._left,
                "rms0": self._rms0}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored = dict(state_dict)  # applied in on_fit_start, which Lightning calls after restoring

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._reset()
        restored, self._restored = getattr(self, "_restored", None), None
        if restored:
            self.recent.extend(restored["recent"])
            self.count, self._first = int(restored["count"]), list(restored["first"])
            self._left, self._rms0 = bool(restored["left"]), restored["rms0"]
        method = getattr(pl_module, "method", None)
        self.loss_kind = loss_kind_of(method) if method is not None else "positive"
        if self.loss_kind == "cross_entropy":
            self.size = output_size(getattr(pl_module, "model", pl_module), self.task)
        if self._lr is None:
            self._lr = getattr(getattr(method, "config", None), "lr", None)
        self._scaled = getattr(trainer.precision_plugin, "scaler", None) is not None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._lr is None and trainer.optimizers:  # not an ftlab method: the optimizer's learning rate
            groups = trainer.optimizers[0].param_groups
            self._lr = max(float(g.get("initial_lr", g.get("lr", 0.0))) for g in groups)
            self._lr_name = "lr"

    def _fail(self, found: Optional[Divergence], step: int) -> None:
        if found is not None:
            raise diverged_error(found, step, self._lr, self._lr_name)

    def _mean(self, trainer: pl.Trainer, values: list[float]) -> list[float]:
        if trainer.world_size <= 1:
            return values
        tensor = torch.tensor(values, dtype=torch.float64, device=trainer.strategy.root_device)
        return trainer.strategy.reduce(tensor, reduce_op="mean").tolist()

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        step = trainer.global_step
        self._step = step
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if not params:
            return
        norms = torch.stack([_total_norm([p.grad for p in params]), _total_norm([p.detach() for p in params])])
        grad_norm, weight_norm = self._mean(trainer, norms.tolist())  # the one host sync
        if not self._scaled:
            self._fail(nonfinite_grad(grad_norm), step)
        rms = weight_norm / math.sqrt(sum(p.numel() for p in params)) if math.isfinite(weight_norm) else math.inf
        if self._rms0 is None:
            self._rms0 = rms
        self._fail(weight_growth(self._rms0, rms, self.max_weight_growth), step)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if not isinstance(loss, torch.Tensor):
            return  # the step was skipped (training_step returned None)
        # Lightning hands the loss divided by accumulate_grad_batches (the window's share)
        self._batches.append(float(loss.detach()) * trainer.accumulate_grad_batches)
        if self._step is None:
            return  # the optimizer step of this accumulation window is still to come
        step, self._step = self._step, None
        (mean,) = self._mean(trainer, [sum(self._batches) / len(self._batches)])
        self._batches = []
        self.recent.append(mean)
        self.count += 1
        if len(self._first) < START_STEPS:
            self._first.append(mean)
        n = self.uniform_steps or 0
        if self.size and len(self.recent) > n and abs(self.recent[-n - 1] - math.log(self.size)) > self.uniform_tol:
            self._left = True  # it leaves the window the uniform rule looks at
        ready = self.count > max(self.rise_steps or 0, START_STEPS)
        start = statistics.median(self._first) if ready else math.nan
        self._fail(loss_divergence(list(self.recent), self.loss_kind, self.size, uniform_steps=self.uniform_steps,
                                   uniform_tol=self.uniform_tol, rise_factor=self.rise_factor,
                                   rise_steps=self.rise_steps, left=self._left, start=start), step)


def _total_norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The 2-norm of all the tensors' entries together, in float32, on the first one's device: one norm
    per tensor (``torch._foreach_norm``, grouped by device and dtype), then the norm of those; no host sync."""
    groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.device, t.dtype), []).append(t)
    device = tensors[0].device
    norms = [n.to(device) for group in groups.values() for n in torch._foreach_norm(group, 2, dtype=torch.float32)]
    return torch.linalg.vector_norm(torch.stack(norms))
