"""ftlab's method contract for lora_fa, plus what is particular to LoRA-FA.

Only ftlab's public API is imported here (docs/plugins.md lists it; ftlab's
``tests/test_plugin_api.py`` checks this file too).
"""

from __future__ import annotations

from importlib import metadata

from ftlab.config import compose
from ftlab.testing import MethodContract, contract_run


class TestLoraFAContract(MethodContract):
    method = "lora_fa"
    overrides = ("method.r=4",)


class TestLoraFAPresetContract(MethodContract):
    method = "lora_fa_r64"


def test_only_b_trains(tmp_path) -> None:
    model = contract_run("lora_fa", cache_dir=tmp_path / "cache", output_dir=tmp_path / "run").model
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_B" in n for n in trainable)
    assert any("lora_A" in n for n, _ in model.named_parameters())


def test_registered_with_its_preset() -> None:
    entry_points = {(ep.group, ep.name): ep.value for ep in metadata.distribution("ftlab-lorafa").entry_points}
    assert entry_points[("ftlab.methods", "lora_fa")] == "ftlab_lorafa:LoraFA"
    assert entry_points[("ftlab.presets", "ftlab_lorafa")] == "ftlab_lorafa.presets"
    cfg = compose(["model=tiny", "method=lora_fa_r64"])  # composes only if ftlab registered both
    assert (cfg.method.name, cfg.method.r, cfg.method.alpha) == ("lora_fa", 64, 128)
