"""A damaged tiny-model cache folder (weights cut short, or a byte of them changed in place) is
found when the model is next loaded, reported with its path, and built again: the model loaded
then is the one a fresh cache gives. An untouched folder is reused as it is."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from ftlab.cache import COMPLETE_MARKER
from ftlab.models.loading import load_model
from ftlab.models.tiny import TINY_DEFAULTS, tiny_checkpoint

CFG = OmegaConf.create({"name": "tiny", "kind": "tiny", "dtype": "float32", **TINY_DEFAULTS})
NO_QUANT = {"name": "none", "load_in_4bit": False, "load_in_8bit": False}


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def fresh(tmp_path_factory) -> dict[str, torch.Tensor]:
    model, _ = load_model(CFG, NO_QUANT, tmp_path_factory.mktemp("fresh"))
    return {k: v.clone() for k, v in model.state_dict().items()}


def _weights_offset(path: Path) -> int:
    """The first byte of tensor data in a safetensors file (after its 8-byte size and JSON header)."""
    return 8 + int.from_bytes(path.read_bytes()[:8], "little")


def _damage(weights: Path, how: str) -> None:
    data = bytearray(weights.read_bytes())
    if how == "truncated":
        del data[len(data) // 2 :]
    else:  # same size, still a valid file: one weight changed
        data[_weights_offset(weights) + 1000] ^= 0x40
    weights.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["truncated", "a weight changed"])
def test_a_damaged_tiny_model_folder_is_rebuilt_with_a_warning(tmp_path, fresh, how, caplog):
    folder = tiny_checkpoint(CFG, tmp_path)
    weights = folder / "model.safetensors"
    size = weights.stat().st_size
    _damage(weights, how)
    if how != "truncated":  # the change is real: loaded unchecked, the model would differ
        from safetensors.torch import load_file

        assert weights.stat().st_size == size
        changed = load_file(str(weights))
        assert any(not torch.equal(changed[k], fresh[k]) for k in changed if k in fresh)
    with caplog.at_level(logging.WARNING):
        model, _ = load_model(CFG, NO_QUANT, tmp_path)
    warnings = [r.message for r in caplog.records if r.name == "ftlab.cache"]
    assert len(warnings) == 1 and str(folder) in warnings[0] and "model.safetensors" in warnings[0]
    assert ("were written" if how == "truncated" else "does not match the sha256") in warnings[0]
    state = model.state_dict()
    assert state.keys() == fresh.keys() and all(torch.equal(state[k], fresh[k]) for k in state)
    assert weights.stat().st_size == size


def test_an_untouched_tiny_model_folder_is_reused(tmp_path, fresh, caplog):
    folder = tiny_checkpoint(CFG, tmp_path)
    marker = json.loads((folder / COMPLETE_MARKER).read_text())
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= set(marker["files"])
    before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    with caplog.at_level(logging.WARNING):
        model, _ = load_model(CFG, NO_QUANT, tmp_path)
    assert not [r for r in caplog.records if r.name == "ftlab.cache"]
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == before
    assert all(torch.equal(v, fresh[k]) for k, v in model.state_dict().items())
