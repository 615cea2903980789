"""Base for methods that are a PEFT tuner: one ``peft_config`` away from a working method.

PEFT injects the layers (``get_peft_model``), saves only what trained
(``adapter_config.json`` + ``adapter_model.safetensors``, loadable with plain
``PeftModel.from_pretrained``) and, for weight-space tuners, folds them back into the base
(``merge_and_unload``). A subclass returns its ``peft.PeftConfig``; everything else is shared.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import peft
from torch import nn

from ftlab.evaluation.classification import is_classifier
from ftlab.methods.base import BaseMethod

if TYPE_CHECKING:
    from ftlab.models.architecture import Architecture


__all__ = ["PeftMethod", "fused_parameter_targets", "is_quantized", "may_fuse_targets", "merge_dequantized",
           "module_names", "targeted_modules"]


def module_names(value: Any) -> Any:
    """A config's module-name list as PEFT wants it: a plain list (OmegaConf gives ListConfig),
    or a string (``"all-linear"``, a regex) or None (PEFT's per-architecture default) as is."""
    return value if value is None or isinstance(value, str) else list(value)


def is_quantized(model: nn.Module) -> bool:
    return bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False))


def matches_target(name: str, target: str) -> bool:
    """PEFT's rule for a name in a ``target_modules`` list: the module's name itself or a
    ``.``-suffix of it (``attn.c_proj`` matches ``transformer.h.0.attn.c_proj``)."""
    return name == target or name.endswith("." + target)


def targeted_modules(config: peft.PeftConfig, model: nn.Module) -> list[str]:
    """The qualified names of the modules of ``model`` that PEFT injects ``config``'s layers into,
    found by PEFT's own rules, so it works on a meta-device skeleton before any weight loads:
    ``"all-linear"`` resolved as PEFT resolves it (every ``nn.Linear``/``Conv1D`` but the output
    layer), a list matched by name or ``.``-suffix, a string as a regex, None as PEFT's default
    for the model type; ``exclude_modules``, ``layers_to_transform`` and ``modules_to_save`` apply."""
    from peft.tuners.tuners_utils import _maybe_include_all_linear_layers, check_target_module_exists

    probe = copy.deepcopy(config)
    if getattr(probe, "target_modules", None) is None:
        tuner = peft.mapping.PEFT_TYPE_TO_TUNER_MAPPING.get(probe.peft_type)
        model_type = getattr(getattr(model, "config", None), "model_type", "")
        defaults = getattr(tuner, "target_module_mapping", {}).get(model_type)
        if defaults is None:
            return []  # PEFT's own "Please specify target_modules" when it is applied
        probe.target_modules = defaults if isinstance(defaults, str) else set(defaults)
    probe = _maybe_include_all_linear_layers(probe, model)
    names = []
    for name, _ in model.named_modules():
        found = check_target_module_exists(probe, name)
        if found and type(found).__name__ != "_ExcludedModule":
            names.append(name)
    return names


def fused_parameter_targets(config: peft.PeftConfig, model: nn.Module) -> list[str]:
    """The parameters (not modules) PEFT's LoRA wraps for ``config`` on ``model`` (its
    ``ParamWrapper``): on transformers 5 a Mixtral-like MoE holds its experts as fused 3-D
    parameters (``mlp.experts.gate_up_proj``, ``down_proj``) and its router as a custom module,
    and PEFT 0.21 maps the v4 names ``"all-linear"`` (or ``w1``/``w2``/``w3``/``gate``) stood for
    onto them, so LoRA adapts them too. A ``ParamWrapper`` takes no dropout and no DoRA. Empty for
    every other model and tuner (PEFT converts LoRA configs only). Works on a meta skeleton."""
    try:
        from peft.utils.transformers_weight_conversion import convert_peft_config_for_transformers
    except ImportError:  # a PEFT without the v5 conversion: only what the config names itself
        return sorted(getattr(config, "target_parameters", None) or [])
    probe = copy.deepcopy(config)
    convert_peft_config_for_transformers(probe, model=model, conversions=None)
    return sorted(getattr(probe, "target_parameters", None) or [])


def may_fuse_targets(model_type: str) -> bool:
    """Whether PEFT rewrites LoRA targets for this model type onto fused parameters (the
    transformers-5 MoEs it maps: Mixtral, Qwen3-MoE, DeepSeek, OLMoE, ...): a quick test
    on the model type alone, before ``fused_parameter_targets`` needs the module tree. True when
    this PEFT does not say (its mapping moved), so the full check runs."""
    try:
        from peft.utils.transformers_weight_conversion import _MODEL_TO_CONVERSION_PATTERN, _MOE_TARGET_MODULE_MAPPING
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    except ImportError:
        return True
    return (get_checkpoint_conversion_mapping(model_type) is not None
            and _MODEL_TO_CONVERSION_PATTERN.get(model_type) in _MOE_TARGET_MODULE_MAPPING)


def _block_relative(model: nn.Module, names: list[str]) -> list[str]:
    """``names`` (qualified) relative to their decoder block (``transformer.h.0.attn.c_attn`` ->
    ``attn.c_attn``), once each, in order; a name outside the blocks stays qualified."""
    from ftlab.models.structure import decoder_blocks, module_name

    prefix = module_name(model, decoder_blocks(model)) + "."
    shown: list[str] = []
    for name in names:
        if name.startswith(prefix):
            name = name[len(prefix):].partition(".")[2]
        if name not in shown:
            shown.append(name)
    return shown


def _kept_float(name: str, cfg: Any) -> bool:
    """Whether the block layer ``name`` stays a float layer under ``cfg.quantization``:
    transformers' bitsandbytes integration replaces every ``nn.Linear`` and ``Conv1D`` of the
    blocks but those ``llm_int8_skip_modules`` names (its own matching rule)."""
    quantization = cfg.get("quantization") if hasattr(cfg, "get") else None
    if quantization is None or str(quantization.get("name", "none")) == "none":
        return True
    skip = quantization.get("llm_int8_skip_modules")
    if not skip:
        return False
    from transformers.quantizers.quantizers_utils import should_convert_module

    return not should_convert_module(name, [str(s) for s in skip])


class PeftMethod(BaseMethod):
    """A method whose model is ``peft.get_peft_model(base, self.peft_config(base))``."""

    artifact: ClassVar[str] = "adapter"
    # the tuner's name when PEFT has no layer for transformers' ``Conv1D`` (GPT-2's linear layers):
    # ``refuse_model`` then refuses a model whose targeted layers stay Conv1D (quantization=none)
    no_conv1d: ClassVar[str] = ""

    @classmethod
    def refuse_model(cls, arch: Architecture, cfg: Any) -> str | None:
        if cls.no_conv1d:
            return cls.conv1d_refusal(arch, cfg)
        return None

    @classmethod
    def conv1d_refusal(cls, arch: Architecture, cfg: Any) -> str | None:
        """Why PEFT cannot inject this tuner into ``arch``: the layers ``method.target_modules``
        selects include transformers' ``Conv1D`` (GPT-2's), for which the tuner has no layer,
        and the quantization leaves them so (bitsandbytes replaces Conv1D by its own linear
        layers). Names the layers, and the ``method.target_modules`` that leaves them out when
        other targeted layers are plain linear ones."""
        from omegaconf import OmegaConf

        skeleton = arch.skeleton
        config = cls(OmegaConf.to_object(cfg.method)).peft_config(skeleton)
        modules = dict(skeleton.named_modules())
        targets = targeted_modules(config, skeleton)
        conv = [n for n in targets if type(modules[n]).__name__ == "Conv1D" and _kept_float(n, cfg)]
        if not conv:
            return None
        others = [n for n in targets if n not in conv]
        shown = ", ".join(_block_relative(skeleton, conv))
        selected = cfg.method.get("target_modules")
        if selected is None:
            selected = f"null, PEFT's default for {arch.model_type}"
        elif not isinstance(selected, str):
            selected = f"[{','.join(map(str, selected))}]"
        fix = (f"set method.target_modules=[{','.join(_block_relative(skeleton, others))}], which leaves them out, "
               "or use method=lora" if others else "use method=lora, which has one")
        return (f"PEFT's {cls.no_conv1d} has no layer for transformers' Conv1D, which {arch.class_name} uses for "
                f"{shown} (selected by method.target_modules={selected}); {fix}")

    def peft_config(self, model: nn.Module) -> peft.PeftConfig:
        """The PEFT config built from ``self.config`` (``model`` is the base, for tuners that
        need its sizes or tokenizer-dependent settings)."""
        raise NotImplementedError

    def apply(self, model: nn.Module) -> nn.Module:
        if is_quantized(model):
            # casts norms to fp32 and makes the input embeddings require grad for checkpointing
            checkpointing = bool(getattr(model, "is_activation_checkpointing", False))
            model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing)
        config = self.peft_config(model)
        if is_classifier(model):
            # PEFT then wraps it as a sequence classifier and trains and saves the new head (score)
            config.task_type = peft.TaskType.SEQ_CLS
        return peft.get_peft_model(model, config)

    def load(self, base: nn.Module, directory: Path) -> nn.Module:
        return peft.PeftModel.from_pretrained(base, directory)

    def merge(self, model: nn.Module) -> nn.Module:
        super().merge(model)  # refuses with the reason when ``cannot_merge`` says why
        if is_quantized(model.get_base_model()):
            return merge_dequantized(model)
        return model.merge_and_unload()


def merge_dequantized(model: peft.PeftModel) -> nn.Module:
    """Fold the adapter into a dequantized copy of a 4/8-bit base.

    Merging into the quantized weights (PEFT's ``merge_and_unload`` on bitsandbytes layers)
    re-quantizes them and rounds most of a small update away. Instead: keep the adapter's
    weights, take the base out (``unload``), dequantize it to its compute dtype, put the same
    adapter back and merge in full precision: the result computes what the quantized model did.
    """
    config = model.peft_config[model.active_adapter]
    state = peft.get_peft_model_state_dict(model)
    inner = model.get_base_model()
    for flag in ("is_loaded_in_4bit", "is_loaded_in_8bit"):
        if hasattr(inner, flag):  # cleared first: PEFT's IA3 refuses even to unload a model flagged so
            setattr(inner, flag, False)
    base = model.unload().dequantize()
    restored = peft.get_peft_model(base, config)
    result = peft.set_peft_model_state_dict(restored, state)
    if result.unexpected_keys:
        raise RuntimeError(f"adapter weights did not fit the dequantized base: {result.unexpected_keys[:3]}")
    return restored.merge_and_unload()
