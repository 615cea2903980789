"""Evaluating a 4-bit model never changes how it trains, on every CPU.

bitsandbytes repacks a ``Linear4bit`` weight into a CPU inference layout the first time it runs in
eval mode without grad on an AVX512-BF16 CPU, and backward then drops the gradient through it.
ftlab switches that off for every 4-bit layer it loads (``ftlab.models.quant.keep_standard_4bit_layout``).
These tests hold on any machine; the ones that need the repack's kernel run where it exists and
fail once bitsandbytes changes the behaviour worked around, so the workaround is revisited.
"""

from __future__ import annotations

import json
from pathlib import Path

import bitsandbytes as bnb
import bitsandbytes.nn.modules as bnb_modules
import pytest
import torch
from bitsandbytes.functional import has_avx512bf16
from omegaconf import OmegaConf

from ftlab import testing
from ftlab.models.loading import load_model
from ftlab.models.tiny import TINY_DEFAULTS
from ftlab.models.quant import REPACK_SWITCH, keep_standard_4bit_layout
from ftlab.train import train

pytestmark = pytest.mark.usefixtures("one_thread")
REPACKING_CPU = has_avx512bf16() and not torch.cuda.is_available()


class Repacked(Exception):
    """Raised by a stand-in for bitsandbytes' repack, to see whether a forward would repack."""


def _tiny_4bit(cache_dir: Path, quant: str = "nf4") -> torch.nn.Module:
    model_cfg = OmegaConf.create({"name": "tiny", "kind": "tiny", **TINY_DEFAULTS})
    quant_cfg = OmegaConf.create({"name": quant, "bnb_4bit_use_double_quant": True})
    return load_model(model_cfg, quant_cfg, cache_dir=cache_dir)[0]


def _layers(model: torch.nn.Module) -> list[bnb.nn.Linear4bit]:
    return [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]


def _eval_forward(layer: torch.nn.Module) -> None:
    layer.eval()
    with torch.no_grad():
        layer(torch.randn(2, layer.in_features))


def test_bitsandbytes_still_repacks_in_eval_mode_through_the_switch_ftlab_turns_off(
    cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The upstream behaviour the workaround relies on: ``Linear4bit.forward`` repacks (through
    ``_convert_weight_packed_for_cpu``) exactly when ``support_avx512bf16_for_cpu`` is set, in eval
    mode without grad. If this fails, bitsandbytes changed it: revisit ``keep_standard_4bit_layout``."""

    def repack(*args, **kwargs):
        raise Repacked

    monkeypatch.setattr(bnb_modules, "_convert_weight_packed_for_cpu", repack)  # fails if renamed
    layer = _layers(_tiny_4bit(cache_dir))[0]
    assert getattr(layer, REPACK_SWITCH) is False, "ftlab's loader left the repack on"
    _eval_forward(layer)  # guarded: the standard path

    setattr(layer, REPACK_SWITCH, True)  # what bitsandbytes sets on an AVX512-BF16 CPU
    with pytest.raises(Repacked):
        _eval_forward(layer)
    layer.train()
    layer(torch.randn(2, layer.in_features))  # training mode never repacks


def test_every_4bit_layer_ftlab_loads_is_guarded(cache_dir: Path) -> None:
    for quant in ("nf4", "fp4"):
        layers = _layers(_tiny_4bit(cache_dir, quant))
        assert layers and all(getattr(layer, REPACK_SWITCH) is False for layer in layers)


def test_a_layer_repacked_before_training_is_refused_by_name(cache_dir: Path) -> None:
    model = _tiny_4bit(cache_dir)
    _layers(model)[0].weight.quant_state.packing_format_for_cpu = True
    with pytest.raises(RuntimeError, match=r"4-bit layer 'model\.layers\.0\.self_attn\.q_proj' was repacked"):
        keep_standard_4bit_layout(model)


@pytest.mark.skipif(not REPACKING_CPU, reason="bitsandbytes repacks 4-bit weights only on CPUs with AVX512-BF16")
def test_unguarded_repack_still_drops_gradients_here(cache_dir: Path) -> None:
    """The real bug on the hardware that has it: with the switch back on, the gradient check fails
    after an eval-mode pass (and only then). Once bitsandbytes gives its packed path an autograd
    kernel this test fails: the workaround may then go."""
    run = testing.quantized_run("qlora", "nf4", overrides=("method.dropout=0.0",), cache_dir=cache_dir)
    for layer in _layers(run.model):
        setattr(layer, REPACK_SWITCH, True)
    with pytest.raises(AssertionError, match="gradients after an eval-mode pass differ"):
        testing.check_quantized_gradients(run)


def _train_losses(tiny_cfg, tmp_path: Path, method: str, evaluate: bool) -> list[float]:
    out = tmp_path / f"{method}-{evaluate}"
    evaluation = (["eval.generate=true", "trainer.val_check_interval=2", "trainer.limit_val_batches=2"] if evaluate
                  else ["eval.generate=false", "trainer.limit_val_batches=0"])
    cfg = tiny_cfg(f"method={method}", "save_model=false", f"paths.output_dir={out}",
                   f"paths.cache_dir={tmp_path / 'cache'}", *evaluation, steps=6)  # fresh cache: the base is scored
    train(cfg)
    record = json.loads((out / "metrics.json").read_text())
    if evaluate:
        assert record["base_exact_match"] is not None and record["val_loss"] is not None
    else:
        assert record.get("base_exact_match") is None
    return record["train_losses"]


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_evaluating_never_changes_training(method: str, tiny_cfg, tmp_path: Path) -> None:
    """Same seed; one run scores the base model and validates every 2 steps, one does neither:
    the training losses are identical, step for step."""
    evaluated = _train_losses(tiny_cfg, tmp_path, method, evaluate=True)
    plain = _train_losses(tiny_cfg, tmp_path, method, evaluate=False)
    assert len(evaluated) == 6
    assert evaluated == plain
