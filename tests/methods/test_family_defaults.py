"""What (IA)³, LN tuning and the prompt-learning methods take from a model whose type PEFT 0.21 has
no defaults for: layer names derived from the model's structure, checked against names written by
hand from transformers' modeling code (``modeling_mpt.py``: ``MptBlock.attn.Wqkv``,
``MptBlock.ffn.down_proj``, ``norm_1``/``norm_2``, ``transformer.norm_f``; ...), and the sizes of the
prefixes prefix tuning hands the attention as its cache. Controls show PEFT alone failing on the
same tiny models; refusals are checked through ``compose`` as a user meets them."""

from __future__ import annotations

import copy
from pathlib import Path

import peft
import pytest
import torch
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM

from ftlab.config import compose
from ftlab.errors import ConfigError
from ftlab.methods.ia3 import IA3, IA3Config
from ftlab.methods.ia3 import default_targets as ia3_targets
from ftlab.methods.ln_tuning import LnTuning, LnTuningConfig
from ftlab.methods.ln_tuning import default_targets as ln_targets
from ftlab.methods.multitask_prompt import MultitaskPrompt, MultitaskPromptConfig
from ftlab.methods.prefix import Prefix, PrefixConfig
from ftlab.methods.prompt import Prompt, PromptConfig
from ftlab.methods.ptuning import PTuning, PTuningConfig
from ftlab.models.architecture import architecture
from ftlab.models.structure import kv_cache_layout, norm_layer_names

pytestmark = pytest.mark.usefixtures("one_thread")

# family -> (IA)³ target_modules, feedforward_modules, from each family's modeling_*.py
IA3_EXPECTED = {
    "mpt": (["attn.Wqkv", "ffn.down_proj"], ["ffn.down_proj"]),  # MptAttention fuses q, k, v into Wqkv
    # Phi3Attention fuses q, k, v into qkv_proj; Phi3MLP: gate_up_proj, down_proj
    "phi3": (["self_attn.qkv_proj", "mlp.down_proj"], ["mlp.down_proj"]),
    "olmo": (["self_attn.k_proj", "self_attn.v_proj", "mlp.down_proj"], ["mlp.down_proj"]),
    "olmo2": (["self_attn.k_proj", "self_attn.v_proj", "mlp.down_proj"], ["mlp.down_proj"]),
    "stablelm": (["self_attn.k_proj", "self_attn.v_proj", "mlp.down_proj"], ["mlp.down_proj"]),
    "starcoder2": (["self_attn.k_proj", "self_attn.v_proj", "mlp.c_proj"], ["mlp.c_proj"]),  # Starcoder2MLP: c_fc, c_proj
    "granite": (["self_attn.k_proj", "self_attn.v_proj", "mlp.down_proj"], ["mlp.down_proj"]),
}

_LLAMA_LIKE_NORMS = ["input_layernorm", "post_attention_layernorm", "model.norm"]
# family -> LN tuning target_modules: the blocks' norms (relative to a block) and the final norm
LN_EXPECTED = {
    "gpt_neox": ["input_layernorm", "post_attention_layernorm", "gpt_neox.final_layer_norm"],
    "opt": ["self_attn_layer_norm", "final_layer_norm"],  # the block's final_layer_norm names the decoder's too
    "mpt": ["norm_1", "norm_2", "transformer.norm_f"],
    "phi3": _LLAMA_LIKE_NORMS,
    "olmo2": ["self_attn.q_norm", "self_attn.k_norm", "post_attention_layernorm", "post_feedforward_layernorm",
              "model.norm"],  # Olmo2 normalizes after attention and MLP, and q/k inside the attention
    "stablelm": _LLAMA_LIKE_NORMS,
    "starcoder2": _LLAMA_LIKE_NORMS,
    "granite": _LLAMA_LIKE_NORMS,
    "mixtral": _LLAMA_LIKE_NORMS,
}

# family -> (key/value heads, head size) the attention caches: the tiny models have 4 query heads
# of 16; the tiny Llama's config has num_key_value_heads=2 (GQA), which GPT-2, GPT-NeoX, OPT, Bloom
# and MPT never read (one key/value head per query head)
KV_EXPECTED = {"llama": (2, 16), "gpt2": (4, 16), "gpt_neox": (4, 16), "opt": (4, 16), "bloom": (4, 16),
               "mpt": (4, 16), "falcon": (1, 16)}  # FalconAttention: multi_query keeps one key/value head


def _arch(family: str, cache_dir: Path):
    return architecture(OmegaConf.create({"kind": "tiny", "family": family}), cache_dir)


_ABSENT = object()


def _model(family: str, cache_dir: Path, num_key_value_heads: object = None) -> torch.nn.Module:
    """The tiny model of ``family`` (random weights, built in-process); ``num_key_value_heads``
    set in its config when given, or taken out of it when ``_ABSENT``."""
    config = copy.deepcopy(_arch(family, cache_dir).config)
    if num_key_value_heads is _ABSENT:
        config.__dict__.pop("num_key_value_heads", None)
        assert "num_key_value_heads" not in config.to_dict()
    elif num_key_value_heads is not None:
        config.num_key_value_heads = num_key_value_heads
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config)


def _batch(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    ids = torch.randint(5, 200, (2, 6))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # left padding in one row
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def _block_relative(model: torch.nn.Module, names: list[str]) -> list[str]:
    from ftlab.models.structure import decoder_blocks, module_name

    prefix = module_name(model, decoder_blocks(model)) + "."
    return sorted({n[len(prefix):].partition(".")[2] if n.startswith(prefix) else n for n in names})


# -- (IA)³ ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", sorted(IA3_EXPECTED))
def test_ia3_defaults_are_keys_values_and_mlp_output(family: str, cache_dir: Path) -> None:
    targets, feedforward = IA3_EXPECTED[family]
    assert ia3_targets(_arch(family, cache_dir).skeleton) == (targets, feedforward)

    model = IA3(IA3Config(name="ia3")).apply(_model(family, cache_dir))
    injected = {n: m for n, m in model.get_base_model().named_modules() if isinstance(m, peft.tuners.ia3.IA3Layer)}
    assert _block_relative(model.get_base_model(), list(injected)) == sorted(targets)
    scaled_on_input = [n for n, m in injected.items() if m.is_feedforward]
    assert _block_relative(model.get_base_model(), scaled_on_input) == feedforward
    model(**_batch(model)).loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_ia3_keeps_peft_choice_and_finds_feedforward_among_user_targets(cache_dir: Path) -> None:
    llama = IA3(IA3Config(name="ia3")).peft_config(_arch("llama", cache_dir).skeleton)
    assert llama.target_modules is None and llama.feedforward_modules is None  # PEFT's own mapping decides
    method = IA3(IA3Config(name="ia3", target_modules=["v_proj", "down_proj"]))
    chosen = method.peft_config(_arch("olmo", cache_dir).skeleton)
    assert chosen.target_modules == {"v_proj", "down_proj"} and chosen.feedforward_modules == {"down_proj"}
    method = IA3(IA3Config(name="ia3", feedforward_modules=["up_proj"]))  # the MLP layer named, the rest derived
    chosen = method.peft_config(_arch("mpt", cache_dir).skeleton)
    assert chosen.target_modules == {"attn.Wqkv", "up_proj"} and chosen.feedforward_modules == {"up_proj"}


def test_control_peft_alone_has_no_ia3_layers_for_phi3(cache_dir: Path) -> None:
    with pytest.raises(ValueError, match=r"Please specify `target_modules` in `peft_config`"):
        peft.get_peft_model(_model("phi3", cache_dir), peft.IA3Config(task_type=peft.TaskType.CAUSAL_LM))


def test_ia3_pattern_without_feedforward_is_refused(cache_dir: Path) -> None:
    with pytest.raises(ConfigError) as err:
        compose(["model=tiny", "model.family=mpt", "method=ia3", "method.target_modules='.*Wqkv'",
                 f"paths.cache_dir={cache_dir}"])
    assert str(err.value) == (
        "method 'ia3' cannot train tiny-mpt: PEFT has no default (IA)³ feed-forward layers for mpt, and which of "
        "method.target_modules='.*Wqkv' are MLP layers cannot be told from a pattern; set "
        "method.feedforward_modules=[...] too")


# -- LN tuning --------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", sorted(LN_EXPECTED))
def test_ln_tuning_defaults_are_the_blocks_norms_and_the_final_norm(family: str, cache_dir: Path) -> None:
    expected = LN_EXPECTED[family]
    assert ln_targets(_arch(family, cache_dir).skeleton) == expected

    norms = {n for n, m in _model(family, cache_dir).named_modules() if "norm" in type(m).__name__.lower()}
    model = LnTuning(LnTuningConfig(name="ln_tuning")).apply(_model(family, cache_dir))
    trained = {n.rsplit(".ln_tuning_layers.", 1)[0] for n, p in model.named_parameters() if p.requires_grad}
    assert {n.removeprefix("base_model.model.") for n in trained} == norms  # every norm, nothing else
    model(**_batch(model)).loss.backward()


def test_control_peft_alone_has_no_norms_for_gpt_neox(cache_dir: Path) -> None:
    with pytest.raises(ValueError, match=r"Please specify `target_modules` in `peft_config`"):
        peft.get_peft_model(_model("gpt_neox", cache_dir), peft.LNTuningConfig(task_type=peft.TaskType.CAUSAL_LM))


def test_norm_layer_names_reach_inside_the_attention(cache_dir: Path) -> None:
    assert norm_layer_names(_arch("qwen3", cache_dir).skeleton) == [
        "self_attn.q_norm", "self_attn.k_norm", "input_layernorm", "post_attention_layernorm"]
    assert norm_layer_names(_arch("gpt2", cache_dir).skeleton) == ["ln_1", "ln_2"]


def test_ln_tuning_refuses_olmo_whose_norms_have_no_weights(cache_dir: Path) -> None:
    with pytest.raises(ConfigError) as err:
        compose(["model=tiny", "model.family=olmo", "method=ln_tuning", f"paths.cache_dir={cache_dir}"])
    assert str(err.value) == (
        "method 'ln_tuning' cannot train tiny-olmo: LN tuning trains the weights of norm layers, and OlmoForCausalLM "
        "has no norm layer with weights (input_layernorm: OlmoLayerNorm, post_attention_layernorm: OlmoLayerNorm, "
        "model.norm: OlmoLayerNorm); use method=ia3 or method=lora")
    # a list the user gives is not second-guessed
    compose(["model=tiny", "model.family=olmo", "method=ln_tuning", "method.target_modules=[input_layernorm]",
             f"paths.cache_dir={cache_dir}"])


# -- prompt learning on MPT (n_heads / n_layers / d_model) -----------------------------------------


PROMPT_METHODS = {
    "prompt": lambda: Prompt(PromptConfig(name="prompt", init="random", num_virtual_tokens=3)),
    "ptuning": lambda: PTuning(PTuningConfig(name="ptuning", num_virtual_tokens=3)),
    "multitask_prompt": lambda: MultitaskPrompt(MultitaskPromptConfig(name="multitask_prompt", num_virtual_tokens=3)),
    "prefix": lambda: Prefix(PrefixConfig(name="prefix", num_virtual_tokens=3)),
}


@pytest.mark.parametrize("name", sorted(PROMPT_METHODS))
def test_prompt_learning_reads_mpt_sizes(name: str, cache_dir: Path) -> None:
    method = PROMPT_METHODS[name]()
    model = method.apply(_model("mpt", cache_dir))
    config = model.peft_config["default"]
    # MptConfig(d_model=64, n_heads=4, n_layers=2): the tiny sizes under MPT's names
    assert (config.token_dim, config.num_attention_heads, config.num_layers) == (64, 4, 2)
    model(**method.model_inputs(_batch(model))).loss.backward()


def test_control_peft_alone_finds_no_heads_in_mpt_config(cache_dir: Path) -> None:
    with pytest.raises(ValueError, match=r"Please specify `num_attention_heads` in `peft_config`"):
        peft.get_peft_model(_model("mpt", cache_dir),
                            peft.PromptTuningConfig(task_type=peft.TaskType.CAUSAL_LM, num_virtual_tokens=3))


# -- prefix tuning: prefixes shaped like the cache ---------------------------------------------------


@pytest.mark.parametrize("family", sorted(KV_EXPECTED))
def test_kv_cache_layout(family: str, cache_dir: Path) -> None:
    assert kv_cache_layout(_arch(family, cache_dir).skeleton) == KV_EXPECTED[family]


# (family, num_key_value_heads in its config): a stray value GPT-2's and Bloom's attention never
# reads, and none at all, as in Falcon-7B's config.json (multi_query=true)
PREFIX_CASES = [("gpt2", 2), ("bloom", 2), ("mpt", 2), ("falcon", _ABSENT), ("falcon", 2), ("llama", None)]


@pytest.mark.parametrize(("family", "kv_in_config"), PREFIX_CASES, ids=lambda v: "absent" if v is _ABSENT else str(v))
def test_prefix_trains_and_reloads(family: str, kv_in_config: object, cache_dir: Path, tmp_path: Path) -> None:
    heads, head_dim = KV_EXPECTED[family]
    method = Prefix(PrefixConfig(name="prefix", num_virtual_tokens=3))
    base = _model(family, cache_dir, kv_in_config)
    before = base.config.to_dict()
    model = method.apply(base)
    assert base.config.to_dict() == before  # shown to PEFT while it built the prefixes, then put back
    config = model.peft_config["default"]
    assert (config.num_attention_heads, config.token_dim) == (heads, heads * head_dim)
    batch = _batch(model)
    loss = model(**batch).loss
    loss.backward()
    assert model.prompt_encoder["default"].embedding.weight.grad.abs().sum() > 0

    model.save_pretrained(tmp_path)
    model.eval()
    reloaded = method.load(_model(family, cache_dir, kv_in_config), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, model(**batch).logits)


@pytest.mark.parametrize(("family", "kv_in_config", "expected", "cached"),
                         [("gpt2", 2, 2, 4), ("falcon", _ABSENT, 4, 1)], ids=["gpt2-stray-key", "falcon-multi-query"])
def test_control_peft_alone_sizes_prefixes_from_the_config(family: str, kv_in_config: object, expected: int,
                                                             cached: int, cache_dir: Path) -> None:
    model = peft.get_peft_model(_model(family, cache_dir, kv_in_config),
                                peft.PrefixTuningConfig(task_type=peft.TaskType.CAUSAL_LM, num_virtual_tokens=3))
    with pytest.raises(RuntimeError, match=rf"Sizes of tensors must match except in dimension 2\. Expected size "
                                           rf"{expected} but got size {cached}"):
        model(**_batch(model))
