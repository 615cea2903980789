"""What is particular to each method beyond the shared contract (tests/test_contract.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from ftlab.errors import ConfigError
from ftlab.testing import contract_run, fresh_base
from ftlab.train import build, fit


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


def test_adalora_budget_shrinks_through_the_step_hook(tiny_cfg, tmp_path: Path) -> None:
    run = build(tiny_cfg("method=adalora", "method.init_r=4", "method.target_r=1", steps=8))
    singular_values = [p for n, p in run.model.named_parameters() if "lora_E" in n]
    assert sum(p.numel() for p in singular_values) == 4 * 7 * 2  # init_r per targeted linear, 7 per layer, 2 layers
    fit(run, tmp_path)
    kept = sum(int((p != 0).sum()) for p in singular_values)  # training alone leaves every one non-zero
    assert 0 < kept <= 1 * 7 * 2  # the hook masked all but target_r per linear on average


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


def test_adalora_total_step_follows_the_trainer(run_of) -> None:
    assert run_of("adalora", "trainer.max_steps=7").model.peft_config["default"].total_step == 7


def test_prompt_text_init_starts_from_the_text_embeddings(run_of) -> None:
    run = run_of("prompt", "method.num_virtual_tokens=12", "method.init_text=add two numbers")
    tokenizer = AutoTokenizer.from_pretrained(run.model.config.name_or_path)
    ids = tokenizer("add two numbers")["input_ids"]
    ids = (ids * (12 // len(ids) + 1))[:12]
    words = run.model.get_input_embeddings()(torch.tensor(ids))
    prompt = run.model.prompt_encoder["default"].embedding.weight
    assert torch.equal(prompt, words)
    random_run = run_of("prompt", "method.num_virtual_tokens=12", "method.init=random")
    assert not torch.equal(random_run.model.prompt_encoder["default"].embedding.weight, words)


def test_prompt_methods_reject_bad_choices(run_of) -> None:
    with pytest.raises(ConfigError, match=r"method.init='words' is not valid; use one of: text, random"):
        run_of("prompt", "method.init=words")
    with pytest.raises(ConfigError, match=r"method.encoder='gru' is not valid; use one of: mlp, lstm"):
        run_of("ptuning", "method.encoder=gru")
    with pytest.raises(ConfigError, match=r"method.task_id=2 must be in \[0, method.num_tasks=2\)"):
        run_of("multitask_prompt", "method.num_tasks=2", "method.task_id=2")


def test_multitask_prompt_feeds_the_task_id(run_of) -> None:
    run = run_of("multitask_prompt", "method.num_tasks=3", "method.task_id=2")
    inputs = run.method.model_inputs(run.batch)
    assert inputs["task_ids"].tolist() == [2] * run.batch["input_ids"].shape[0]
    with pytest.raises(ValueError, match="task_ids"):
        run.model(**run.batch)  # PEFT needs the task: the hook is what supplies it


def test_lycoris_methods_refuse_a_4bit_base(run_of) -> None:
    with pytest.raises(ConfigError, match=r"method 'loha' cannot train on a quantization=nf4 base; it accepts quantization=none \| int8"):
        run_of("loha", "quantization=nf4")


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
    with pytest.raises(ConfigError, match=r"method.activation='swish' is not valid; use one of: gelu, relu, silu, tanh"):
        run_of("adapter", "method.activation=swish")
    with pytest.raises(ConfigError, match=r"method.where='ffn' is not valid; use one of: attention, mlp, both"):
        run_of("adapter", "method.where=ffn")
