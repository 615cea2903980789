"""The divergence guard (``ftlab.guards``): its rules on hand-made loss sequences, and real runs on
``model=tiny``: lr=1e3 is stopped with one line naming the step (and, guard off, the same run
completes: the control), a nan loss stops at step 0, and healthy runs at each method's own learning
rate are never stopped (the false-positive control)."""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Any, Optional

import pytest
import pytorch_lightning as pl
import torch
from torch import nn

from ftlab.errors import DivergedError, FtlabError, MethodError
from ftlab.guards import (
    DivergenceGuard,
    diverged_error,
    loss_divergence,
    loss_kind_of,
    loss_rise,
    nonfinite_grad,
    nonfinite_loss,
    output_size,
    uniform_loss,
    weight_growth,
)
from ftlab.method import BaseMethod, MethodConfig

pytestmark = pytest.mark.usefixtures("one_thread")

LN_V = math.log(1000)  # model=tiny's vocabulary: a uniform output's loss
# the first steps of a healthy lora run on model=tiny (default lr): a random model starts near ln V
HEALTHY = [6.928797, 6.877687, 6.954639, 6.912242, 6.894117, 6.929783, 6.843652, 6.954554, 6.937544, 6.915191]
# the same run at method.lr=1000: after 3 steps the output is uniform and the loss ln V on every batch
COLLAPSED = [6.928797, 6.877687, 6.950468, 6.907756, 6.907756, 6.907755, 6.907755, 6.907755]


# -- the rules, on hand-made sequences -------------------------------------------------------------


def test_a_loss_stuck_at_ln_v_fires_after_uniform_steps() -> None:
    assert uniform_loss(COLLAPSED[:-1], 1000) is None  # 4 steps at ln V: not yet
    found = uniform_loss(COLLAPSED, 1000)
    assert found is not None and found.reason == "uniform_loss"
    assert "stuck at 6.908 = ln(1000)" in found.seen and "5 steps" in found.seen
    assert uniform_loss(COLLAPSED, 1000, steps=None) is None  # turned off


def test_a_random_model_leaving_ln_v_slowly_does_not_fire() -> None:
    assert uniform_loss(HEALTHY, 1000) is None
    # no batch noise at all, falling 0.0006 per step through ln V: never 5 steps within 1e-3
    falling = [LN_V + 0.01 - 0.0006 * i for i in range(60)]
    assert all(uniform_loss(falling[: i + 1], 1000) is None for i in range(60))
    # a model that starts exactly uniform (a zero-initialised head) is not stopped before it leaves
    assert uniform_loss([LN_V] * 20, 1000) is None
    assert uniform_loss([LN_V] * 20 + [6.5, 6.4] + [LN_V] * 5, 1000) is not None  # ...but if it falls back


def test_the_uniform_value_is_ln_of_the_head_size() -> None:
    assert uniform_loss([1.0, 1.2, 0.9] + [math.log(4)] * 5, 4) is not None  # 4 labels
    assert uniform_loss([1.0, 1.2, 0.9] + [math.log(4)] * 5, 1000) is None
    assert uniform_loss(COLLAPSED, None) is None  # unknown head: off


def test_dpo_at_ln_2_never_fires() -> None:
    from ftlab.methods.dpo import Dpo

    assert loss_kind_of(Dpo) == "positive"  # no uniform value: ln 2 is DPO's start, by construction
    at_ln2 = [math.log(2)] * 40
    assert loss_divergence(at_ln2, "positive") is None
    assert loss_divergence([0.6931, 0.6930, 0.6935, 0.6929] * 10, "positive") is None


def test_a_loss_risen_k_times_for_m_steps_fires() -> None:
    rising = [6.93, 6.88, 189.5, 822.1, 3156.0, 3513.0, 2839.0]  # full fine-tuning at lr=10
    found = loss_rise(rising)
    assert found is not None and found.reason == "loss_rise" and "3x its starting value (6.93)" in found.seen
    assert loss_rise(rising[:-1]) is None  # 4 steps above: not yet
    spike = [6.9, 6.9, 6.9, 40.0, 40.0, 40.0, 40.0, 6.9, 40.0]  # 4 high steps, one normal: the run goes on
    assert loss_rise(spike) is None
    assert loss_rise(rising, factor=None) is None and loss_rise(rising, steps=None) is None


def test_the_rise_rule_skips_losses_that_can_be_zero_or_negative() -> None:
    rl = [0.0, 0.001, -0.002, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5]
    assert loss_divergence(rl, "any") is None
    assert loss_rise(rl) is None  # a start <= 0 has no ratio
    assert loss_divergence([float("nan")], "any").reason == "nonfinite_loss"  # non-finite: always


def test_weight_growth_and_non_finite_values() -> None:
    assert weight_growth(0.0475, 0.0475 * 5.9) is None  # the most a healthy run grew (prompt tuning, lr 0.03)
    found = weight_growth(0.0475, 0.0475 * 3741)  # lora at lr=1000, step 2
    assert found is not None and "3,741x" in found.seen
    assert weight_growth(0.0, 0.02) is None and weight_growth(0.0, 20.0) is not None  # zero-init: against 0.01
    assert weight_growth(0.0475, 1e6, limit=None) is None
    assert nonfinite_loss(6.9) is None and nonfinite_loss(float("inf")).reason == "nonfinite_loss"
    assert nonfinite_grad(1e30) is None and nonfinite_grad(float("nan")).reason == "nonfinite_grad"


def test_the_error_is_one_line_with_step_reason_and_cause() -> None:
    error = diverged_error(uniform_loss(COLLAPSED, 1000), 7, 1000.0)
    assert isinstance(error, FtlabError) and error.step == 7 and error.reason == "uniform_loss"
    assert str(error) == ("training diverged at step 7: the loss is stuck at 6.908 = ln(1000), the value of a "
                          "uniform output, for 5 steps; the learning rate (method.lr=1000.0) is the likely cause: "
                          "try 10x lower (method.lr=100)")
    at_start = diverged_error(nonfinite_loss(float("nan")), 0, 1e-4)
    assert "\n" not in str(at_start) and "not the cause" in str(at_start)
    import pickle

    again = pickle.loads(pickle.dumps(error))
    assert (str(again), again.step, again.reason) == (str(error), 7, "uniform_loss")


def test_loss_kinds_of_the_built_in_methods() -> None:
    from ftlab.registry import get_registry

    kinds = {name: loss_kind_of(info.cls) for name, info in get_registry().methods.items()}
    assert kinds["lora"] == kinds["full"] == kinds["prompt"] == "cross_entropy"
    assert kinds["dpo"] == kinds["kto"] == kinds["orpo"] == kinds["simpo"] == kinds["reward"] == "positive"
    assert kinds["grpo"] == kinds["ppo"] == "any"

    class Odd(BaseMethod):
        loss_kind = "hinge"

    with pytest.raises(MethodError, match="loss_kind='hinge'"):
        loss_kind_of(Odd)


def _replay(guard: DivergenceGuard, losses: list[float], size: Optional[int],
            kind: str = "cross_entropy") -> Optional[int]:
    """Feed ``losses`` (one per step) through the callback's loss path; the step it stops at, if any."""
    from types import SimpleNamespace

    guard._reset()
    guard.loss_kind, guard.size = kind, size
    trainer = SimpleNamespace(world_size=1, accumulate_grad_batches=1)
    for step, loss in enumerate(losses):
        guard._step = step
        try:
            guard.on_train_batch_end(trainer, None, {"loss": torch.tensor(loss)}, None, step)
        except DivergedError as error:
            return error.step
    return None


def test_the_callback_keeps_a_few_losses_and_decides_as_the_rules_do() -> None:
    guard = DivergenceGuard()
    long_healthy = HEALTHY * 30 + COLLAPSED[3:]  # 300 healthy steps, then 5 at ln V
    assert _replay(guard, long_healthy, 1000) == len(long_healthy) - 1 and len(guard.recent) == 6
    assert _replay(guard, HEALTHY * 30, 1000) is None
    assert _replay(guard, [LN_V] * 300, 1000) is None  # never left ln V
    rising = [6.93, 6.88, 189.5, 822.1, 3156.0, 3513.0, 2839.0]
    assert _replay(guard, rising, 1000) == 6 and _replay(guard, rising, 1000, kind="any") is None
    assert _replay(guard, [0.69] * 3 + [2.5] * 5, None, kind="positive") == 7
    for n in range(1, len(long_healthy) + 1, 7):  # the same verdict as the rules on the whole sequence
        whole = loss_divergence(long_healthy[:n], "cross_entropy", 1000)
        assert (_replay(guard, long_healthy[:n], 1000) is not None) == (whole is not None)


def test_the_guards_state_survives_a_checkpoint() -> None:
    from types import SimpleNamespace

    guard = DivergenceGuard()
    _replay(guard, HEALTHY, 1000)
    guard._rms0 = 0.0475
    state = guard.state_dict()
    resumed = DivergenceGuard()
    resumed.load_state_dict(state)
    resumed.on_fit_start(SimpleNamespace(precision_plugin=None), SimpleNamespace())
    assert resumed.state_dict() == state and resumed.count == len(HEALTHY)


def test_the_uniform_value_comes_from_the_models_head() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    sizes = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                 num_key_value_heads=1)
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=123, **sizes))
    classifier = LlamaForSequenceClassification(LlamaConfig(vocab_size=123, num_labels=4, **sizes))
    assert output_size(lm) == output_size(lm, "causal_lm") == 123
    assert output_size(classifier) == output_size(classifier, "classification") == 4
    assert output_size(classifier, "causal_lm") is None  # no LM head where one was expected: the rule is off


def test_config_section_and_from_config(tiny_cfg) -> None:
    cfg = tiny_cfg()
    assert cfg.divergence.enabled is True
    guard = DivergenceGuard.from_config(cfg)
    assert isinstance(guard, DivergenceGuard)
    assert (guard.uniform_steps, guard.uniform_tol, guard.rise_factor, guard.rise_steps, guard.max_weight_growth) == (
        5, 0.001, 3.0, 5, 1000)
    assert guard.task == "causal_lm" and guard.lr == cfg.method.lr
    assert DivergenceGuard.from_config(tiny_cfg("divergence.enabled=false")) is None
    off = DivergenceGuard.from_config(tiny_cfg("divergence.max_weight_growth=null", "divergence.rise_steps=null"))
    assert off.max_weight_growth is None and off.rise_steps is None


# -- real runs on model=tiny ---------------------------------------------------------------------------


@dataclass
class NanLossConfig(MethodConfig):
    lr: float = field(default=1e-4, metadata={"help": "learning rate (the optimizer's lr follows it)"})


class NanLoss(BaseMethod):
    """A deliberately broken method: full fine-tuning whose loss is nan."""

    Config = NanLossConfig
    trains_base = True

    def apply(self, model: nn.Module) -> nn.Module:
        return model.requires_grad_(True)

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        return model(**self.model_inputs(batch)).loss * float("nan")


def _fit(cfg, guard: Optional[DivergenceGuard], accumulate: int = 1) -> tuple[pl.Trainer, Any]:
    """Train ``cfg`` in-process as a run does (its module, data, optimizer and clipping), with ``guard``."""
    from ftlab.build import build

    run = build(cfg)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=int(cfg.trainer.max_steps),
                         accumulate_grad_batches=accumulate, gradient_clip_val=cfg.trainer.gradient_clip_val,
                         limit_val_batches=0, num_sanity_val_steps=0, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, logger=False,
                         callbacks=[guard] if guard is not None else [], default_root_dir=cfg.paths.output_dir)
    trainer.fit(run.module, datamodule=run.datamodule)
    return trainer, run


FAST = ("eval.generate=false", "eval.num_samples=0")


def test_lr_1e3_is_stopped_at_the_step_the_weights_blow_up(tiny_cfg) -> None:
    cfg = tiny_cfg("method.lr=1e3", *FAST, steps=10)
    with pytest.raises(DivergedError) as caught:
        _fit(cfg, DivergenceGuard.from_config(cfg))
    error = caught.value
    assert error.reason == "weight_growth" and error.step == 2  # after 2 updates: ~3,700x
    assert str(error).startswith("training diverged at step 2: the trainable weights grew ")
    assert "method.lr=1000.0) is the likely cause" in str(error) and "\n" not in str(error)


def test_lr_1e3_without_the_weight_rule_is_stopped_at_ln_v_and_completes_unguarded(tiny_cfg) -> None:
    cfg = tiny_cfg("method.lr=1e3", "divergence.max_weight_growth=null", *FAST, steps=10)
    guard = DivergenceGuard.from_config(cfg)
    with pytest.raises(DivergedError) as caught:
        _fit(cfg, guard)
    assert caught.value.reason == "uniform_loss" and caught.value.step == 7  # steps 3..7 at ln(1000)
    assert str(caught.value).startswith("training diverged at step 7: the loss is stuck at 6.908 = ln(1000), the "
                                        "value of a uniform output, for 5 steps; the learning rate (method.lr=1000.0)")
    assert guard.count == 8 and all(abs(x - LN_V) < 1e-5 for x in list(guard.recent)[-5:])

    # the control: the same run without the guard trains to the end, its loss at ln(1000)
    trainer, run = _fit(tiny_cfg("method.lr=1e3", "divergence.enabled=false", *FAST, steps=10), None)
    assert trainer.global_step == 10 and abs(run.module.train_losses[-1] - LN_V) < 1e-5


def test_the_guard_sees_each_steps_mean_loss_with_accumulation(tiny_cfg) -> None:
    cfg = tiny_cfg(*FAST, steps=4)
    guard = DivergenceGuard.from_config(cfg)
    trainer, run = _fit(cfg, guard, accumulate=2)
    batches = run.module.train_losses
    assert trainer.global_step == 4 and len(batches) == 8
    assert list(guard.recent) == pytest.approx([(batches[i] + batches[i + 1]) / 2 for i in range(0, 8, 2)], rel=1e-6)
    assert guard.loss_kind == "cross_entropy" and guard.size == 1000


def test_a_nan_loss_stops_at_step_0_in_one_line(tiny_cfg) -> None:
    from ftlab.testing import registered

    with registered("nan_loss_guard_test", NanLoss):
        for enabled in ("true", "false"):  # the training module's own check: guard or not
            cfg = tiny_cfg("method=nan_loss_guard_test", f"divergence.enabled={enabled}", *FAST, steps=3)
            with pytest.raises(DivergedError) as caught:
                _fit(cfg, DivergenceGuard.from_config(cfg))
            error = caught.value
            assert (error.step, error.reason) == (0, "nonfinite_loss")
            assert str(error).startswith("training diverged at step 0: the loss is nan; no update has been made yet, "
                                         "so the learning rate is not the cause") and "\n" not in str(error)


@pytest.mark.parametrize("method", ["lora", "full", "dpo"])
def test_healthy_runs_are_never_stopped(tiny_cfg, method: str) -> None:
    extra = ("data=preference",) if method == "dpo" else ()
    cfg = tiny_cfg(f"method={method}", *extra, *FAST, steps=30)
    guard = DivergenceGuard.from_config(cfg)
    trainer, run = _fit(cfg, guard)
    assert trainer.global_step == 30 and guard.count == 30
    kept = list(guard.recent)  # the last few steps' losses: one batch per step
    assert len(kept) == 6 and kept == pytest.approx(run.module.train_losses[-6:], rel=1e-6)


@pytest.mark.skipif("DivergenceGuard" not in inspect.getsource(__import__("ftlab.train").train),
                    reason="ftlab/train.py does not add the guard yet")
def test_a_diverged_run_is_recorded_and_saves_nothing(tiny_cfg) -> None:
    from pathlib import Path

    from ftlab.results import read_metrics
    from ftlab.train import train

    cfg = tiny_cfg("method.lr=1e3", *FAST, steps=10)
    with pytest.raises(DivergedError):
        train(cfg)
    out = Path(cfg.paths.output_dir)
    record = read_metrics(out)
    assert record["status"] == "diverged" and record["diverged_at_step"] == 2
    assert not (out / "adapter").exists()
