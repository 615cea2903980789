"""Bottleneck adapters (Houlsby et al. 2019, "Parameter-Efficient Transfer Learning for NLP").

A small two-layer network, ``x + up(act(down(x)))``, is applied to the output of the attention
and/or the MLP of every decoder layer, before the residual add, while every base weight stays
frozen. ``up`` starts at zero, so training starts from exactly the base model.

PEFT has no such tuner, so this module implements the method itself: it is the example of a
method that is not a PEFT wrapper. The adapters are attached as submodules of each decoder
layer (``model.layers.3.mlp_adapter``) and run by forward hooks on its attention and MLP
(``self_attn``/``mlp`` on Llama; found from the model by ``ftlab.models.structure``, so GPT-2's
``attn`` gets ``attn_adapter``), so the base model's parameter names are unchanged and the saved
file holds only adapter weights. A block with no feed-forward submodule (OPT's ``fc1``/``fc2`` sit
directly on the block) gets its MLP adapter after the feed-forward's output layer (``fc2_adapter``),
which is the same place: that layer's output is the MLP's, before dropout and the residual add.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ftlab.errors import ConfigError, ModelStructureError
from ftlab.methods.base import QUANTIZATIONS, BaseMethod, MethodConfig
from ftlab.models.structure import attention_name, decoder_blocks, linear_features, mlp_name

if TYPE_CHECKING:
    from ftlab.models.architecture import Architecture

ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU, "tanh": nn.Tanh}


def mlp_output_name(block: nn.Module, hidden: int) -> str:
    """The sublayer whose output is a block's feed-forward output: its MLP submodule
    (``structure.mlp_name``), or, in a block with none (OPT), the last linear layer among the
    block's direct children that maps back to the hidden size (OPT's ``fc2``)."""
    try:
        return mlp_name(block)
    except ModelStructureError:
        outputs = [n for n, c in block.named_children() if (f := linear_features(c)) is not None and f[1] == hidden]
        if outputs:
            return outputs[-1]
        raise


def _attention(block: nn.Module, hidden: int) -> str:
    return attention_name(block)


# where= -> the sublayers of a block an adapter follows, each found by its name finder (block, hidden size)
PLACES: dict[str, tuple[Callable[[nn.Module, int], str], ...]] = {
    "attention": (_attention,), "mlp": (mlp_output_name,), "both": (_attention, mlp_output_name)}
WEIGHTS_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"


@dataclass
class AdapterConfig(MethodConfig):
    lr: float = field(default=1e-3, metadata={"help": "learning rate (the optimizer's lr follows it)"})
    reduction_factor: int = field(
        default=16, metadata={"help": "bottleneck size = hidden size / reduction_factor (Houlsby/AdapterHub convention)",
                             "min": 1}
    )
    activation: str = field(default="gelu", metadata={"help": "non-linearity in the bottleneck: " + ", ".join(ACTIVATIONS),
                                                          "choices": list(ACTIVATIONS)})
    dropout: float = field(default=0.0, metadata={"help": "dropout inside the bottleneck", "min": 0, "lt": 1})
    where: str = field(default="both", metadata={"help": "after which sublayers: attention, mlp or both (Houlsby: both)",
                                                      "choices": list(PLACES)})


class Bottleneck(nn.Module):
    """``x + up(act(down(x)))`` with ``up`` zero-initialised: the identity until it trains."""

    def __init__(self, hidden: int, size: int, activation: str, dropout: float, dtype: torch.dtype) -> None:
        super().__init__()
        self.down = nn.Linear(hidden, size, dtype=dtype)
        self.act = ACTIVATIONS[activation]()
        self.dropout = nn.Dropout(dropout)
        self.up = nn.Linear(size, hidden, dtype=dtype)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.to(self.down.weight.dtype)  # a bf16/4-bit base can hand over another dtype
        return x + self.up(self.dropout(self.act(self.down(h)))).to(x.dtype)


def _adapt_output(adapter: Bottleneck):
    def hook(module: nn.Module, args: Any, output: Any) -> Any:
        if isinstance(output, tuple):  # attention returns (hidden states, attention weights, ...)
            return (adapter(output[0]), *output[1:])
        return adapter(output)

    return hook


class Adapter(BaseMethod):
    """Houlsby bottleneck adapters after attention and MLP; implemented by ftlab, not PEFT."""

    Config = AdapterConfig
    quantizations = QUANTIZATIONS  # the base stays frozen; adapters compute in full precision
    artifact = "adapter"
    cannot_merge = "the bottleneck has a non-linearity between its two layers, so it is no linear map to fold into a weight"
    tasks = ("causal_lm",)  # its saved file holds adapter weights only, not a classification head

    @classmethod
    def refuse_model(cls, arch: Architecture, cfg: Any) -> str | None:
        """A block without the sublayers ``method.where`` names, found on the meta skeleton."""
        where = str(cfg.method.get("where", "both"))
        if where not in PLACES:
            return None  # the field's choices refuse it
        try:
            _places(arch.skeleton, where)
        except ModelStructureError as missing:
            return f"{missing}; {_where_hint(arch.skeleton, where)}"
        return None

    def apply(self, model: nn.Module) -> nn.Module:
        c = self.config
        if c.activation not in ACTIVATIONS:
            raise ConfigError(f"method.activation={c.activation!r} is not valid; use one of: {', '.join(ACTIVATIONS)}")
        if c.where not in PLACES:
            raise ConfigError(f"method.where={c.where!r} is not valid; use one of: {', '.join(PLACES)}")
        hidden = model.config.hidden_size
        if not 1 <= c.reduction_factor <= hidden:
            raise ConfigError(f"method.reduction_factor={c.reduction_factor} must be between 1 and the hidden size {hidden}")
        try:
            places = _places(model, c.where)
        except ModelStructureError as missing:
            raise ModelStructureError(
                f"method=adapter on {type(model).__name__}: {missing}; {_where_hint(model, c.where)}") from None
        model.requires_grad_(False)
        dtype = _float_dtype(model)
        for block, names in zip(decoder_blocks(model), places):
            for place in names:
                sublayer = getattr(block, place)
                adapter = Bottleneck(hidden, hidden // c.reduction_factor, c.activation, c.dropout, dtype)
                block.add_module(f"{place}_adapter", adapter.to(_device(sublayer)))
                sublayer.register_forward_hook(_adapt_output(adapter))
        return model

    def save(self, model: nn.Module, directory: Path, state_dict: Mapping[str, torch.Tensor] | None = None) -> Path:
        directory.mkdir(parents=True, exist_ok=True)
        state = _adapter_state(model)
        if state_dict is not None:  # gathered from a sharded strategy's ranks: same names, whole tensors
            state = {name: state_dict[name].contiguous() for name in state}
        save_file(state, str(directory / WEIGHTS_FILE))
        (directory / CONFIG_FILE).write_text(json.dumps({"method": "adapter", **asdict(self.config)}, indent=2))
        return directory

    def load(self, base: nn.Module, directory: Path) -> nn.Module:
        model = self.apply(base)
        state = load_file(str(directory / WEIGHTS_FILE))
        expected = set(_adapter_state(model))
        missing, unexpected = expected - set(state), set(state) - expected
        if missing or unexpected:
            raise ConfigError(
                f"{directory / WEIGHTS_FILE} does not match method.reduction_factor/where of this config: "
                f"missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}"
            )
        model.load_state_dict(state, strict=False)
        return model


def _places(model: nn.Module, where: str) -> list[list[str]]:
    """For each decoder block, the names of the sublayers ``where`` puts an adapter after."""
    hidden = int(model.config.hidden_size)
    return [[find(block, hidden) for find in PLACES[where]] for block in decoder_blocks(model)]


def _where_hint(model: nn.Module, where: str) -> str:
    """The ``method.where`` choices that the model's blocks do have."""
    fits = []
    for choice in PLACES:
        if choice != where:
            try:
                _places(model, choice)
                fits.append(choice)
            except ModelStructureError:
                pass
    return f"use method.where={' or '.join(fits)}" if fits else "no method.where= fits this model's blocks"


def _adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().contiguous() for n, p in model.named_parameters() if "_adapter." in n}


def _float_dtype(model: nn.Module) -> torch.dtype:
    """The dtype adapters compute in: the base's floating dtype (fp32 beside 4/8-bit weights)."""
    for p in model.parameters():
        if p.dtype.is_floating_point:
            return p.dtype
    return torch.float32


def _device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device
