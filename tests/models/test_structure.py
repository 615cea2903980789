"""ftlab.models.structure finds blocks, final norm, embeddings, head and block sublayers from the
model itself: on the tiny Llama (as loaded by ``model=tiny``, bare and under PEFT), on small
random models of other architectures built in-process from transformers configs (no download),
and on the meta-device skeleton of every architecture family (``ftlab.models.families``), against
names written by hand from transformers' modeling code."""

from __future__ import annotations

import re
from pathlib import Path

import peft
import pytest
import torch
import transformers
from torch import nn

import ftlab
from ftlab.errors import ConfigError, ModelStructureError
from ftlab.models.families import FAMILIES
from ftlab.models.structure import (
    attention_module,
    attention_name,
    backbone,
    decoder_blocks,
    final_norm,
    input_embeddings,
    linear_layer_names,
    lm_head,
    mlp_module,
    mlp_name,
    module_name,
)

SMALL = dict(vocab_size=128)


def _config(kind: str) -> transformers.PretrainedConfig:
    if kind == "gpt2":
        return transformers.GPT2Config(n_embd=32, n_layer=3, n_head=2, n_positions=64, bos_token_id=0, eos_token_id=0,
                                       **SMALL)
    if kind == "opt":
        return transformers.OPTConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, ffn_dim=64,
                                      max_position_embeddings=64, word_embed_proj_dim=32, **SMALL)
    if kind == "gpt_neox":
        return transformers.GPTNeoXConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                                          intermediate_size=64, max_position_embeddings=64, **SMALL)
    if kind == "qwen2":
        return transformers.Qwen2Config(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1,
                                        intermediate_size=64, max_position_embeddings=64, **SMALL)
    if kind == "falcon":
        return transformers.FalconConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, **SMALL)
    raise AssertionError(kind)


# kind -> blocks, final norm, embeddings, head (qualified names), attention, MLP (None: it has none), linear layers
EXPECTED = {
    "gpt2": ("transformer.h", "transformer.ln_f", "transformer.wte", "lm_head", "attn", "mlp",
             ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]),
    "opt": ("model.decoder.layers", "model.decoder.final_layer_norm", "model.decoder.embed_tokens", "lm_head",
            "self_attn", None, ["self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj", "self_attn.out_proj",
                                "fc1", "fc2"]),
    "gpt_neox": ("gpt_neox.layers", "gpt_neox.final_layer_norm", "gpt_neox.embed_in", ("lm_head", "embed_out"), "attention", "mlp",
                 ["attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"]),
    "qwen2": ("model.layers", "model.norm", "model.embed_tokens", "lm_head", "self_attn", "mlp",
              ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
               "mlp.up_proj", "mlp.down_proj"]),
    "falcon": ("transformer.h", "transformer.ln_f", "transformer.word_embeddings", "lm_head", "self_attention", "mlp",
               ["self_attention.query_key_value", "self_attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"]),
}
LLAMA = ("model.layers", "model.norm", "model.embed_tokens", "lm_head", "self_attn", "mlp",
         ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
          "mlp.up_proj", "mlp.down_proj"])


# Every family's tiny model (``model=tiny model.family=F``), as written by hand from
# transformers/models/<type>/modeling_<type>.py (transformers 5): the same 7 fields as EXPECTED.
_ATTN_QKVO = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"]
_GATED_MLP = ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
_LLAMA_LIKE = ("model.layers", "model.norm", "model.embed_tokens", "lm_head", "self_attn", "mlp",
               _ATTN_QKVO + _GATED_MLP)
FAMILY_EXPECTED = {
    "llama": _LLAMA_LIKE,
    "gpt2": EXPECTED["gpt2"],
    "gpt_neox": ("gpt_neox.layers", "gpt_neox.final_layer_norm", "gpt_neox.embed_in", "lm_head", "attention", "mlp",
                 ["attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"]),
    # word_embed_proj_dim == hidden_size: no project_in/project_out; the final norm is registered
    # before the blocks (OPTDecoder.__init__), and the block has no MLP submodule (fc1/fc2)
    "opt": EXPECTED["opt"],
    "falcon": EXPECTED["falcon"],  # FalconLinear layers (nn.Linear subclasses)
    # word_embeddings_layernorm comes before the blocks: the final norm is ln_f
    "bloom": ("transformer.h", "transformer.ln_f", "transformer.word_embeddings", "lm_head", "self_attention", "mlp",
              ["self_attention.query_key_value", "self_attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"]),
    "mpt": ("transformer.blocks", "transformer.norm_f", "transformer.wte", "lm_head", "attn", "ffn",
            ["attn.Wqkv", "attn.out_proj", "ffn.up_proj", "ffn.down_proj"]),
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,  # q_norm/k_norm inside self_attn are norms, not linear layers
    "mistral": _LLAMA_LIKE,
    # MixtralSparseMoeBlock: a MixtralTopKRouter (a bare weight Parameter) and MixtralExperts (fused
    # gate_up_proj/down_proj Parameters): no nn.Linear in the MoE, only the attention projections
    "mixtral": ("model.layers", "model.norm", "model.embed_tokens", "lm_head", "self_attn", "mlp", _ATTN_QKVO),
    "phi": ("model.layers", "model.final_layernorm", "model.embed_tokens", "lm_head", "self_attn", "mlp",
            ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.dense", "mlp.fc1", "mlp.fc2"]),
    # Phi3Attention registers o_proj before qkv_proj
    "phi3": ("model.layers", "model.norm", "model.embed_tokens", "lm_head", "self_attn", "mlp",
             ["self_attn.o_proj", "self_attn.qkv_proj", "mlp.gate_up_proj", "mlp.down_proj"]),
    "gemma": _LLAMA_LIKE,  # embed_tokens is a GemmaTextScaledWordEmbedding
    "gemma2": _LLAMA_LIKE,
    "gemma3": _LLAMA_LIKE,  # Gemma3ForCausalLM over Gemma3TextModel (model_type gemma3_text)
    "olmo": _LLAMA_LIKE,
    "olmo2": _LLAMA_LIKE,
    "starcoder2": ("model.layers", "model.norm", "model.embed_tokens", "lm_head", "self_attn", "mlp",
                   _ATTN_QKVO + ["mlp.c_fc", "mlp.c_proj"]),
    "granite": _LLAMA_LIKE,
    "stablelm": _LLAMA_LIKE,
}
PRESETS = Path(ftlab.__file__).parent / "conf" / "model"
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def _family_skeleton(name: str, cache_dir: Path) -> nn.Module:
    """The family's tiny model (``model=tiny model.family=NAME``) on the meta device: no weights."""
    from omegaconf import OmegaConf

    from ftlab.models.architecture import architecture
    from ftlab.models.tiny import TINY_DEFAULTS

    return architecture(OmegaConf.create({"kind": "tiny", "family": name, **TINY_DEFAULTS}), cache_dir).skeleton


@pytest.fixture(scope="module")
def tiny_llama(tiny_model_dir) -> nn.Module:
    return transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir)


def _small(kind: str) -> nn.Module:
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(_config(kind))


def _lora(model: nn.Module) -> nn.Module:
    return peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules="all-linear"))


def _check(model: nn.Module, expected: tuple, prefix: str = "") -> None:
    blocks_name, norm_name, embed_name, head_name, attention, mlp, linear = expected
    blocks = decoder_blocks(model)
    assert isinstance(blocks, nn.ModuleList)
    assert module_name(model, blocks) == prefix + blocks_name
    assert len({type(b) for b in blocks}) == 1
    assert module_name(model, final_norm(model)) == prefix + norm_name
    assert module_name(model, input_embeddings(model)) == prefix + embed_name
    head = lm_head(model)
    heads = head_name if isinstance(head_name, tuple) else (head_name,)  # GPT-NeoX's was embed_out before transformers 5
    assert module_name(model, head) in {prefix + h for h in heads}
    for block in blocks:
        assert attention_name(block) == attention
        assert attention_module(block) is getattr(block, attention)
        if mlp is None:
            with pytest.raises(ModelStructureError, match=rf"{type(block).__name__} has no single MLP"):
                mlp_name(block)
        else:
            assert mlp_name(block) == mlp
            assert mlp_module(block) is getattr(block, mlp)
    assert linear_layer_names(model) == linear


def test_the_tiny_llama(tiny_llama: nn.Module) -> None:
    _check(tiny_llama, LLAMA)
    assert type(backbone(tiny_llama)).__name__ == "LlamaModel"
    assert len(decoder_blocks(tiny_llama)) == 2
    # tied embeddings: the head's weight is the embedding's
    assert lm_head(tiny_llama).weight is input_embeddings(tiny_llama).weight


def test_the_tiny_llama_under_peft(tiny_llama: nn.Module) -> None:
    wrapped = _lora(tiny_llama)
    try:
        _check(wrapped, LLAMA, prefix="base_model.model.")
        assert type(backbone(wrapped)).__name__ == "LlamaModel"
        # the LoRA layers count as the linear layers they wrap; their lora_A/lora_B do not
        assert not any("lora" in n or "base_layer" in n for n in linear_layer_names(wrapped))
    finally:
        wrapped.unload()


@pytest.mark.parametrize("kind", sorted(EXPECTED))
def test_other_architectures(kind: str) -> None:
    model = _small(kind)
    assert len(decoder_blocks(model)) == 3
    _check(model, EXPECTED[kind])


def test_every_family_has_expected_names() -> None:
    assert set(FAMILY_EXPECTED) == set(FAMILIES)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_every_family(name: str, cache_dir: Path) -> None:
    model = _family_skeleton(name, cache_dir)
    assert len(decoder_blocks(model)) == 2  # TINY_DEFAULTS' num_hidden_layers
    _check(model, FAMILY_EXPECTED[name])


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_each_family_tiny_config_builds_its_model_type(name: str, cache_dir: Path) -> None:
    from omegaconf import OmegaConf

    from ftlab.models.architecture import architecture
    from ftlab.models.loading import load_tokenizer
    from ftlab.models.tiny import TINY_DEFAULTS, TINY_TOKENIZER_DIR, tiny_config

    cfg = OmegaConf.create({"kind": "tiny", "family": name, **TINY_DEFAULTS})
    assert tiny_config(cfg, load_tokenizer(TINY_TOKENIZER_DIR)).model_type == FAMILIES[name].model_type
    built = architecture(cfg, cache_dir)
    assert built.skeleton.config.model_type == FAMILIES[name].model_type
    assert built.family == name  # family_of_model_type leads back to the family


def test_the_families_are_the_model_presets() -> None:
    from omegaconf import OmegaConf

    # every preset but tiny.yaml (model=tiny model.family=F) is one family's, named after it
    presets = {p.stem: OmegaConf.load(p) for p in sorted(PRESETS.glob("*.yaml")) if p.stem != "tiny"}
    assert set(presets) == set(FAMILIES)
    for stem, preset in presets.items():
        assert preset.get("family") == stem, f"{stem}.yaml: family={preset.get('family')}"
        assert preset.get("name") == stem, f"{stem}.yaml: name={preset.get('name')}"
        source = preset.get("name_or_path")
        if stem == "llama":  # null: the packaged SmolLM2-135M-Instruct
            assert source is None
        else:
            assert isinstance(source, str) and HUB_ID.fullmatch(source), f"{stem}.yaml: name_or_path={source!r}"


@pytest.mark.parametrize("kind", ["gpt2", "opt", "qwen2"])
def test_other_architectures_under_peft(kind: str) -> None:
    _check(_lora(_small(kind)), EXPECTED[kind], prefix="base_model.model.")


def test_the_classifier_has_blocks_and_norm_but_no_lm_head(tiny_model_dir) -> None:
    model = transformers.AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=3)
    assert module_name(model, decoder_blocks(model)) == "model.layers"
    assert module_name(model, final_norm(model)) == "model.norm"
    with pytest.raises(ModelStructureError, match="LlamaForSequenceClassification has no language-modelling head"):
        lm_head(model)


def test_the_blocks_are_the_largest_list_of_one_class_not_the_longest_list() -> None:
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn_proj = nn.Linear(8, 8)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.heads = nn.ModuleList([nn.Linear(8, 1) for _ in range(6)])  # longer, fewer parameters
            self.mixed = nn.ModuleList([nn.Linear(8, 64), nn.Conv1d(8, 64, 3)])  # two classes: not blocks
            self.layers = nn.ModuleList([Block(), Block()])
            self.final_layernorm = nn.LayerNorm(8)

    net = Net()
    assert decoder_blocks(net) is net.layers
    assert final_norm(net) is net.final_layernorm


def test_the_norm_after_the_blocks_wins_over_one_before() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embedding_norm = nn.LayerNorm(8)
            self.h = nn.ModuleList([nn.Linear(8, 8) for _ in range(2)])
            self.ln_f = nn.LayerNorm(8)

    net = Net()
    assert final_norm(net) is net.ln_f


def test_what_cannot_be_found_is_a_config_error_naming_it() -> None:
    with pytest.raises(ModelStructureError, match=r"Sequential has no nn.ModuleList of repeated transformer blocks"):
        decoder_blocks(nn.Sequential(nn.Linear(2, 2)))

    class NoNorm(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList([nn.Linear(2, 2)])
            self.out = nn.Linear(2, 2)

    with pytest.raises(ModelStructureError, match=r"NoNorm has no final norm: no child of NoNorm.*out \(Linear\)"):
        final_norm(NoNorm())
    with pytest.raises(ModelStructureError, match="has no input embeddings"):
        input_embeddings(NoNorm())
    with pytest.raises(ModelStructureError, match=r"the decoder block Linear has no single attention submodule"):
        attention_name(nn.Linear(2, 2))
    assert issubclass(ModelStructureError, ConfigError)  # one ftlab: error line on the command line


def test_freeze_and_adapter_run_on_gpt2() -> None:
    """The two built-in methods that use the helpers work beyond Llama's attribute names."""
    from ftlab.methods.adapter import Adapter, AdapterConfig
    from ftlab.methods.freeze import Freeze, FreezeConfig

    model = Freeze(FreezeConfig(name="freeze", last_n_blocks=1)).apply(_small("gpt2"))
    trainable = {n.rsplit(".", 1)[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"transformer.h.2.ln_1", "transformer.h.2.attn.c_attn", "transformer.h.2.attn.c_proj",
                         "transformer.h.2.ln_2", "transformer.h.2.mlp.c_fc", "transformer.h.2.mlp.c_proj",
                         "transformer.ln_f"}

    model = Adapter(AdapterConfig(name="adapter", reduction_factor=4)).apply(_small("gpt2"))
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "transformer.h.0.attn_adapter.down.weight" in names and "transformer.h.2.mlp_adapter.up.bias" in names
    assert all("_adapter." in n for n in names)
    inputs = torch.randint(0, 128, (2, 8))
    assert model(input_ids=inputs, labels=inputs).loss.isfinite()

    opt = Adapter(AdapterConfig(name="adapter", where="mlp", reduction_factor=4)).apply(_small("opt"))
    assert all(hasattr(block, "fc2_adapter") for block in decoder_blocks(opt))  # no MLP module: after fc2
