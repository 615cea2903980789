"""Each built-in method trains a few steps on model=tiny and changes only what it should."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ftlab.build import build
from ftlab.testing import changed_parameters, snapshot
from ftlab.train import fit, train


@pytest.mark.parametrize(
    "method,overrides",
    [
        ("full", []),
        ("freeze", ["method.last_n_blocks=1"]),
        ("lora", []),
        ("qlora", []),
    ],
)
def test_method_changes_exactly_its_trainable_parameters(tiny_cfg, tmp_path: Path, method: str, overrides: list[str]) -> None:
    run = build(tiny_cfg(f"method={method}", *overrides))
    trainable = {n for n, p in run.model.named_parameters() if p.requires_grad}
    assert trainable, "the method left nothing to train"
    before = snapshot(run.model)
    fit(run, tmp_path)
    changed = changed_parameters(run.model, before)
    assert changed == trainable
    total = sum(1 for _ in run.model.named_parameters())
    if method == "full":
        assert len(trainable) == total
    else:
        assert len(trainable) < total


def test_freeze_trains_last_blocks_and_named_modules_only(tiny_cfg) -> None:
    run = build(tiny_cfg("method=freeze", "method.last_n_blocks=1", "method.modules=[model.norm]"))
    trainable = {n for n, p in run.model.named_parameters() if p.requires_grad}
    assert trainable
    assert all(n.startswith("model.layers.1.") or n == "model.norm.weight" for n in trainable)
    assert any(n.startswith("model.layers.1.") for n in trainable)
    assert not any(n.startswith("model.layers.0.") or "embed" in n for n in trainable)


def test_freeze_rejects_unknown_module(tiny_cfg) -> None:
    with pytest.raises(ValueError, match=r"method.modules: no module of LlamaForCausalLM matches \['head_of_nothing'\]"):
        build(tiny_cfg("method=freeze", "method.modules=[head_of_nothing]"))


def test_qlora_base_is_held_in_4bit(tiny_cfg) -> None:
    import bitsandbytes as bnb

    run = build(tiny_cfg("method=qlora"))
    linear4 = [m for m in run.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert linear4
    assert all(m.weight.quant_type == "nf4" for m in linear4)
    assert not any(p.requires_grad for m in linear4 for p in m.parameters(recurse=False))


def test_lora_switches_reach_peft(tiny_cfg) -> None:
    run = build(tiny_cfg("method=lora", "method.r=4", "method.alpha=8", "method.rslora=true", "method.dora=true",
                         "method.target_modules=[q_proj,v_proj]"))
    peft_cfg = run.model.peft_config["default"]
    assert (peft_cfg.r, peft_cfg.lora_alpha, peft_cfg.use_rslora, peft_cfg.use_dora) == (4, 8, True, True)
    assert set(peft_cfg.target_modules) == {"q_proj", "v_proj"}
    assert any("lora_magnitude_vector" in n for n, _ in run.model.named_parameters())


def test_train_writes_complete_record_and_loss_falls(tiny_cfg, tmp_path: Path) -> None:
    cfg = tiny_cfg("method=lora", "method.lr=3e-3", steps=12)
    val_loss = train(cfg)
    record = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())
    for key in ("method", "model", "status", "train_loss_first", "train_loss_last", "val_loss", "trainable_params",
                "total_params", "peak_rss_mb", "tokens_per_s", "wall_s"):
        assert record[key] is not None, key
    assert record["status"] == "completed"
    assert record["val_loss"] == pytest.approx(val_loss)
    assert record["train_loss_last"] < record["train_loss_first"]
    assert (Path(cfg.paths.output_dir) / "adapter" / "adapter_model.safetensors").exists()


def test_failed_run_is_recorded(tiny_cfg) -> None:
    cfg = tiny_cfg("method=lora", "data.path=/nonexistent/data.jsonl")
    with pytest.raises(Exception):
        train(cfg)
    record = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())
    assert record["status"] == "failed"
    assert "/nonexistent/data.jsonl" in record["error"]


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_saved_adapter_loads_back_with_identical_logits(tiny_cfg, tmp_path: Path, method: str) -> None:
    from peft import PeftModel

    from ftlab.models.loading import load_model

    cfg = tiny_cfg(f"method={method}", "method.lr=1e-2")
    run = build(cfg)
    fit(run, tmp_path)
    adapter = tmp_path / "adapter"
    assert (adapter / "adapter_config.json").exists() and (adapter / "adapter_model.safetensors").exists()

    base, _ = load_model(cfg.model, cfg.quantization, cache_dir=cfg.paths.cache_dir)
    loaded = PeftModel.from_pretrained(base, adapter).eval()
    batch = next(iter(run.datamodule.val_dataloader()))
    with torch.no_grad():
        expected = run.model.eval()(**batch).logits
        got = loaded(**batch).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    base_only = load_model(cfg.model, cfg.quantization, cache_dir=cfg.paths.cache_dir)[0].eval()
    with torch.no_grad():
        assert not torch.allclose(base_only(**batch).logits, expected, atol=1e-4), "training changed nothing"


def test_max_length_too_short_for_any_answer_is_a_clear_error(tiny_cfg) -> None:
    from ftlab.data.sources import DataError

    with pytest.raises(DataError, match=r"every train example lost its assistant tokens.*raise data.max_length \(now 8\)"):
        train(tiny_cfg("method=lora", "data.max_length=8"))
