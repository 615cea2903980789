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
from ftlab.models.quant import REPACK_SWITCH, cpu_flags, is_cpu_packed, keep_standard_4bit_layout
from ftlab.train import train

pytestmark = pytest.mark.usefixtures("one_thread")
REPACKING_CPU = has_avx512bf16() and not torch.cuda.is_available()
AVX512_BF16 = "avx512_bf16" in cpu_flags() and not torch.cuda.is_available()
NO_REPACK_HERE = ("bitsandbytes repacks 4-bit weights for CPU inference only on a CPU with AVX512-BF16, and this "
                  "one's flags (/proc/cpuinfo) lack avx512_bf16: without the repack there is no failure to show")


class Repacked(Exception):
    """Raised by a stand-in for bitsandbytes' repack, to see whether a forward would repack."""


def _tiny_4bit(cache_dir: Path, quant: str = "nf4", **sizes: int) -> torch.nn.Module:
    model_cfg = OmegaConf.create({"name": "tiny", "kind": "tiny", **TINY_DEFAULTS, **sizes})
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


# -- QLoRA on 4-bit layers with biases (GPT-2, Qwen2, OPT, GPT-NeoX) and without (Llama) -------------------------


def _qlora(family: str, cache_dir: Path) -> testing.ContractRun:
    """QLoRA on the tiny ``family`` in nf4, loaded through ftlab's loader (compose, ``load_base``)."""
    run = testing.quantized_run("qlora", "nf4", overrides=(f"model.family={family}", "method.dropout=0.0"),
                                cache_dir=cache_dir)
    biased = [layer for layer in _layers(run.model) if layer.bias is not None]
    assert bool(biased) == (family != "llama"), f"tiny {family}: 4-bit layers with biases: {len(biased)}"
    return run


def _evaluate_then_train(run: testing.ContractRun) -> dict[str, float]:
    """What a run does: an eval-mode, no-grad pass (a base score), then training steps; then the
    gradients reach every adapter and equal the dequantized float model's (``check_quantized_gradients``)."""
    run.model.eval()
    with torch.no_grad():
        run.model(**run.inputs())
    testing.train_steps(run, 2)
    grads = testing.gradients(run)
    adapters = {name: g for name, g in grads.items() if ".lora_" in name}
    assert adapters and all(g.abs().sum() > 0 for g in adapters.values()), "no gradient reaches some adapters"
    return testing.check_quantized_gradients(run)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_qlora_trains_after_an_eval_pass_with_and_without_biases(family: str, cache_dir: Path) -> None:
    run = _qlora(family, cache_dir)
    worst = _evaluate_then_train(run)
    assert not any(is_cpu_packed(layer) for layer in _layers(run.model))
    assert max(worst.values()) <= testing.GRAD_RTOL


@pytest.mark.skipif(not AVX512_BF16, reason=NO_REPACK_HERE)
@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_without_the_guard_an_eval_pass_breaks_qlora_here(family: str, cache_dir: Path) -> None:
    """The control: the same steps with bitsandbytes' repack switched back on. Biased layers crash
    in bitsandbytes' packed path (``result += bias`` on a view); unbiased ones train on wrong gradients."""
    run = _qlora(family, cache_dir)
    for layer in _layers(run.model):
        setattr(layer, REPACK_SWITCH, True)
    if family == "llama":
        with pytest.raises(AssertionError, match="gradients .*differ from the dequantized float model's"):
            _evaluate_then_train(run)
    else:
        with pytest.raises(RuntimeError, match="a view of a leaf Variable that requires grad"):
            _evaluate_then_train(run)
    assert all(is_cpu_packed(layer) for layer in _layers(run.model))


# -- 4-bit layers narrower than bitsandbytes' CPU repack takes ------------------------------------------------------

# the repack's layout: out_features in tiles of 32 rows, in_features in whole quantization blocks (64)
NARROW = {"hidden_size": 32, "intermediate_size": 48, "num_attention_heads": 2, "num_key_value_heads": 1}


def test_narrow_4bit_layers_evaluate_and_train(cache_dir: Path) -> None:
    """Layers whose sizes the CPU repack cannot tile (k_proj 32 -> 16, gate_proj 32 -> 48) still
    evaluate and train: ftlab never lets bitsandbytes repack, so its block-size limits never apply."""
    model = _tiny_4bit(cache_dir, **NARROW)
    layers = _layers(model)
    narrow = [layer for layer in layers if layer.out_features % 32 or layer.in_features % 64]
    assert narrow and len(narrow) == len(layers)
    model.eval()
    with torch.no_grad():
        model(torch.tensor([[1, 5, 9, 4]]))
    model.train()
    for layer in layers:
        x = torch.randn(2, layer.in_features, requires_grad=True)
        layer(x).sum().backward()
        assert x.grad is not None and torch.isfinite(x.grad).all()
    assert not any(is_cpu_packed(layer) for layer in layers)


@pytest.mark.skipif(not AVX512_BF16, reason=NO_REPACK_HERE)
def test_narrow_4bit_layers_fail_the_repack_when_it_is_allowed_here(cache_dir: Path) -> None:
    """The control: with the repack on, an eval-mode pass over k_proj (16 rows: not a whole tile
    of 32) trips bitsandbytes' block-size assertion."""
    k_proj = _tiny_4bit(cache_dir, **NARROW).model.layers[0].self_attn.k_proj
    assert (k_proj.out_features, k_proj.in_features) == (16, 32)
    setattr(k_proj, REPACK_SWITCH, True)
    with pytest.raises(AssertionError, match="N must be divisible by block_n"):
        _eval_forward(k_proj)
