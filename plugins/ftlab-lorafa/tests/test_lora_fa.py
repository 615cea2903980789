"""ftlab's method contract for lora_fa, plus what is particular to LoRA-FA."""

from __future__ import annotations

from ftlab.config import compose
from ftlab.registry import get_registry
from ftlab.testing import MethodContract


class TestLoraFAContract(MethodContract):
    method = "lora_fa"
    overrides = ("method.r=4",)


class TestLoraFAPresetContract(MethodContract):
    method = "lora_fa_r64"


def test_only_b_trains(tmp_path) -> None:
    from ftlab.build import build

    cfg = compose(["model=tiny", "method=lora_fa", "logger=none", f"paths.output_dir={tmp_path}",
                   f"paths.cache_dir={tmp_path / 'cache'}"])
    model = build(cfg).model
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_B" in n for n in trainable)
    assert any("lora_A" in n for n, _ in model.named_parameters())


def test_registered_with_its_preset() -> None:
    registry = get_registry()
    assert registry.methods["lora_fa"].package == "ftlab-lorafa"
    preset = registry.presets["lora_fa_r64"]
    assert (preset.base, preset.values, preset.package) == ("lora_fa", {"r": 64, "alpha": 128}, "ftlab-lorafa")
