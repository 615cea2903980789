"""Methods on architecture families they cannot train as PEFT or transformers build them: refused
before any weight loads, in one line naming the layers and the override that helps (each with the
failure it prevents as its control), or made to work (OPT's adapters, Mixtral's LoRA).

Expected names come from the models themselves (their module types, transformers' auto classes),
not from the code under test; each refusal's control is the error PEFT or transformers raises when
the method is applied anyway.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import peft
import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from ftlab import testing
from ftlab.config import compose
from ftlab.errors import ConfigError, ModelStructureError
from ftlab.methods.adapter import Adapter, AdapterConfig
from ftlab.methods.loha import LoHa, LoHaConfig
from ftlab.methods.lokr import LoKr, LoKrConfig
from ftlab.methods.oft import Oft, OftConfig
from ftlab.models.architecture import Architecture
from ftlab.models.loading import load_model
from ftlab.models.structure import decoder_blocks
from ftlab.models.tiny import TINY_DEFAULTS

pytestmark = pytest.mark.usefixtures("one_thread")

NO_CONV1D = {"loha": (LoHa, LoHaConfig), "lokr": (LoKr, LoKrConfig), "oft": (Oft, OftConfig)}
GPT2_LAYERS = ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]  # GPT-2's four Conv1D layers per block


def _compose(cache_dir: Path, *overrides: str):
    return compose(["model=tiny", f"paths.cache_dir={cache_dir}", *overrides])


def _tiny(family: str, cache_dir: Path, quant: str = "none") -> nn.Module:
    model_cfg = OmegaConf.create({"name": "tiny", "kind": "tiny", **TINY_DEFAULTS, "family": family})
    return load_model(model_cfg, OmegaConf.create({"name": quant}), cache_dir=cache_dir)[0]


# -- 1. LoHa, LoKr, OFT have no layer for GPT-2's Conv1D ----------------------------------------------


@pytest.mark.parametrize("method", sorted(NO_CONV1D))
def test_gpt2_conv1d_is_refused_before_load_naming_its_layers(method: str, cache_dir: Path) -> None:
    model = _tiny("gpt2", cache_dir)
    conv = [n for n, m in decoder_blocks(model)[0].named_modules() if type(m).__name__ == "Conv1D"]
    assert conv == GPT2_LAYERS  # the model's own layer types: what the refusal must name
    with pytest.raises(ConfigError) as refused:
        _compose(cache_dir, "model.family=gpt2", f"method={method}")
    message = str(refused.value)
    assert message.startswith(f"method '{method}' cannot train tiny-gpt2: ")
    assert ", ".join(conv) in message and "Conv1D" in message and "use method=lora" in message
    assert "\n" not in message
    # the control: applied anyway, PEFT has no layer for Conv1D
    cls, config = NO_CONV1D[method]
    with pytest.raises((TypeError, ValueError), match="(?i)not supported"):
        cls(config(name=method)).apply(model)


@pytest.mark.parametrize("method,quant", [("oft", "nf4"), ("loha", "int8")])
def test_gpt2_conv1d_replaced_by_bitsandbytes_is_not_refused(method: str, quant: str, cache_dir: Path) -> None:
    """Quantizing replaces Conv1D by bitsandbytes linear layers, which the tuners do take."""
    _compose(cache_dir, "model.family=gpt2", f"method={method}", f"quantization={quant}")
    model = _tiny("gpt2", cache_dir, quant)
    cls, config = NO_CONV1D[method]
    wrapped = cls(config(name=method)).apply(model)
    assert any("c_attn" in n for n, p in wrapped.named_parameters() if p.requires_grad)


def test_conv1d_left_float_by_the_skip_list_is_named_with_the_target_list_that_avoids_it(cache_dir: Path) -> None:
    skip = "quantization.llm_int8_skip_modules=[mlp.c_fc,lm_head]"
    with pytest.raises(ConfigError) as refused:
        _compose(cache_dir, "model.family=gpt2", "method=oft", "quantization=nf4", skip)
    message = str(refused.value)
    assert "Conv1D, which GPT2LMHeadModel uses for mlp.c_fc (" in message
    override = "method.target_modules=[attn.c_attn,attn.c_proj,mlp.c_proj]"
    assert override in message
    _compose(cache_dir, "model.family=gpt2", "method=oft", "quantization=nf4", skip, override)  # what it says works


def test_families_without_conv1d_are_not_refused(cache_dir: Path) -> None:
    for method in NO_CONV1D:
        _compose(cache_dir, "model.family=opt", f"method={method}")


# -- 2. bottleneck adapters on OPT, whose blocks have no MLP submodule -------------------------------------


def test_adapter_trains_on_opt_after_the_feed_forward_output_layer(cache_dir: Path, tmp_path: Path) -> None:
    run = testing.contract_run("adapter", ["model.family=opt"], cache_dir=cache_dir, output_dir=tmp_path / "run")
    block = decoder_blocks(run.model)[0]
    children = dict(block.named_children())
    assert "mlp" not in children and {"fc1", "fc2"} <= set(children)  # OPT: no MLP module (the failure before)
    assert {"self_attn_adapter", "fc2_adapter"} <= set(children)
    # fc2's output is the MLP's: what reaches the adapter is fc2(act(fc1(x))) of the block's norm output
    seen: dict[str, torch.Tensor] = {}

    def keep(key: str, which: int):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            seen[key] = (output if which < 0 else args[which]).detach()
        return hook

    hooks = [block.final_layer_norm.register_forward_hook(keep("normed", -1)),
             block.fc2_adapter.register_forward_hook(keep("adapter_in", 0))]
    run.model.eval()
    with torch.no_grad():
        run.model(**run.inputs())
    for hook in hooks:
        hook.remove()
    expected = block.fc2(block.activation_fn(block.fc1(seen["normed"])))
    torch.testing.assert_close(seen["adapter_in"], expected.reshape(seen["adapter_in"].shape))
    testing.check_base_frozen(run)
    testing.check_steps_change_only_trainable(run)
    testing.check_save_load(run, tmp_path / "saved")


class _ToyAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q_proj = nn.Linear(8, 8)


class _ToyBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.self_attn = _ToyAttention()
        self.widen = nn.Linear(8, 16)  # no MLP module, and no layer back to the hidden size


class _ToyModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.config = SimpleNamespace(hidden_size=8, model_type="toy")
        self.layers = nn.ModuleList([_ToyBlock(), _ToyBlock()])


def test_adapter_is_refused_before_load_where_a_block_has_no_mlp_output(cache_dir: Path) -> None:
    arch = Architecture(SimpleNamespace(model_type="toy"), "toy-model")
    arch.__dict__["skeleton"] = _ToyModel()
    cfg = OmegaConf.create({"method": {"name": "adapter", "where": "both"}})
    reason = Adapter.refuse_model(arch, cfg)
    assert reason is not None and "_ToyBlock has no single MLP" in reason
    assert reason.endswith("use method.where=attention")
    cfg.method.where = "attention"
    assert Adapter.refuse_model(arch, cfg) is None
    with pytest.raises(ModelStructureError, match="no single MLP"):  # the control: it fails at apply
        Adapter(AdapterConfig(name="adapter", where="both", reduction_factor=2)).apply(_ToyModel())


# -- 3. LoRA on Mixtral, whose experts transformers 5 holds as fused parameters -------------------------------------


def test_lora_trains_mixtral_experts_with_dropout_on_its_linear_layers(cache_dir: Path, tmp_path: Path) -> None:
    from peft.tuners.lora import LoraLayer
    from peft.tuners.lora.layer import ParamWrapper

    base = _tiny("mixtral", cache_dir)
    fused = {n.rsplit(".", 1)[-1] for n, p in base.named_parameters() if p.dim() == 3}
    assert fused == {"gate_up_proj", "down_proj"}  # the experts are 3-D parameters, not linear layers
    with pytest.raises(ValueError, match="ParamWrapper does not work with lora_dropout"):  # the control: PEFT's
        peft.get_peft_model(base, peft.LoraConfig(target_modules="all-linear", lora_dropout=0.05))
    run = testing.contract_run("lora", ["model.family=mixtral"], cache_dir=cache_dir, output_dir=tmp_path / "run")
    assert run.cfg.method.dropout == 0.05
    wrapped = [m for m in run.model.modules() if isinstance(m, ParamWrapper)]
    assert {m.parameter_name for m in wrapped} >= fused  # the experts train too, as PEFT's all-linear says
    linear = [m for m in run.model.modules() if isinstance(m, LoraLayer) and not isinstance(m, ParamWrapper)]
    assert linear and all(isinstance(m.lora_dropout["default"], nn.Dropout) and m.lora_dropout["default"].p == 0.05
                          for m in linear)
    testing.check_steps_change_only_trainable(run)
    testing.check_save_load(run, tmp_path / "saved")


def test_dora_on_mixtral_experts_is_refused_naming_the_attention_only_targets(cache_dir: Path) -> None:
    with pytest.raises(ConfigError) as refused:
        _compose(cache_dir, "model.family=mixtral", "method=lora", "method.dora=true", "method.dropout=0")
    message = str(refused.value)
    override = "method.target_modules=[self_attn.q_proj,self_attn.k_proj,self_attn.v_proj,self_attn.o_proj]"
    assert "DoRA" in message and "gate_up_proj" in message and override in message
    _compose(cache_dir, "model.family=mixtral", "method=lora", "method.dora=true", override)
    with pytest.raises(ValueError, match="ParamWrapper does not work with use_dora"):  # the control: PEFT's
        peft.get_peft_model(_tiny("mixtral", cache_dir), peft.LoraConfig(target_modules="all-linear", use_dora=True))


# -- 4. no sequence-classification class for Granite ---------------------------------------------------------------


def test_granite_reward_and_classification_are_refused_before_load(cache_dir: Path) -> None:
    from transformers import AutoConfig, AutoModelForSequenceClassification

    with pytest.raises(ValueError, match="Unrecognized configuration class"):  # the control: transformers'
        AutoModelForSequenceClassification.from_config(AutoConfig.for_model("granite", hidden_size=16,
                                                                            num_attention_heads=2))
    for quant in ("none", "nf4"):
        with pytest.raises(ConfigError, match=r"^method 'reward' cannot train tiny-granite: transformers has no "
                                              r"sequence-classification class for granite \(GraniteConfig\)"):
            _compose(cache_dir, "model.family=granite", "method=reward", "data=preference", f"quantization={quant}")
    with pytest.raises(ConfigError, match=r"^task=classification cannot train tiny-granite: .*task=causal_lm"):
        _compose(cache_dir, "model.family=granite", "method=lora", "task=classification")
    _compose(cache_dir, "model.family=granite", "method=lora")
    _compose(cache_dir, "model.family=llama", "method=reward", "data=preference")
