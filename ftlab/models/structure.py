"""Where the parts of a transformer are, found from the model rather than from Llama's names.

A method that works on "the decoder blocks", "the final norm" or "the attention of each block"
asks here instead of spelling ``model.model.layers`` or ``self_attn``, so it runs on GPT-2, OPT,
GPT-NeoX, Qwen2, Falcon, ... as it does on Llama, and under a PEFT wrapper as on a bare model.
This module is public API for method plugins (docs/plugins.md)::

    from ftlab.models.structure import decoder_blocks, final_norm

    blocks = decoder_blocks(model)          # nn.ModuleList: model.layers on Llama, transformer.h on GPT-2
    final_norm(model).requires_grad_(True)  # model.norm on Llama, transformer.ln_f on GPT-2

How each part is found:

- ``backbone(model)``: the transformers model under any PEFT wrapper (``get_base_model()``),
  then its base model (``base_model_prefix``: ``model``, ``transformer``, ``gpt_neox``, ...), then
  its decoder (``get_decoder()``: OPT's ``model.decoder``).
- ``decoder_blocks(model)``: among the backbone's ``nn.ModuleList``s whose entries all have one
  class, the one holding the most parameters (the repeated transformer blocks).
- ``final_norm(model)``: a direct child of the module holding the blocks whose class name
  contains ``Norm`` (``LlamaRMSNorm``, ``LayerNorm``); of several, those registered after the
  blocks, and of those the last (Bloom's embedding norm comes before its blocks).
- ``input_embeddings(model)`` / ``lm_head(model)``: the model's ``get_input_embeddings()`` /
  ``get_output_embeddings()`` (tied embeddings give the same weight twice).
- ``attention_name(block)`` / ``mlp_name(block)``: the direct child of a block that is its
  attention (class name containing ``Attention``; of several, the one named ``self...``) or its
  feed-forward network (class name containing ``MLP``, ``FeedForward``, ``FFN`` or ``MoE``);
  attribute names (``self_attn``, ``attn``, ``attention``, ``mlp``, ``feed_forward``, ...) when
  the class names say nothing.
- ``linear_layer_names(model)``: the names, relative to a block, of the linear-like layers in
  the blocks (``nn.Linear`` and its bitsandbytes/Falcon subclasses, GPT-2's ``Conv1D``, a PEFT
  layer wrapping one): what PEFT's ``target_modules`` takes.
- ``norm_layer_names(model)``: the names, relative to a block, of the norm layers in the blocks
  (class name containing ``Norm``, at any depth: ``input_layernorm``, OLMo-2's
  ``self_attn.q_norm``; a PEFT layer wrapping one counts as the norm).
- ``kv_cache_layout(model)``: how many key/value heads, of what size, the attention writes into
  the cache: read from the keys the first block's attention hands its cache in a forward pass of
  a meta-device copy (no weights, no compute), so a stray ``num_key_value_heads`` in a config, or
  Falcon's single multi-query head, cannot mislead it.

Whatever cannot be found raises ``ftlab.errors.ModelStructureError`` (a ``ConfigError``) naming
the model's class and the part that is missing.
"""

from __future__ import annotations

import inspect
from typing import Iterator

from torch import nn

from ftlab.errors import ModelStructureError

__all__ = [
    "attention_module",
    "attention_name",
    "backbone",
    "decoder_blocks",
    "final_norm",
    "input_embeddings",
    "is_linear",
    "linear_features",
    "kv_cache_layout",
    "linear_layer_names",
    "lm_head",
    "mlp_module",
    "mlp_name",
    "module_name",
    "norm_layer_names",
]

_ATTENTION_CLASS = ("attention",)
_ATTENTION_NAMES = ("self_attn", "self_attention", "attn", "attention")
_MLP_CLASS = ("mlp", "feedforward", "ffn", "moe")
_MLP_NAMES = ("mlp", "feed_forward", "ffn", "block_sparse_moe")


def _unwrap_peft(model: nn.Module) -> nn.Module:
    """The transformers model under PEFT wrappers (``PeftModel.get_base_model()``)."""
    for _ in range(8):  # wrappers nest at most a couple of levels deep
        get_base = getattr(model, "get_base_model", None)
        if not callable(get_base) or not type(model).__module__.startswith("peft."):
            return model
        inner = get_base()
        if not isinstance(inner, nn.Module) or inner is model:
            return model
        model = inner
    return model


def backbone(model: nn.Module) -> nn.Module:
    """The module holding the decoder blocks' stack, through PEFT and task wrappers:
    ``LlamaModel`` for a ``LlamaForCausalLM`` (or a PEFT model around it), OPT's ``OPTDecoder``."""
    inner = _unwrap_peft(model)
    prefix = getattr(inner, "base_model_prefix", "")
    base = getattr(inner, prefix, None) if isinstance(prefix, str) and prefix else None
    if isinstance(base, nn.Module):
        inner = base
    get_decoder = getattr(inner, "get_decoder", None)
    if callable(get_decoder):
        try:
            decoder = get_decoder()
        except Exception:  # some architectures raise rather than return None
            decoder = None
        if isinstance(decoder, nn.Module):
            inner = decoder
    return inner


def _parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _block_lists(module: nn.Module) -> Iterator[tuple[str, nn.ModuleList]]:
    for name, child in module.named_modules():
        if isinstance(child, nn.ModuleList) and len(child) > 0 and len({type(b) for b in child}) == 1:
            yield name, child


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The repeated transformer blocks: of the ``nn.ModuleList``s whose entries share one class,
    the one holding the most parameters (``model.layers`` of Llama/Qwen2, ``transformer.h`` of
    GPT-2/Falcon, ``gpt_neox.layers``, OPT's ``model.decoder.layers``)."""
    found = list(_block_lists(backbone(model))) or list(_block_lists(model))
    if not found:
        raise ModelStructureError(
            f"{type(model).__name__} has no nn.ModuleList of repeated transformer blocks (decoder layers)"
        )
    # max keeps the first of equal candidates: the outer list when one list holds another
    return max(found, key=lambda item: _parameter_count(item[1]))[1]


def module_name(model: nn.Module, module: nn.Module) -> str:
    """The qualified name of ``module`` inside ``model`` (as in ``model.named_modules()``), e.g.
    ``module_name(model, decoder_blocks(model)) == "model.layers"`` on a Llama."""
    for name, candidate in model.named_modules(remove_duplicate=False):
        if candidate is module:
            return name
    raise ModelStructureError(f"{type(module).__name__} is not a submodule of {type(model).__name__}")


def _holder(model: nn.Module, blocks: nn.ModuleList) -> nn.Module:
    """The module whose direct child the block list is."""
    for parent in model.modules():
        if any(child is blocks for child in parent.children()):
            return parent
    raise ModelStructureError(f"the decoder blocks of {type(model).__name__} have no parent module")


def _is_norm(module: nn.Module) -> bool:
    if "norm" in type(module).__name__.lower():
        return True
    base = getattr(module, "base_layer", None)  # a PEFT layer wrapping a norm (LN tuning)
    return isinstance(base, nn.Module) and "norm" in type(base).__name__.lower()


def final_norm(model: nn.Module) -> nn.Module:
    """The norm applied to the output of the last block: a direct child, with ``Norm`` in its
    class name, of the module that holds the blocks (``model.norm`` of Llama, ``transformer.ln_f``
    of GPT-2, ``gpt_neox.final_layer_norm``, OPT's ``model.decoder.final_layer_norm``)."""
    blocks = decoder_blocks(model)
    holder = _holder(model, blocks)
    children = list(holder.named_children())
    position = next(i for i, (_, child) in enumerate(children) if child is blocks)
    norms = [(i, child) for i, (_, child) in enumerate(children) if child is not blocks and _is_norm(child)]
    if not norms:
        names = ", ".join(f"{n} ({type(c).__name__})" for n, c in children if c is not blocks) or "none"
        raise ModelStructureError(
            f"{type(model).__name__} has no final norm: no child of {type(holder).__name__}, which holds the "
            f"decoder blocks, has 'Norm' in its class name (its other children: {names})"
        )
    after = [child for i, child in norms if i > position]
    return (after or [child for _, child in norms])[-1]


def input_embeddings(model: nn.Module) -> nn.Module:
    """The token embedding (``get_input_embeddings()``: ``model.embed_tokens`` of Llama)."""
    get = getattr(_unwrap_peft(model), "get_input_embeddings", None)
    found = get() if callable(get) else None
    if not isinstance(found, nn.Module):
        raise ModelStructureError(f"{type(model).__name__} has no input embeddings (get_input_embeddings() gives none)")
    return found


def lm_head(model: nn.Module) -> nn.Module:
    """The language-modelling head (``get_output_embeddings()``: ``lm_head`` of Llama; its weight
    is the input embeddings' when they are tied). A sequence classifier has none: its head is new."""
    get = getattr(_unwrap_peft(model), "get_output_embeddings", None)
    found = get() if callable(get) else None
    if not isinstance(found, nn.Module):
        raise ModelStructureError(
            f"{type(model).__name__} has no language-modelling head (get_output_embeddings() gives none; "
            "a classification model's head is its new score layer)"
        )
    return found


def _sublayer_name(block: nn.Module, classes: tuple[str, ...], names: tuple[str, ...], what: str) -> str:
    children = dict(block.named_children())
    by_class = [n for n, c in children.items() if any(k in type(c).__name__.lower() for k in classes)
                and not _is_norm(c)]
    if len(by_class) > 1:
        selfish = [n for n in by_class if n.startswith("self")]
        by_class = selfish if len(selfish) == 1 else by_class
    if len(by_class) == 1:
        return by_class[0]
    by_name = [n for n in names if n in children]
    if by_name:
        return by_name[0]
    shown = ", ".join(f"{n} ({type(c).__name__})" for n, c in children.items()) or "none"
    several = f"several candidates ({', '.join(by_class)})" if by_class else "no child that is one"
    raise ModelStructureError(f"the decoder block {type(block).__name__} has no single {what} submodule: "
                              f"{several}; its children: {shown}")


def attention_name(block: nn.Module) -> str:
    """The attribute name of a block's (self-)attention: ``self_attn`` (Llama, Qwen2, OPT),
    ``attn`` (GPT-2), ``attention`` (GPT-NeoX), ``self_attention`` (Falcon)."""
    return _sublayer_name(block, _ATTENTION_CLASS, _ATTENTION_NAMES, "attention")


def mlp_name(block: nn.Module) -> str:
    """The attribute name of a block's feed-forward network: ``mlp`` on most models. OPT's blocks
    have none (``fc1``/``fc2`` are direct children of the block): that raises."""
    return _sublayer_name(block, _MLP_CLASS, _MLP_NAMES, "MLP (feed-forward)")


def attention_module(block: nn.Module) -> nn.Module:
    """A block's attention submodule (``getattr(block, attention_name(block))``)."""
    return getattr(block, attention_name(block))


def mlp_module(block: nn.Module) -> nn.Module:
    """A block's feed-forward submodule (``getattr(block, mlp_name(block))``)."""
    return getattr(block, mlp_name(block))


def is_linear(module: nn.Module) -> bool:
    """Whether ``module`` is a linear layer: ``nn.Linear`` or a subclass (bitsandbytes' 4/8-bit
    layers, Falcon's ``FalconLinear``) or GPT-2's ``Conv1D`` (a transposed linear)."""
    if isinstance(module, nn.Linear):  # bitsandbytes' Linear4bit/Linear8bitLt, FalconLinear too
        return True
    return type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None  # GPT-2's


def linear_features(module: nn.Module) -> tuple[int, int] | None:
    """``(in_features, out_features)`` of a linear layer (``is_linear``): ``nn.Linear`` and its
    subclasses keep them as attributes, GPT-2's ``Conv1D`` holds its weight as (in, out); None for
    any other module."""
    if isinstance(module, nn.Linear):
        return int(module.in_features), int(module.out_features)
    if is_linear(module) and module.weight.dim() == 2:
        return int(module.weight.shape[0]), int(module.weight.shape[1])
    return None


def linear_layer_names(model: nn.Module) -> list[str]:
    """The names, relative to a block, of the linear-like layers of the decoder blocks, in the
    order of the first block (``self_attn.q_proj``, ..., ``mlp.down_proj`` on Llama;
    ``attn.c_attn``, ``attn.c_proj``, ``mlp.c_fc``, ``mlp.c_proj`` on GPT-2). A PEFT layer that
    wraps one (``base_layer``) counts as the layer; what PEFT added inside it does not."""
    names: list[str] = []
    for block in decoder_blocks(model):
        wrapped: list[str] = []
        for name, module in block.named_modules():
            if not name or any(name.startswith(w + ".") for w in wrapped):
                continue
            base = getattr(module, "base_layer", None)
            if isinstance(base, nn.Module):
                wrapped.append(name)
                if is_linear(base) and name not in names:
                    names.append(name)
            elif is_linear(module) and name not in names:
                names.append(name)
    if not names:
        raise ModelStructureError(f"the decoder blocks of {type(model).__name__} hold no linear layer")
    return names


def norm_layer_names(model: nn.Module) -> list[str]:
    """The names, relative to a block, of the norm layers of the decoder blocks (class name
    containing ``Norm``, at any depth), in the order of the first block: ``input_layernorm``,
    ``post_attention_layernorm`` on Llama; ``ln_1``, ``ln_2`` on GPT-2; ``self_attn.q_norm``,
    ``self_attn.k_norm``, ``post_attention_layernorm``, ``post_feedforward_layernorm`` on OLMo-2.
    A PEFT layer that wraps one (``base_layer``) counts as the norm; what is inside a norm does
    not. Empty when the blocks have none; the final norm is ``final_norm(model)``."""
    names: list[str] = []
    for block in decoder_blocks(model):
        found: list[str] = []
        for name, module in block.named_modules():
            if not name or any(name.startswith(f + ".") for f in found):
                continue
            if _is_norm(module):
                found.append(name)
                if name not in names:
                    names.append(name)
    return names


_CACHE_REACHED = "ftlab: the probe cache received keys"  # the message kv_cache_layout's probe stops with


def _meta_copy(model: nn.Module) -> nn.Module:
    """``model`` itself when its weights are on the meta device, else a meta-device causal-LM
    built from its config (no memory, no init)."""
    import torch

    if all(p.device.type == "meta" for p in model.parameters()):
        return model
    from transformers import AutoModelForCausalLM

    config = getattr(model, "config", None)
    if config is None:
        raise ModelStructureError(f"{type(model).__name__} has no transformers config to build a meta-device copy from")
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=bool(getattr(config, "auto_map", None)))


def kv_cache_layout(model: nn.Module) -> tuple[int, int]:
    """``(key/value heads, head size)`` of what the model's attention stores in its key/value
    cache: ``(num_key_value_heads, head_dim)`` on a GQA Llama, ``(n_head, n_embd // n_head)`` on
    GPT-2, ``(1, head_dim)`` on a multi-query Falcon (its config says ``multi_query``, not how
    many heads). Read from the model itself: a two-token forward of a meta-device copy (the model,
    when its weights are on meta already; else one built from its config) with a cache that stops
    it at the first ``update`` the first block's attention makes, so nothing is computed.

    Raises ``ModelStructureError`` when the forward hands no keys to the cache (a model without a
    key/value cache, or one that takes none as ``cache``/``past_key_values``)."""
    import torch
    from transformers import DynamicCache

    shapes: list[tuple[int, ...]] = []

    class _Probe(DynamicCache):
        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: object,
                   **kwargs: object) -> tuple[torch.Tensor, torch.Tensor]:
            shapes.append(tuple(key_states.shape))
            raise RuntimeError(_CACHE_REACHED)  # stop the forward here: the shape is all it was for

    skeleton = _meta_copy(_unwrap_peft(model))
    embeddings = input_embeddings(skeleton)
    weight = getattr(embeddings, "weight", None)
    if weight is None or weight.dim() != 2:
        raise ModelStructureError(f"the input embeddings of {type(skeleton).__name__} have no 2-D weight")
    # embeddings, not ids: no padding check or mask to compute, which meta tensors cannot answer
    embeds = torch.zeros((1, 2, weight.shape[1]), dtype=weight.dtype, device="meta")
    name = type(skeleton).__name__
    # transformers 5 names the argument ``cache`` (``past_key_values`` before, still accepted)
    argument = "cache" if "cache" in inspect.signature(skeleton.forward).parameters else "past_key_values"
    try:
        with torch.no_grad():
            skeleton(inputs_embeds=embeds, use_cache=True, **{argument: _Probe()})
    except Exception as err:
        if shapes and str(err) == _CACHE_REACHED:
            if len(shapes[0]) != 4:
                raise ModelStructureError(f"{name}'s attention hands its cache keys of shape {shapes[0]}, not "
                                          "(batch, heads, tokens, head size)") from None
            return int(shapes[0][1]), int(shapes[0][3])
        raise ModelStructureError(f"a forward pass of {name} stopped before its attention wrote keys to the "
                                  f"cache: {type(err).__name__}: {err}") from err
    raise ModelStructureError(f"{name} wrote no keys or values to the key/value cache passed as {argument}")
