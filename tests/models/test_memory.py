"""A quantized base holds its quantized weights, not the checkpoint it was read from: after
``load_model`` the pages of the mapped safetensors file that quantization read are unmapped (the
float leftovers stay mapped, uncopied), and the anonymous memory the load added fits the 4-bit
weights with nothing of a float copy."""

from __future__ import annotations

import ctypes
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from ftlab.models.loading import load_model
from ftlab.models.quant import file_mappings, mapped_resident_mb, mapped_tensors, release_unused_pages
from ftlab.models.tiny import TINY_DEFAULTS, tiny_checkpoint
from ftlab.results import resident_mb

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.skipif(not file_mappings(), reason="no /proc/self/maps here"),
]
MB = 2**20
# big enough that its weights (~50 MB in float32) stand out of allocator noise, small enough to
# quantize in a second or two
MEDIUM = {"hidden_size": 512, "intermediate_size": 1536, "num_hidden_layers": 4, "num_attention_heads": 8,
          "num_key_value_heads": 4}


def _model_cfg(**sizes: int):
    return OmegaConf.create({"name": "tiny", "kind": "tiny", **TINY_DEFAULTS, **sizes})


def _nf4():
    return OmegaConf.create({"name": "nf4", "bnb_4bit_use_double_quant": True})


def _anon_mb() -> float:
    """Anonymous memory held now, freed heap returned first so that only what is held counts."""
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    return resident_mb()["anon"]


def _plain_4bit_load(folder: Path) -> torch.nn.Module:
    """transformers' own NF4 load, without ftlab's release of the mapped checkpoint."""
    from transformers import AutoModelForCausalLM

    from ftlab.models.quant import bnb_config

    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32,
                                                quantization_config=bnb_config(_nf4()), device_map={"": "cpu"})


def _float_leftovers_mb(model: torch.nn.Module) -> float:
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.__class__.__name__ != "Params4bit") / MB


@pytest.mark.slow
def test_a_plain_quantized_load_keeps_the_read_checkpoint_mapped(cache_dir: Path) -> None:
    """The control for the tests below: transformers alone leaves every page it read resident in
    the mapping, far more than the float leftovers that still live there."""
    folder = tiny_checkpoint(_model_cfg(**MEDIUM), cache_dir)
    model = _plain_4bit_load(folder)
    assert "model.embed_tokens.weight" in mapped_tensors(model)
    assert mapped_resident_mb(str(folder / "model.safetensors")) > 2 * _float_leftovers_mb(model)


def test_a_quantized_load_leaves_only_its_float_leftovers_mapped(cache_dir: Path) -> None:
    folder = tiny_checkpoint(_model_cfg(**MEDIUM), cache_dir)
    model, _ = load_model(_model_cfg(**MEDIUM), _nf4(), cache_dir=cache_dir)
    assert mapped_resident_mb(str(folder / "model.safetensors")) <= _float_leftovers_mb(model) + 1
    assert "model.embed_tokens.weight" in mapped_tensors(model)  # not copied: still file-backed
    assert model.lm_head.weight is model.model.embed_tokens.weight


@pytest.mark.slow
def test_released_pages_read_back_the_same_weights(tiny_model_dir: Path) -> None:
    """What stays mapped is unchanged, and the model computes the same logits after the release."""
    model = _plain_4bit_load(tiny_model_dir)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.dtype.is_floating_point}
    ids = torch.tensor([[1, 5, 9, 3]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        release_unused_pages(model)
        assert torch.equal(model(input_ids=ids).logits, logits)
    for name, param in model.named_parameters():
        if name in before:
            assert torch.equal(param, before[name]), name


def _load_growth_mb(cache_dir: Path, keep_float_copy: bool) -> tuple[float, float]:
    """Anonymous memory a NF4 load of the MEDIUM model adds, and the bound it must stay under:
    the 4-bit weights (half a byte each, plus constants) and the float parameters left unquantized,
    with 24 MB of slack. ``keep_float_copy`` holds a float32 copy of the weights through the load,
    as a loader that dequantized or converted before quantizing would."""
    folder = tiny_checkpoint(_model_cfg(**MEDIUM), cache_dir)  # written before measuring
    start = _anon_mb()
    copy = torch.ones(int(folder.joinpath("model.safetensors").stat().st_size) // 4) if keep_float_copy else None
    model, _ = load_model(_model_cfg(**MEDIUM), _nf4(), cache_dir=cache_dir)
    grown = _anon_mb() - start
    quantized = sum(p.numel() for p in model.parameters() if p.__class__.__name__ == "Params4bit")  # bytes
    floats = sum(p.numel() * p.element_size() for p in model.parameters() if p.__class__.__name__ != "Params4bit")
    del copy
    return grown, (quantized * 1.1 + floats) / MB + 24


@pytest.mark.slow
def test_a_quantized_load_adds_no_more_than_its_4bit_weights(cache_dir: Path) -> None:
    grown, bound = _load_growth_mb(cache_dir, keep_float_copy=False)
    assert grown < bound, f"a NF4 load added {grown:.0f} MB of anonymous memory, bound {bound:.0f} MB"


@pytest.mark.slow
def test_the_load_bound_catches_a_float_copy(cache_dir: Path) -> None:
    """The control: the same measurement with a float copy of the weights held fails the bound."""
    grown, bound = _load_growth_mb(cache_dir, keep_float_copy=True)
    assert grown > bound


def _drop_pages(start: int, end: int) -> None:
    import mmap

    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    page = mmap.PAGESIZE
    low, high = start // page * page, -(-end // page) * page
    assert libc.madvise(low, high - low, 4) == 0  # MADV_DONTNEED


def test_another_models_changed_weights_survive_a_quantized_load(cache_dir: Path) -> None:
    """A float model read from the same file and changed in place (copy-on-write pages of its own
    mapping) keeps its change when a quantized model loads and releases its pages; the control
    drops that model's pages the same way and shows the change would be lost."""
    from transformers import AutoModelForCausalLM

    folder = tiny_checkpoint(_model_cfg(**MEDIUM), cache_dir)
    other = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    weight = other.model.layers[0].mlp.down_proj.weight
    assert "model.layers.0.mlp.down_proj.weight" in mapped_tensors(other), "the float load copied its weights"
    with torch.no_grad():
        weight.add_(1.0)
    changed = weight.detach().clone()
    load_model(_model_cfg(**MEDIUM), _nf4(), cache_dir=cache_dir)
    assert torch.equal(weight, changed)
    _drop_pages(weight.data_ptr(), weight.data_ptr() + weight.numel() * weight.element_size())
    assert not torch.equal(weight, changed)
