"""Quantization config -> bitsandbytes, and checks that a base really is held quantized.

The ``quantization`` config group (``none``/``nf4``/``fp4``/``int8``) only describes intent;
this module is the single place that turns it into a ``transformers.BitsAndBytesConfig``, so
tiny test models and real checkpoints take exactly the same path through ``from_pretrained``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ftlab.errors import ConfigError

if TYPE_CHECKING:
    from transformers import BitsAndBytesConfig

QUANT_NAMES = ("none", "nf4", "fp4", "int8")

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def to_dtype(name: str | torch.dtype) -> torch.dtype:
    """Resolve a config dtype name, failing with the valid names instead of a bare KeyError."""
    if isinstance(name, torch.dtype):
        return name
    key = str(name).lower().removeprefix("torch.")
    if key not in DTYPES:
        raise ConfigError(f"unknown dtype '{name}'; expected one of: {', '.join(DTYPES)}")
    return DTYPES[key]


def native_bf16(device: str | None = None) -> bool:
    """Whether bf16 matmuls run at full speed on ``device`` (``cuda`` or ``cpu``; default: the
    GPU when there is one, else the CPU): a bf16-capable GPU, or a CPU with AVX512-BF16/AMX.
    Without them bf16 is emulated and ~20x slower than fp32 (measured: a SmolLM2 nf4+LoRA step
    took 160 s in bf16 against 8 s in fp32 on a 2-core AVX2 CPU)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device == "cpu":
        return bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})
    return False


def cpu_flags() -> set[str]:
    """The CPU's feature flags (``/proc/cpuinfo``; empty where there is none): which kernels
    torch and bitsandbytes take depends on them (``native_bf16``; the run manifest records them)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return set(value.split())
    return set()


def compute_dtype(name: str | torch.dtype) -> torch.dtype:
    """The 4-bit compute dtype; ``auto`` is bf16 (the QLoRA recipe) where it is native, else fp32."""
    if str(name).lower() == "auto":
        return torch.bfloat16 if native_bf16() else torch.float32
    return to_dtype(name)


def cfg_get(cfg: Any, key: str, default: Any = None) -> Any:
    """Read a field from a DictConfig, a dict or an object, so callers need not convert first;
    a missing field or ``None`` means "use the default"."""
    if cfg is None:
        return default
    if isinstance(cfg, Mapping) or hasattr(cfg, "get"):
        value = cfg.get(key, default)
    else:
        value = getattr(cfg, key, default)
    return default if value is None else value


def bnb_config(quant_cfg: Any) -> BitsAndBytesConfig | None:
    """The BitsAndBytesConfig for ``quant_cfg``, or None when the base stays unquantized.

    ``name`` picks the scheme; explicit ``load_in_4bit``/``load_in_8bit``/``bnb_4bit_quant_type``
    fields must agree with it (a mismatch is a config bug, so it raises rather than guessing).
    ``lm_head`` is never quantized: transformers leaves the output layer (and anything tied to
    it) in full precision by default, and ``llm_int8_skip_modules`` adds to that list.
    """
    from transformers import BitsAndBytesConfig

    name = str(cfg_get(quant_cfg, "name", "none")).lower()
    if name not in QUANT_NAMES:
        raise ConfigError(f"unknown quantization '{name}'; expected one of: {', '.join(QUANT_NAMES)}")
    want_4bit, want_8bit = name in ("nf4", "fp4"), name == "int8"
    load_4bit = bool(cfg_get(quant_cfg, "load_in_4bit", want_4bit))
    load_8bit = bool(cfg_get(quant_cfg, "load_in_8bit", want_8bit))
    if (load_4bit, load_8bit) != (want_4bit, want_8bit):
        raise ConfigError(
            f"quantization '{name}' conflicts with load_in_4bit={load_4bit}, load_in_8bit={load_8bit}"
        )
    if name == "none":
        return None

    skip = cfg_get(quant_cfg, "llm_int8_skip_modules", None)
    # a list given replaces transformers' default (the output layer), which must stay float: keep it in
    skip = list(dict.fromkeys([*skip, "lm_head"])) if skip is not None else None
    if want_8bit:
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)

    quant_type = str(cfg_get(quant_cfg, "bnb_4bit_quant_type", name)).lower()
    if quant_type != name:
        raise ConfigError(f"quantization '{name}' conflicts with bnb_4bit_quant_type='{quant_type}'")
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_use_double_quant=bool(cfg_get(quant_cfg, "bnb_4bit_use_double_quant", False)),
        bnb_4bit_compute_dtype=compute_dtype(cfg_get(quant_cfg, "bnb_4bit_compute_dtype", "auto")),
        # packed 4-bit values in uint8 (bitsandbytes' default) or in a float dtype, which FSDP/ZeRO-3 can shard
        bnb_4bit_quant_storage=_storage_dtype(str(cfg_get(quant_cfg, "bnb_4bit_quant_storage", "uint8"))),
        llm_int8_skip_modules=skip,
    )


def _storage_dtype(name: str) -> torch.dtype:
    return torch.uint8 if name == "uint8" else to_dtype(name)


def count_quantized_linear(model: nn.Module) -> dict[str, int]:
    """How many bitsandbytes 4-bit / 8-bit linear layers ``model`` holds (``linear``: plain ones).

    A quantization config that silently fell back to full precision would still train, just
    not as the experiment claims; tests and the run summary use this to prove it did not.
    """
    import bitsandbytes as bnb

    counts = {"linear4bit": 0, "linear8bit": 0, "linear": 0}
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            counts["linear4bit"] += 1
        elif isinstance(module, bnb.nn.Linear8bitLt):
            counts["linear8bit"] += 1
        elif isinstance(module, nn.Linear):
            counts["linear"] += 1
    return counts


# -- bitsandbytes' CPU inference repack ----------------------------------------------------------
#
# bitsandbytes (0.50 here, since its CPU fused 4-bit kernel) repacks a ``Linear4bit`` weight into
# a CPU-only tiled layout the first time the layer runs in eval mode, without grad, on a CPU with
# AVX512-BF16 (``Linear4bit.forward`` checks ``support_avx512bf16_for_cpu``), and never unpacks it. From then on ``matmul_4bit`` calls
# ``gemv_4bit``, which has no autograd kernel: backward silently drops the gradient through every
# frozen 4-bit layer, and the absmax is rounded to bf16. A base score or a validation pass before
# (or between) training steps would therefore train the adapters on wrong gradients. ftlab turns
# the repack off on every 4-bit layer it loads, so evaluation and training run through the same
# standard layout and autograd path on every machine.

REPACK_SWITCH = "support_avx512bf16_for_cpu"  # Linear4bit's per-layer "may repack on CPU" flag


def is_cpu_packed(module: nn.Module) -> bool:
    """Whether bitsandbytes has repacked this 4-bit layer's weight into its CPU inference layout."""
    state = getattr(getattr(module, "weight", None), "quant_state", None)
    return bool(getattr(state, "packing_format_for_cpu", False))


def keep_standard_4bit_layout(model: nn.Module) -> int:
    """Stop bitsandbytes from repacking ``model``'s 4-bit weights for CPU inference; returns how
    many layers were guarded. Raises if a layer was repacked already (its gradients would be lost
    and the repack is not exactly invertible)."""
    import bitsandbytes as bnb

    guarded = 0
    for name, module in model.named_modules():
        if not isinstance(module, bnb.nn.Linear4bit):
            continue
        if is_cpu_packed(module):
            raise RuntimeError(
                f"4-bit layer '{name}' was repacked by bitsandbytes for CPU inference before training; "
                "load the model through ftlab.models.loading.load_model, which prevents that"
            )
        # releases before that kernel have neither the repack nor the switch; a rename of the switch in a
        # later release fails tests/models/test_quantized_training.py
        if hasattr(module, REPACK_SWITCH):
            setattr(module, REPACK_SWITCH, False)
            guarded += 1
    return guarded


def quantized_layers(model: nn.Module) -> list[tuple[nn.Module, str, nn.Module]]:
    """``(parent, attribute, layer)`` for every bitsandbytes 4-bit or 8-bit linear layer, so a
    caller can swap a layer for another (PEFT keeps the quantized layer as ``base_layer``)."""
    import bitsandbytes as bnb

    kinds = (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)
    return [
        (parent, attribute, child)
        for parent in model.modules()
        for attribute, child in parent.named_children()
        if isinstance(child, kinds)
    ]


def dequantized_linear(layer: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Linear:
    """A plain ``nn.Linear`` holding exactly the weights a bitsandbytes layer computes with
    (dequantized, frozen); the bias is the layer's own parameter, shared, not a copy."""
    from transformers.integrations.bitsandbytes import dequantize_bnb_weight

    weight = dequantize_bnb_weight(layer.weight, state=getattr(layer, "state", None))
    linear = nn.Linear(layer.in_features, layer.out_features, bias=False, device=weight.device, dtype=dtype)
    linear.weight = nn.Parameter(weight.detach().to(dtype).reshape(layer.out_features, layer.in_features).clone(),
                                 requires_grad=False)
    linear.bias = layer.bias
    return linear


@contextlib.contextmanager
def dequantized(model: nn.Module) -> Iterator[nn.Module]:
    """Run ``model`` with every bitsandbytes layer swapped for its ``dequantized_linear``, then put
    the quantized layers back: the float model a quantized one stands for (the reference for its
    gradients, and for a merge into dequantized weights). The float weights are read on entry."""
    layers = quantized_layers(model)
    for parent, attribute, layer in layers:
        setattr(parent, attribute, dequantized_linear(layer))
    try:
        yield model
    finally:
        for parent, attribute, layer in layers:
            setattr(parent, attribute, layer)


# -- which layers a quantization replaces ---------------------------------------------------------


def _replaceable(module: nn.Module) -> bool:
    """transformers' bitsandbytes integration replaces exactly ``nn.Linear`` and GPT-2's ``Conv1D``
    (``type(m) is nn.Linear``: a subclass such as Falcon's ``FalconLinear`` is left in float)."""
    return type(module) is nn.Linear or type(module).__name__ == "Conv1D"


def _is_bnb(module: nn.Module) -> bool:
    return type(module).__module__.startswith("bitsandbytes")


def _block_linear_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    from ftlab.models.structure import decoder_blocks, is_linear

    for block in decoder_blocks(model):
        for name, module in block.named_modules():
            if is_linear(module):
                yield name, module


def unquantizable_layers(model: nn.Module) -> list[str]:
    """Class names of the linear layers in ``model``'s decoder blocks that bitsandbytes cannot
    replace (``["FalconLinear"]``); works on a meta-device skeleton before anything loads."""
    return sorted({type(m).__name__ for _, m in _block_linear_layers(model) if not _is_bnb(m) and not _replaceable(m)})


def check_quantized(model: nn.Module, quant_name: str, label: str) -> int:
    """Raise unless loading with ``quantization=quant_name`` replaced the decoder blocks' linear
    layers (a run that silently trained a float base would claim a QLoRA result it is not);
    returns how many bitsandbytes layers the blocks hold. Layers named in
    ``llm_int8_skip_modules`` are the user's choice and stay float."""
    layers = list(_block_linear_layers(model))
    quantized = sum(1 for _, m in layers if _is_bnb(m))
    float_left = sorted({type(m).__name__ for _, m in layers if not _is_bnb(m)})
    if quantized == 0:
        shown = ", ".join(float_left) or "no linear layer at all"
        raise ConfigError(
            f"quantization={quant_name} replaced no layer of {label}: its decoder blocks hold {shown}, which "
            "bitsandbytes did not quantize (transformers replaces only nn.Linear and Conv1D); "
            "use quantization=none for this model"
        )
    return quantized


# -- the mapped checkpoint after a quantized load ---------------------------------------------------
#
# transformers reads safetensors through mmap and keeps every tensor it does not convert as a view of
# the mapping (zero-copy). For a 4-bit base those are the float leftovers (embedding, tied lm_head,
# norms), and the mapping keeps every page quantization read resident with them: 3.5 GB of a 0.98B
# Llama's 3.9 GB float32 file, counted in the process's RSS and in its memory cgroup, against 0.5 GB
# of NF4 weights. ``release_unused_pages`` unmaps the pages no parameter or buffer lies in; the
# leftovers stay file-backed (no copy), and their pages can still be dropped and read again.

MADV_DONTNEED = 4  # Linux: drop the range's page-table entries; a file-backed page is read again on access


def file_mappings(suffix: str = "") -> list[tuple[int, int, str]]:
    """``(start, end, path)`` of this process's file-backed memory mappings (``/proc/self/maps``)
    whose path ends with ``suffix``; empty where /proc has none."""
    found = []
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                parts = line.split(maxsplit=5)
                path = parts[5].rstrip("\n") if len(parts) == 6 else ""
                if path.startswith("/") and path.endswith(suffix):
                    start, end = (int(x, 16) for x in parts[0].split("-"))
                    found.append((start, end, path))
    except OSError:
        return []
    return found


def mapped_resident_mb(suffix: str) -> float:
    """Resident pages (``/proc/self/smaps`` Rss) of the mapped files whose path ends with ``suffix``."""
    total_kb, inside = 0, False
    try:
        with open("/proc/self/smaps") as smaps:
            for line in smaps:
                first = line.split(maxsplit=1)[0]
                if "-" in first and not first.endswith(":"):  # a mapping's header line
                    parts = line.split(maxsplit=5)
                    inside = len(parts) == 6 and parts[5].rstrip("\n").endswith(suffix)
                elif inside and first == "Rss:":
                    total_kb += int(line.split()[1])
    except OSError:
        return 0.0
    return total_kb / 1024


def _tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    yield from model.named_parameters(remove_duplicate=True)
    yield from model.named_buffers(remove_duplicate=True)


def _byte_range(tensor: torch.Tensor) -> tuple[int, int]:
    """First and one-past-last byte address a CPU tensor reads (views of a larger storage included)."""
    if tensor.numel() == 0:
        return tensor.data_ptr(), tensor.data_ptr()
    last = sum((size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride()))
    return tensor.data_ptr(), tensor.data_ptr() + (last + 1) * tensor.element_size()


def mapped_tensors(model: nn.Module, suffix: str = ".safetensors") -> list[str]:
    """Names of ``model``'s parameters and buffers whose memory lies in a mapped file ending with
    ``suffix`` (a checkpoint read through mmap), tied ones once."""
    spans = file_mappings(suffix)
    return [name for name, t in _tensors(model) if t.device.type == "cpu" and t.numel()
            and any(start <= t.data_ptr() < end for start, end, _ in spans)]


def release_unused_pages(model: nn.Module, suffix: str = ".safetensors") -> int:
    """Unmap the pages of ``model``'s mapped checkpoint files (``suffix``; the mappings it still
    holds a tensor in) that none of its parameters and buffers lies in, whole pages only; returns
    the bytes released. Nothing is copied: what the model still reads stays mapped, the rest is
    left to the page cache. Other mappings (another model's) are never touched."""
    import ctypes
    import mmap

    live = sorted(_byte_range(t) for _, t in _tensors(model) if t.device.type == "cpu" and t.numel())
    # only the mappings this model's own load made (it still holds a tensor in them): another
    # model's mapping may hold weights it changed in place (copy-on-write pages) that dropping
    # the pages would silently revert to the file's
    spans = [(start, end, path) for start, end, path in file_mappings(suffix)
             if any(first < end and last > start for first, last in live)]
    if not spans:
        return 0
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    page, released = mmap.PAGESIZE, 0
    for start, end, _ in spans:
        cursor = start
        for first, last in [*(r for r in live if r[1] > start and r[0] < end), (end, end)]:
            low, high = -(-cursor // page) * page, (min(first, end) // page) * page
            if high > low and libc.madvise(low, high - low, MADV_DONTNEED) == 0:
                released += high - low
            cursor = max(cursor, last)
    return released
