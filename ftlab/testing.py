"""The method contract: checks every method, built-in or third-party, must pass.

They run on ``model=tiny`` (a random 2-layer Llama) on CPU, in seconds per method, through the
same config composition and model loading as a real run. In a plugin's test file::

    from ftlab.testing import MethodContract

    class TestMyMethod(MethodContract):
        method = "my_method"            # the registered entry-point (or preset) name
        overrides = ("method.r=4",)     # optional extra config overrides

What each check guarantees:

- ``check_trainable``: ``apply`` leaves at least one parameter to train.
- ``check_base_frozen``: unless the method says ``trains_base``, no parameter of the loaded base
  model requires grad after ``apply`` (matched by identity, so wrapped layers count too).
- ``check_step_changes_only_trainable``: one optimizer step through the method's own
  ``parameter_groups``, ``loss`` and ``on_step_end`` changes some trainable parameter and no
  frozen one (AdamW without weight decay, so an untouched parameter stays bit-identical).
- ``check_loss_falls``: ``LOSS_STEPS`` steps on one fixed batch at the method's own learning
  rate lower the loss (measured in eval mode, without dropout, before and after).
- ``check_save_load``: ``save`` then ``load`` onto a freshly loaded base gives the same logits
  (``SAVE_LOAD_ATOL``; the same weights in the same order of operations).
- ``check_merge``: a method that can merge gives a plain transformers model with no PEFT or
  adapter module left and the same logits (``MERGE_ATOL``: folding changes float rounding); a
  method with ``cannot_merge`` refuses with a MethodError that gives its reason.
- ``check_quantized``: on every quantized base the method claims (``nf4`` and ``int8`` are
  tried; ``fp4`` shares nf4's code path), one step trains and the base stays frozen.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import pytest
import torch
from omegaconf import DictConfig
from torch import nn

from ftlab.config import compose
from ftlab.errors import MethodError
from ftlab.method import BaseMethod

LOSS_STEPS = 8
SAVE_LOAD_ATOL = 1e-6
MERGE_ATOL = 1e-4
QUANTIZED_CHECKED = ("nf4", "int8")


@dataclass
class ContractRun:
    """A method applied to a freshly loaded tiny base, with one fixed batch."""

    name: str
    cfg: DictConfig
    method: BaseMethod
    model: nn.Module
    base_param_ids: set[int]
    batch: dict[str, torch.Tensor]

    def inputs(self) -> dict[str, Any]:
        """The model inputs without labels, for comparing logits."""
        return {k: v for k, v in self.method.model_inputs(self.batch).items() if k != "labels"}


def contract_run(method: str, overrides: Sequence[str] = (), cache_dir: str | Path | None = None,
                 output_dir: str | Path | None = None) -> ContractRun:
    """Compose ``model=tiny method=<method>`` (plus ``overrides``), load the base, apply the method."""
    from ftlab.data.datamodule import FineTuneDataModule
    from ftlab.train import load_base

    settings = ["model=tiny", f"method={method}", "logger=none", "callbacks=none", "data.num_train=16",
                "data.num_val=8", "data.batch_size=4"]
    if cache_dir is not None:
        settings.append(f"paths.cache_dir={cache_dir}")
    if output_dir is not None:
        settings.append(f"paths.output_dir={output_dir}")
    cfg = compose([*settings, *overrides])
    applied, base, tokenizer = load_base(cfg)
    base_ids = {id(p) for p in base.parameters()}
    model = applied.apply(base)
    data = FineTuneDataModule(cfg.data)
    data.connect(tokenizer, max_length=getattr(model.config, "max_position_embeddings", None))
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    return ContractRun(method, cfg, applied, model, base_ids, dict(batch))


def fresh_base(run: ContractRun) -> nn.Module:
    """The same base model again, loaded from scratch, as an export or a new process would."""
    from ftlab.train import load_base

    return load_base(run.cfg)[1]


def _who(run: ContractRun) -> str:
    return f"method '{run.name}'"


def check_trainable(run: ContractRun) -> None:
    trainable = sum(p.numel() for p in run.model.parameters() if p.requires_grad)
    assert trainable > 0, f"{_who(run)}: apply() left no parameter that requires grad"


def check_base_frozen(run: ContractRun) -> None:
    if run.method.trains_base:
        return
    trained = [n for n, p in run.model.named_parameters() if p.requires_grad and id(p) in run.base_param_ids]
    assert not trained, f"{_who(run)}: base weights require grad but trains_base is False: {trained[:5]}"


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of every parameter, to compare against after training (``changed_parameters``)."""
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def changed_parameters(model: nn.Module, before: Mapping[str, torch.Tensor]) -> set[str]:
    """Names of the parameters that differ, bit for bit, from a ``snapshot``."""
    return {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}


def _step(run: ContractRun, optimizer: torch.optim.Optimizer, step: int) -> torch.Tensor:
    run.model.train()
    loss = run.method.loss(run.model, run.batch)
    loss.backward()
    optimizer.step()
    run.method.on_step_end(run.model, step)
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def _optimizer(run: ContractRun) -> torch.optim.Optimizer:
    lr = float(run.method.config.lr)
    return torch.optim.AdamW(run.method.parameter_groups(run.model, lr), lr=lr, weight_decay=0.0)


def check_step_changes_only_trainable(run: ContractRun) -> None:
    before = snapshot(run.model)
    trainable = {n for n, p in run.model.named_parameters() if p.requires_grad}
    loss = _step(run, _optimizer(run), 1)
    assert torch.isfinite(loss), f"{_who(run)}: training loss is {loss.item()}"
    changed = changed_parameters(run.model, before)
    assert changed, f"{_who(run)}: one optimizer step changed no parameter"
    frozen_changed = sorted(changed - trainable)
    assert not frozen_changed, f"{_who(run)}: frozen parameters changed in one step: {frozen_changed[:5]}"


@torch.no_grad()
def _eval_loss(run: ContractRun) -> float:
    run.model.eval()
    return float(run.method.loss(run.model, run.batch))


def check_loss_falls(run: ContractRun, steps: int = LOSS_STEPS) -> None:
    first = _eval_loss(run)
    _train(run, steps)
    last = _eval_loss(run)
    assert last < first, f"{_who(run)}: loss on a fixed batch did not fall in {steps} steps: {first:.5f} -> {last:.5f}"


@torch.no_grad()
def _logits(model: nn.Module, inputs: Mapping[str, Any]) -> torch.Tensor:
    model.eval()
    return model(**inputs).logits.float()


def _train(run: ContractRun, steps: int = 2) -> None:
    """``steps`` optimizer steps on the fixed batch. Before save/load and merge checks, a couple
    of them make zero-initialised parts (LoRA's B, adapters' up) non-zero, so that dropping them
    would show."""
    optimizer = _optimizer(run)
    for step in range(1, steps + 1):
        _step(run, optimizer, step)


def check_save_load(run: ContractRun, directory: str | Path) -> None:
    _train(run)
    expected = _logits(run.model, run.inputs())
    saved = run.method.save(run.model, Path(directory) / run.method.artifact)
    loaded = run.method.load(fresh_base(run), saved)
    got = _logits(loaded, run.inputs())
    assert got.shape == expected.shape, f"{_who(run)}: logits after load have shape {tuple(got.shape)}, not {tuple(expected.shape)}"
    diff = (got - expected).abs().max().item()
    assert diff <= SAVE_LOAD_ATOL, f"{_who(run)}: logits differ by {diff:.2e} after save+load (tolerance {SAVE_LOAD_ATOL})"


def check_merge(run: ContractRun) -> None:
    from transformers import PreTrainedModel

    if run.method.cannot_merge:
        with pytest.raises(MethodError) as refused:
            run.method.merge(run.model)
        assert run.method.cannot_merge in str(refused.value), f"{_who(run)}: merge refused without saying why"
        return
    _train(run)
    expected = _logits(run.model, run.inputs())
    merged = run.method.merge(run.model)
    assert isinstance(merged, PreTrainedModel), f"{_who(run)}: merge returned {type(merged).__name__}, not a transformers model"
    leftovers = sorted({type(m).__name__ for m in merged.modules() if type(m).__module__.startswith("peft.")})
    assert not leftovers, f"{_who(run)}: merged model still holds PEFT modules {leftovers}"
    diff = (_logits(merged, run.inputs()) - expected).abs().max().item()
    assert diff <= MERGE_ATOL, f"{_who(run)}: merged logits differ by {diff:.2e} (tolerance {MERGE_ATOL})"


def check_quantized(method: str, overrides: Sequence[str] = (), cache_dir: str | Path | None = None) -> list[str]:
    """One step on each quantized base the method claims; returns the quantizations checked."""
    from ftlab.registry import get_registry

    claimed = get_registry().get(method).cls.quantizations
    checked = [q for q in QUANTIZED_CHECKED if q in claimed]
    for quant in checked:
        run = contract_run(method, [*overrides, f"quantization={quant}"], cache_dir=cache_dir)
        run.name = f"{method}' on quantization='{quant}"
        check_trainable(run)
        check_base_frozen(run)
        check_step_changes_only_trainable(run)
    return checked


class MethodContract:
    """Subclass with ``method = "name"`` (and optional ``overrides``); pytest collects each check."""

    method: str = ""
    overrides: Sequence[str] = ()

    @pytest.fixture(scope="class")
    def contract_cache(self, tmp_path_factory: pytest.TempPathFactory) -> Path:
        """The model cache: $FTLAB_CACHE when set, else one fresh folder per test class."""
        env = os.environ.get("FTLAB_CACHE")
        return Path(env) if env else tmp_path_factory.mktemp("ftlab-cache")

    @pytest.fixture
    def run(self, contract_cache: Path, tmp_path: Path) -> ContractRun:
        assert self.method, f"{type(self).__name__}.method must name the method under test"
        return contract_run(self.method, self.overrides, cache_dir=contract_cache, output_dir=tmp_path / "run")

    def test_has_trainable_parameters(self, run: ContractRun) -> None:
        check_trainable(run)

    def test_base_weights_frozen(self, run: ContractRun) -> None:
        check_base_frozen(run)

    def test_step_changes_only_trainable(self, run: ContractRun) -> None:
        check_step_changes_only_trainable(run)

    def test_loss_falls_on_a_fixed_batch(self, run: ContractRun) -> None:
        check_loss_falls(run)

    def test_save_then_load_gives_same_logits(self, run: ContractRun, tmp_path: Path) -> None:
        check_save_load(run, tmp_path)

    def test_merge_gives_same_logits_or_says_why_not(self, run: ContractRun) -> None:
        check_merge(run)

    def test_trains_on_each_quantized_base_it_accepts(self, contract_cache: Path) -> None:
        check_quantized(self.method, self.overrides, cache_dir=contract_cache)
