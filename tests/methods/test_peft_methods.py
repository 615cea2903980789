"""What is particular to each method beyond the shared contract (tests/methods/test_contract.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from ftlab.build import build
from ftlab.errors import ConfigError
from ftlab.methods.adalora import AdaLora
from ftlab.methods.ia3 import IA3
from ftlab.methods.ln_tuning import LnTuning
from ftlab.methods.loha import LoHa
from ftlab.methods.lokr import LoKr
from ftlab.methods.multitask_prompt import MultitaskPrompt
from ftlab.methods.oft import Oft
from ftlab.methods.prefix import Prefix
from ftlab.methods.prompt import Prompt
from ftlab.methods.ptuning import PTuning
from ftlab.methods.vera import Vera
from ftlab.testing import changed_parameters, contract_run, fresh_base, snapshot
from ftlab.train import fit

PEFT_TUNERS = {
    "prefix": Prefix, "prompt": Prompt, "ptuning": PTuning, "multitask_prompt": MultitaskPrompt, "ia3": IA3,
    "loha": LoHa, "lokr": LoKr, "adalora": AdaLora, "vera": Vera, "oft": Oft, "ln_tuning": LnTuning,
}


@pytest.fixture
def run_of(cache_dir: Path, tmp_path: Path):
    return lambda method, *overrides: contract_run(method, overrides, cache_dir=cache_dir, output_dir=tmp_path / "run")


def test_lora_plus_gives_b_matrices_the_higher_learning_rate(run_of) -> None:
    run = run_of("lora_plus")
    groups = run.method.parameter_groups(run.model, 1e-3)
    names = {id(p): n for n, p in run.model.named_parameters()}
    slow, fast = groups
    assert slow["lr"] == 1e-3 and fast["lr"] == pytest.approx(16e-3)
    assert fast["params"] and all("lora_B" in names[id(p)] for p in fast["params"])
    assert slow["params"] and all("lora_A" in names[id(p)] for p in slow["params"])
    plain = run_of("lora").method.parameter_groups(run.model, 1e-3)
    assert len(plain) == 1 and "lr" not in plain[0]


def test_lora_plus_speeds_up_embedding_b_too(run_of) -> None:
    run = run_of("lora_plus", "method.target_modules=[q_proj,embed_tokens]", "method.plus_ratio=4")
    slow, fast = run.method.parameter_groups(run.model, 1e-3)
    names = {id(p): n for n, p in run.model.named_parameters()}
    assert fast["lr"] == pytest.approx(4e-3)
    assert {_lora_part(names[id(p)]) for p in fast["params"]} == {"lora_B", "lora_embedding_B"}
    assert {_lora_part(names[id(p)]) for p in slow["params"]} == {"lora_A", "lora_embedding_A"}


def _lora_part(name: str) -> str:
    return next(part for part in name.split(".") if part.startswith("lora_"))


@pytest.mark.parametrize("hooked", [True, False])
def test_adalora_budget_shrinks_through_the_step_hook(tiny_cfg, tmp_path: Path, monkeypatch, hooked: bool) -> None:
    run = build(tiny_cfg("method=adalora", "method.init_r=4", "method.target_r=1", steps=8))
    if not hooked:
        monkeypatch.setattr(run.method, "on_step_end", lambda model, step: None)
    singular_values = [p for n, p in run.model.named_parameters() if "lora_E" in n]
    assert sum(p.numel() for p in singular_values) == 4 * 7 * 2  # init_r per targeted linear, 7 per layer, 2 layers
    fit(run, tmp_path)
    kept = sum(int((p != 0).sum()) for p in singular_values)
    if hooked:
        assert 0 < kept <= 1 * 7 * 2  # all but target_r per linear (on average) masked to zero
        assert run.model.peft_config["default"].rank_pattern
    else:
        assert kept == 4 * 7 * 2  # the optimizer alone zeroes none: the masking is the hook's


def test_adalora_validation_loss_leaves_out_the_regulariser(run_of) -> None:
    run = run_of("adalora")
    with torch.no_grad():
        run.model.train()
        train_loss = run.method.loss(run.model, run.batch)
        run.model.eval()
        val_loss = run.method.loss(run.model, run.batch)
        lm_loss = run.model.base_model.model(**run.batch).loss
    assert val_loss == lm_loss
    assert train_loss > val_loss  # orthogonality regulariser of the SVD factors


def test_adalora_schedule_errors_name_the_fields(run_of) -> None:
    with pytest.raises(ConfigError, match=r"method.init_ratio=0.6 and method.final_ratio=0.5 must be >= 0 and sum to less than 1"):
        run_of("adalora", "method.init_ratio=0.6", "method.final_ratio=0.5")
    with pytest.raises(ConfigError, match=r"method.target_r=9 must not exceed method.init_r=4"):
        run_of("adalora", "method.init_r=4", "method.target_r=9")


@pytest.mark.parametrize("steps", [1, 3, 7, 100])
def test_adalora_schedule_follows_the_trainer_and_suits_short_runs(run_of, steps: int) -> None:
    config = run_of("adalora", f"trainer.max_steps={steps}").model.peft_config["default"]
    assert config.total_step == steps
    assert config.tinit + config.tfinal < steps  # PEFT refuses a schedule with no budgeting phase


@pytest.mark.parametrize("tokens", [12, 2])  # the text's ids repeated to fill, or cut short
def test_prompt_text_init_starts_from_the_text_embeddings(run_of, tokens: int) -> None:
    run = run_of("prompt", f"method.num_virtual_tokens={tokens}", "method.init_text=add two numbers")
    tokenizer = AutoTokenizer.from_pretrained(run.model.config.name_or_path)
    ids = tokenizer("add two numbers")["input_ids"]
    assert 2 < len(ids) < 12
    ids = (ids * (tokens // len(ids) + 1))[:tokens]
    words = run.model.get_input_embeddings()(torch.tensor(ids))
    prompt = run.model.prompt_encoder["default"].embedding.weight
    assert torch.equal(prompt, words)
    random_run = run_of("prompt", f"method.num_virtual_tokens={tokens}", "method.init=random")
    assert not torch.equal(random_run.model.prompt_encoder["default"].embedding.weight, words)


def test_prompt_methods_reject_bad_choices(run_of) -> None:
    with pytest.raises(ConfigError, match=r"method.init=words: expected one of: text \| random"):
        run_of("prompt", "method.init=words")
    with pytest.raises(ConfigError, match=r"method.encoder=gru: expected one of: mlp \| lstm"):
        run_of("ptuning", "method.encoder=gru")
    with pytest.raises(ConfigError, match=r"method.task_id=2 must be in \[0, method.num_tasks=2\)"):
        run_of("multitask_prompt", "method.num_tasks=2", "method.task_id=2")


def test_multitask_prompt_feeds_the_task_id(run_of) -> None:
    run = run_of("multitask_prompt", "method.num_tasks=3", "method.task_id=2")
    inputs = run.method.model_inputs(run.batch)
    assert inputs["task_ids"].tolist() == [2] * run.batch["input_ids"].shape[0]
    with pytest.raises(ValueError, match="task_ids"):
        run.model(**run.batch)  # PEFT needs the task: the hook is what supplies it


def test_multitask_prompt_trains_through_the_module(tiny_cfg, tmp_path: Path) -> None:
    run = build(tiny_cfg("method=multitask_prompt", "method.num_tasks=2", "method.task_id=1", steps=2))
    trainable = {n for n, p in run.model.named_parameters() if p.requires_grad}
    before = snapshot(run.model)
    result = fit(run, tmp_path)  # training and validation batches both need the task_ids
    assert changed_parameters(run.model, before) == trainable
    assert {n.rsplit(".", 1)[-1] for n in trainable} >= {"prefix_task_cols", "prefix_task_rows"}
    assert result["val_loss"] is not None and torch.isfinite(torch.tensor(result["val_loss"]))


def _quantized_base_of(method: str) -> str:
    """The most compressed base a method claims to train: nf4 where it does, else int8."""
    claimed = PEFT_TUNERS[method].quantizations
    return "nf4" if "nf4" in claimed else "int8"


@pytest.mark.parametrize("method", sorted(PEFT_TUNERS))
def test_trains_through_fit_on_its_quantized_base(tiny_cfg, tmp_path: Path, method: str) -> None:
    # 3 steps: the scheduler's first lr is 0, and zero-initialised factors (LoHa's, LoKr's, VeRA's)
    # pass no gradient to the others until they have moved once
    run = build(tiny_cfg(f"method={method}", f"quantization={_quantized_base_of(method)}", steps=3))
    assert run.model.get_base_model().is_quantized
    trainable = {n for n, p in run.model.named_parameters() if p.requires_grad}
    before = snapshot(run.model)
    result = fit(run, tmp_path)
    assert all(torch.isfinite(torch.tensor(result["train_losses"])))
    assert changed_parameters(run.model, before) == trainable  # every trained tensor moved, nothing frozen did


@pytest.mark.parametrize("method", ["loha", "lokr"])
def test_lycoris_methods_refuse_a_4bit_base(run_of, method: str) -> None:
    with pytest.raises(ConfigError, match=rf"method '{method}' cannot train on a quantization=nf4 base; it accepts quantization=none \| int8"):
        run_of(method, "quantization=nf4")


@pytest.mark.parametrize("method", ["loha", "lokr"])
def test_lycoris_4bit_refusal_is_still_needed(run_of, monkeypatch, method: str) -> None:
    """PEFT's LyCORIS layers reshape their update to the base weight's shape, which for a
    Linear4bit is the packed (n/2, 1) storage; when this starts passing, widen ``quantizations``."""
    monkeypatch.setattr(PEFT_TUNERS[method], "quantizations", ("nf4",))
    run = run_of(method, "quantization=nf4")
    with pytest.raises(RuntimeError, match="shape"):
        run.method.loss(run.model, run.batch)


def test_ia3_merges_from_a_4bit_base(run_of) -> None:
    """PEFT's IA3 refuses to unload or merge a model flagged 4-bit; the dequantized merge clears it.
    (float32 compute: with bf16, where ``auto`` picks it, the 4-bit model itself rounds to bf16.)"""
    run = run_of("ia3", "quantization=nf4", "quantization.bnb_4bit_compute_dtype=float32")
    with torch.no_grad():
        for vector in (p for p in run.model.parameters() if p.requires_grad):
            vector.mul_(1.5)
        inputs = run.inputs()
        expected = run.model.eval()(**inputs).logits
        merged = run.method.merge(run.model)
        assert not merged.is_loaded_in_4bit
        torch.testing.assert_close(merged.eval()(**inputs).logits, expected, rtol=0, atol=1e-4)


def test_adapter_is_the_identity_at_init_and_counts_as_houlsby(run_of) -> None:
    run = run_of("adapter", "method.reduction_factor=8")
    base = fresh_base(run)
    with torch.no_grad():
        base.eval(), run.model.eval()
        assert torch.equal(run.model(**run.batch).logits, base(**run.batch).logits)
    hidden, layers = run.model.config.hidden_size, run.model.config.num_hidden_layers
    size = hidden // 8
    per_adapter = hidden * size + size + size * hidden + hidden
    trainable = {n: p.numel() for n, p in run.model.named_parameters() if p.requires_grad}
    assert sum(trainable.values()) == per_adapter * 2 * layers  # after attention and after the MLP
    assert all("_adapter." in n for n in trainable)
    mlp_only = run_of("adapter", "method.reduction_factor=8", "method.where=mlp")
    assert sum(p.numel() for p in mlp_only.model.parameters() if p.requires_grad) == per_adapter * layers


def test_adapter_saves_only_its_weights(run_of, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    run = run_of("adapter")
    saved = run.method.save(run.model, tmp_path / "adapter")
    state = load_file(str(saved / "adapter_model.safetensors"))
    assert state and all("_adapter." in k for k in state)
    assert sum(t.numel() for t in state.values()) == sum(p.numel() for p in run.model.parameters() if p.requires_grad)


def test_adapter_rejects_bad_choices(run_of) -> None:
    with pytest.raises(ConfigError, match=r"method.activation=swish: expected one of: gelu \| relu \| silu \| tanh"):
        run_of("adapter", "method.activation=swish")
    with pytest.raises(ConfigError, match=r"method.where=ffn: expected one of: attention \| mlp \| both"):
        run_of("adapter", "method.where=ffn")
