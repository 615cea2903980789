"""Every contract check can fail: each runs here on a deliberately broken method and must reject it,
while the same check passes on the method it was broken from (``lora``). Checks that do not apply
to a method are reported as skipped with the reason, never as passed."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ftlab import testing
from ftlab.methods.lora import Lora
from ftlab.models.quant import quantized_layers

pytestmark = pytest.mark.usefixtures("one_thread")


def _base(model: nn.Module) -> nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


class NoTrainable(Lora):
    """Freezes what it just added."""

    def apply(self, model: nn.Module) -> nn.Module:
        return super().apply(model).requires_grad_(False)


class TrainsFrozen(Lora):
    """Unfreezes a base weight without saying ``trains_base``."""

    def apply(self, model: nn.Module) -> nn.Module:
        model = super().apply(model)
        _base(model).model.norm.weight.requires_grad_(True)
        return model


class FrozenDrift(Lora):
    """Writes into a frozen base weight after every step."""

    def on_step_end(self, model: nn.Module, global_step: int) -> None:
        with torch.no_grad():
            _base(model).model.norm.weight.add_(1e-3)


class DeadParameter(Lora):
    """Declares a trainable parameter no gradient ever reaches."""

    def apply(self, model: nn.Module) -> nn.Module:
        model = super().apply(model)
        model.register_parameter("unused_scale", nn.Parameter(torch.ones(4)))
        return model


class Sluggish(Lora):
    """Hands the optimizer a learning rate far too small to learn anything."""

    def parameter_groups(self, model: nn.Module, lr: float) -> list[dict[str, Any]]:
        return [{**group, "lr": lr * 1e-5} for group in super().parameter_groups(model, lr)]


class ForgetfulSave(Lora):
    """Saves its adapter without the second layer's tensors."""

    def save(self, model: nn.Module, directory: Path) -> Path:
        saved = super().save(model, directory)
        path = saved / "adapter_model.safetensors"
        save_file({k: v for k, v in load_file(path).items() if ".layers.1." not in k}, path)
        return saved


class MergeDropsUpdate(Lora):
    """'Merges' by taking the adapter out: the base without what trained."""

    def merge(self, model: nn.Module) -> nn.Module:
        return model.unload()


class NotQuantized(Lora):
    """Claims quantized bases, but trains on a dequantized copy."""

    def apply(self, model: nn.Module) -> nn.Module:
        if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
            model = model.dequantize()
            model.is_loaded_in_4bit = model.is_loaded_in_8bit = False
        return super().apply(model)


class GradientBlocker(Lora):
    """Stops the gradient at every frozen quantized layer, as bitsandbytes' CPU inference repack
    does: the adapters still train, on the wrong gradients."""

    def apply(self, model: nn.Module) -> nn.Module:
        model = super().apply(model)
        for _, _, layer in quantized_layers(model):
            layer.register_forward_hook(lambda module, args, output: output.detach())
        return model


class UnheldUnfreeze(Lora):
    """Unfreezes a weight from its step hook that ``parameter_groups`` never gave the optimizer:
    it gets gradients and never moves."""

    def on_train_step_start(self, model: nn.Module, optimizer: torch.optim.Optimizer, global_step: int) -> None:
        if global_step == 1:
            _base(model).model.norm.weight.requires_grad_(True)


class SilentMetric(Lora):
    """Declares a metric but logs it only while validating, never during training."""

    metrics = ("rank_budget",)

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        if not model.training:
            self.log("rank_budget", 1.0)
        return super().loss(model, batch)


class LogsBudget(Lora):
    """Declares a metric and logs it after every step, as it should (for the module controls)."""

    metrics = ("rank_budget",)

    def on_step_end(self, model: nn.Module, global_step: int) -> None:
        self.log("rank_budget", float(global_step))


Check = Callable[[testing.ContractRun, Path], Any]

CONTROLS: list[tuple[type[Lora], str, Check, str]] = [
    (NoTrainable, "none", lambda run, _: testing.check_trainable(run), "left no parameter that requires grad"),
    (TrainsFrozen, "none", lambda run, _: testing.check_base_frozen(run), "base weights require grad"),
    (FrozenDrift, "none", lambda run, _: testing.check_steps_change_only_trainable(run), "frozen parameters changed"),
    (DeadParameter, "none", lambda run, _: testing.check_steps_change_only_trainable(run),
     r"1 of \d+ trainable parameters did not change.*unused_scale"),
    (Sluggish, "none", lambda run, _: testing.check_loss_falls(run), r"fell by .*% in 64 steps, less than the 0.1%"),
    (Sluggish, "none", lambda run, tmp: testing.check_save_load(run, tmp), "moved the logits by only"),
    (ForgetfulSave, "none", lambda run, tmp: testing.check_save_load(run, tmp), "logits differ by .* after save"),
    (MergeDropsUpdate, "none", lambda run, _: testing.check_merge(run), "merged logits differ"),
    (MergeDropsUpdate, "nf4", lambda run, _: testing.check_merge(run), "merged model still holds"),
    (NotQuantized, "nf4", lambda run, tmp: testing.check_quantized_base(run, "nf4", tmp), "was not quantized"),
    (NotQuantized, "int8", lambda run, tmp: testing.check_quantized_base(run, "int8", tmp), "was not quantized"),
    (TrainsFrozen, "fp4", lambda run, tmp: testing.check_quantized_base(run, "fp4", tmp), "base weights require grad"),
    (ForgetfulSave, "nf4", lambda run, tmp: testing.check_quantized_base(run, "nf4", tmp), "after save"),
    (GradientBlocker, "nf4", lambda run, _: testing.check_quantized_gradients(run), "differ from the dequantized"),
    (GradientBlocker, "int8", lambda run, _: testing.check_quantized_gradients(run), "differ from the dequantized"),
    (UnheldUnfreeze, "none", lambda run, _: testing.check_steps_change_only_trainable(run),
     r"1 of \d+ trainable parameters did not change.*model\.norm\.weight"),
    (UnheldUnfreeze, "none", lambda run, tmp: testing.check_training_hooks(run, tmp),
     r"after on_train_step_start at step 1, parameters require grad that the optimizer does not hold"),
    (SilentMetric, "none", lambda run, tmp: testing.check_training_hooks(run, tmp),
     r"declares metric 'rank_budget' .* but logged no value for it"),
]


def _run(name: str, quant: str, cache_dir: Path, tmp_path: Path) -> testing.ContractRun:
    if quant == "none":
        return testing.contract_run(name, cache_dir=cache_dir, output_dir=tmp_path / "run")
    return testing.quantized_run(name, quant, cache_dir=cache_dir, output_dir=tmp_path / "run")


@pytest.mark.parametrize(("control", "quant", "check", "message"), CONTROLS,
                         ids=[f"{c.__name__}-{q}-{m.split()[0]}" for c, q, _, m in CONTROLS])
def test_check_rejects_its_broken_control_and_passes_lora(
    control: type[Lora], quant: str, check: Check, message: str, cache_dir: Path, tmp_path: Path
) -> None:
    with testing.registered("broken_control", control):
        run = _run("broken_control", quant, cache_dir, tmp_path)
        with pytest.raises((AssertionError, pytest.fail.Exception), match=message):
            check(run, tmp_path / "broken")
    check(_run("lora", quant, cache_dir, tmp_path), tmp_path / "lora")


def _every_batch(module: Any, batch: Any, batch_idx: int) -> None:
    """A training module that calls the step hook before every batch, not once per optimizer step."""
    module.method.on_train_step_start(module.model, module.optimizers(use_pl_optimizer=False), module.global_step)


def _log_kept_not_logged(module: Any, name: str, value: float) -> None:
    """A training module that keeps the method's metric for metrics.json but never logs it."""
    module.method_metrics[name] = value


@pytest.mark.parametrize(("hook", "replacement", "message"), [
    ("on_train_batch_start", _every_batch, r"the step hooks were called as .* not once each per step"),
    ("_log_method_metric", _log_kept_not_logged, r"metric 'rank_budget' never reached the run's logger"),
], ids=["hook-per-batch", "metric-not-logged"])
def test_hook_check_rejects_a_broken_training_module(hook: str, replacement: Callable, message: str,
                                                     monkeypatch: pytest.MonkeyPatch, cache_dir: Path,
                                                     tmp_path: Path) -> None:
    """The module's side of check_training_hooks: ftlab's wiring, broken, is rejected too."""
    from ftlab.module import FineTuneModule

    with testing.registered("broken_control", LogsBudget):
        testing.check_training_hooks(_run("broken_control", "none", cache_dir, tmp_path), tmp_path / "good")
        monkeypatch.setattr(FineTuneModule, hook, replacement)
        with pytest.raises(AssertionError, match=message):
            testing.check_training_hooks(_run("broken_control", "none", cache_dir, tmp_path), tmp_path / "broken")


@pytest.mark.parametrize(("check", "reason"), [
    (lambda run, _: testing.check_base_frozen(run), "trains the base weights"),
    (lambda run, _: testing.check_merge(run), "merge returns the trained model itself"),
])
def test_checks_that_do_not_apply_are_skipped_with_the_reason(check: Check, reason: str, cache_dir: Path,
                                                              tmp_path: Path) -> None:
    run = testing.contract_run("full", cache_dir=cache_dir)
    with pytest.raises(pytest.skip.Exception, match=reason):
        check(run, tmp_path)


def test_a_quantization_the_method_does_not_claim_is_skipped_with_the_bases_it_accepts(cache_dir: Path) -> None:
    with pytest.raises(pytest.skip.Exception, match=r"'full' does not train a quantization=nf4 base \(it accepts: none\)"):
        testing.quantized_run("full", "nf4", cache_dir=cache_dir)
    with pytest.raises(pytest.skip.Exception, match=r"'loha' does not train a quantization=fp4 base"):
        testing.quantized_run("loha", "fp4", cache_dir=cache_dir)


@pytest.mark.skipif(torch.cuda.is_available(), reason="DoRA trains int8 bases on a GPU")
def test_a_combination_the_method_refuses_is_skipped_with_its_reason(cache_dir: Path) -> None:
    with pytest.raises(pytest.skip.Exception, match="refuses quantization=int8 here: method.dora=true"):
        testing.quantized_run("dora", "int8", cache_dir=cache_dir)


def test_registered_refuses_a_name_that_is_installed() -> None:
    from ftlab.errors import MethodError

    with pytest.raises(MethodError, match="'lora' is installed already"):
        with testing.registered("lora", Lora):
            pass
