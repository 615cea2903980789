"""Types and ranges of every config field, checked before the data is read or a model loads.

Every field is described the way a method's ``Config`` describes its own: a dataclass field
whose type is the field's type and whose ``metadata`` may declare what values are valid::

    r: int = field(default=16, metadata={"help": "rank of the update", "min": 1})
    dropout: float = field(default=0.0, metadata={"min": 0, "lt": 1})
    bias: str = field(default="none", metadata={"choices": ["none", "all", "lora_only"]})
    max_steps: int = field(default=100, metadata={"min": 1, "also": {-1: "no limit"}})

``min``/``max`` are inclusive bounds, ``gt``/``lt`` exclusive ones (bounds apply to numbers);
``choices`` lists the valid values (of each element, for a list); ``also`` names values valid
outside the range, each with what it means; ``check`` is a function of the value for what the
others cannot say: it returns None when the value is valid, else what is expected (or raises an
``FtlabError`` with its own message). A type of ``Optional[...]`` accepts null.

The groups written in YAML only (trainer, model, quantization, scheduler, eval and the top-level
keys) are described by the dataclasses below, rooted at ``RunConfig``; the ``data`` node by
``ftlab.data.schema.DataConfig`` (its ranges are in ``RANGES``, since its own ``check()`` is
the data layer's); the ``method`` node by the selected method's ``Config``. Which keys exist is
Hydra's business (the composed config); this module says what their values may be.

``check_config`` checks a composed config against all of them; ``check_value`` one value
(what ``ftlab.overrides`` uses on the command line before anything is composed). Every failure
is one ``ConfigError`` line: ``KEY=VALUE: expected WHAT``.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Optional, Sequence, Union

from ftlab.data.prepare import MISSING_ACTIONS, PrepareConfig
from ftlab.data.schema import FORMAT_CHOICES, SYNTHETIC, DataConfig, SourceConfig
from ftlab.errors import ConfigError
from ftlab.models.families import FAMILIES

__all__ = ["RANGE_KEYS", "RANGES", "RunConfig", "Spec", "check_config", "check_node", "check_value", "closest",
           "conforms", "shown", "spec_at", "spec_of", "unknown_key_message"]

RANGE_KEYS = ("min", "max", "gt", "lt", "choices", "also", "check")  # the metadata keys a field may declare


# -- one field: its type and declared range -----------------------------------------------------------------


@dataclass(frozen=True)
class Spec:
    """What values one field accepts: its type (a typing annotation) and its declared range."""

    hint: Any = Any
    min: float | None = None
    max: float | None = None
    gt: float | None = None
    lt: float | None = None
    choices: tuple | None = None
    also: tuple[tuple[Any, str], ...] = ()  # (value, what it means) accepted outside the range
    check: Callable[[Any], Optional[str]] | None = None

    @classmethod
    def from_metadata(cls, hint: Any, metadata: Mapping[str, Any], where: str = "") -> "Spec":
        """The spec of a field of type ``hint`` with ``metadata``; a malformed range is a
        ``TypeError`` naming ``where`` (a plugin's mistake, reported when it registers)."""
        def number(key: str) -> float | None:
            value = metadata.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise TypeError(f"{where}: metadata '{key}' must be a number, got {value!r}")
            return value

        choices = metadata.get("choices")
        if choices is not None:
            if isinstance(choices, (str, bytes)) or not isinstance(choices, typing.Iterable):
                raise TypeError(f"{where}: metadata 'choices' must be a list of values, got {choices!r}")
            choices = tuple(choices)
        also = metadata.get("also", ())
        if isinstance(also, Mapping):
            also = tuple((k, str(v)) for k, v in also.items())
        elif isinstance(also, (list, tuple)):
            also = tuple((v, "") for v in also)
        else:
            raise TypeError(f"{where}: metadata 'also' must map values to what they mean, got {also!r}")
        check = metadata.get("check")
        if check is not None and not callable(check):
            raise TypeError(f"{where}: metadata 'check' must be a function of the value, got {check!r}")
        return cls(hint, number("min"), number("max"), number("gt"), number("lt"), choices, also, check)

    @property
    def ranged(self) -> bool:
        return any(b is not None for b in (self.min, self.max, self.gt, self.lt))

    def problem(self, value: Any) -> str | None:
        """None when ``value`` is valid, else what is expected (raises for a ``check`` that does)."""
        if value is None:
            return None if _allows_none(self.hint) or any(v is None for v, _ in self.also) else self.expected()
        if any(_same(value, v) for v, _ in self.also):
            return None
        if not conforms(value, self.hint):
            return self.expected()
        if self.choices is not None:
            items = value if isinstance(value, (list, tuple)) else [value]
            if any(not any(_same(item, c) for c in self.choices) for item in items):
                return self.expected()
        if _is_number(value) and not self._in_range(value):
            return self.expected()
        if self.check is not None:
            return self.check(value)
        return None

    def _in_range(self, v: float) -> bool:
        return ((self.min is None or v >= self.min) and (self.max is None or v <= self.max)
                and (self.gt is None or v > self.gt) and (self.lt is None or v < self.lt))

    def expected(self) -> str:
        """What the field accepts, in words: ``an integer >= 1 (or -1: no limit)``."""
        if self.choices is not None:
            text = "one of: " + " | ".join(dict.fromkeys(shown(c) for c in self.choices))
            if _is_list(self.hint):
                text = "a list of " + text
        else:
            text = _describe(self.hint, self._range_text())
        if self.also:
            text += " (or " + ", ".join(f"{shown(v)}: {m}" if m else shown(v) for v, m in self.also) + ")"
        if _allows_none(self.hint) and self.hint is not Any and "null" not in text:
            text += " or null"
        return text

    def _range_text(self) -> str:
        low = ("[", self.min) if self.min is not None else ("(", self.gt) if self.gt is not None else None
        high = ("]", self.max) if self.max is not None else (")", self.lt) if self.lt is not None else None
        if low and high:
            return f" in {low[0]}{shown(low[1])}, {shown(high[1])}{high[0]}"
        if low:
            return f" {'>=' if low[0] == '[' else '>'} {shown(low[1])}"
        if high:
            return f" {'<=' if high[0] == ']' else '<'} {shown(high[1])}"
        return ""


def _same(a: Any, b: Any) -> bool:
    """Equal and of the same kind (``True`` is not ``1``, ``16`` is not ``"16"``)."""
    return a == b and isinstance(a, bool) == isinstance(b, bool) and isinstance(a, str) == isinstance(b, str)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _members(hint: Any) -> tuple[Any, ...]:
    return typing.get_args(hint) if typing.get_origin(hint) in (Union, types.UnionType) else (hint,)


def _allows_none(hint: Any) -> bool:
    return hint is Any or any(m is type(None) or m is Any for m in _members(hint))


def _is_list(hint: Any) -> bool:
    return any(typing.get_origin(m) in (list, tuple, Sequence) or m in (list, tuple) for m in _members(hint))


def conforms(value: Any, hint: Any) -> bool:
    """Whether ``value`` (a plain value, as parsed or composed) is of type ``hint``."""
    if hint is Any or hint is object:
        return True
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        return any(conforms(value, a) for a in args)
    if hint is type(None):
        return value is None
    if origin is Literal:
        return any(_same(value, a) for a in args)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return _is_number(value) and math.isfinite(value)
    if hint is str:  # a number is a valid string (``task_name=123``), as OmegaConf converts it
        return isinstance(value, str) or _is_number(value)
    if origin in (list, tuple, Sequence) or hint in (list, tuple):
        inner = args[0] if args else Any
        return isinstance(value, (list, tuple)) and all(conforms(v, inner) for v in value)
    if origin in (dict, Mapping) or hint in (dict, Mapping):
        inner = args[1] if len(args) == 2 else Any
        return isinstance(value, Mapping) and all(conforms(v, inner) for v in value.values())
    if dataclasses.is_dataclass(hint):
        return isinstance(value, Mapping)
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True  # an annotation this module does not know: no check


_PLURAL = {int: "integers", float: "numbers", str: "strings", bool: "true/false values"}


def _describe(hint: Any, range_text: str = "") -> str:
    if hint is Any or hint is object:
        return "any value" + (f" (numbers{range_text})" if range_text else "")
    members = [m for m in _members(hint) if m is not type(None)]
    if len(members) > 1 or type(None) in _members(hint):
        parts = [_describe(m, range_text) for m in members]
        text = ", ".join(parts[:-1]) + (" or " if len(parts) > 1 else "") + parts[-1]
        return text + (" or null" if type(None) in _members(hint) else "")
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        return "one of: " + " | ".join(shown(a) for a in args)
    if hint is bool:
        return "true or false"
    if hint is int:
        return "an integer" + range_text
    if hint is float:
        return "a number" + range_text
    if hint is str:
        return "a string"
    if origin in (list, tuple, Sequence) or hint in (list, tuple):
        inner = args[0] if args else Any
        return "a list" + (f" of {_PLURAL[inner]}" if inner in _PLURAL else "")
    if origin in (dict, Mapping) or hint in (dict, Mapping):
        return "a mapping"
    if dataclasses.is_dataclass(hint):
        return f"a mapping with keys {', '.join(f.name for f in dataclasses.fields(hint))}"
    return f"a {getattr(hint, '__name__', hint)}"


def shown(value: Any) -> str:
    """A value as a user writes it on the command line (``null``, ``true``, ``abc``, ``'a b'``)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value if re.fullmatch(r"[\w.:/+\-*~${}@]+", value) else repr(value)
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k}: {shown(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(shown(v) for v in value) + "]"
    return str(value)


def spec_of(cls: type, name: str) -> Spec:
    """The spec of field ``name`` of dataclass ``cls``: its metadata, plus ``RANGES`` for it. A
    subclass that declares a field again (a new default or help) keeps the range its bases
    declared, key by key, unless it declares its own."""
    metadata: dict[str, Any] = {}
    for base in reversed(cls.__mro__):
        f = getattr(base, "__dataclass_fields__", {}).get(name)
        if f is not None:
            metadata.update((k, v) for k, v in f.metadata.items() if k in RANGE_KEYS)
    metadata.update(RANGES.get(cls, {}).get(name, {}))
    return Spec.from_metadata(_hints(cls).get(name, Any), metadata, f"{cls.__qualname__}.{name}")


@functools.lru_cache(maxsize=None)
def _hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except Exception:  # an annotation that does not resolve: no type checks for that class
        return {}


def _dataclass_in(hint: Any) -> tuple[type | None, bool]:
    """The dataclass a field holds (``PrepareConfig``) or holds a list of (``list[SourceConfig]``)."""
    for m in _members(hint):
        if dataclasses.is_dataclass(m):
            return m, False
        args = typing.get_args(m)
        if typing.get_origin(m) in (list, tuple, Sequence) and args and dataclasses.is_dataclass(args[0]):
            return args[0], True
    return None, False


# -- messages ---------------------------------------------------------------------------------------------


def closest(name: str, valid: Sequence[str]) -> str | None:
    """The valid name closest to a misspelt one, if any is close."""
    found = difflib.get_close_matches(name, list(valid), n=1, cutoff=0.6)
    return found[0] if found else None


def unknown_key_message(key: str, valid: Sequence[str]) -> str:
    """``trainer.max_stpes: no such key; did you mean trainer.max_steps? Valid keys of trainer: ...``"""
    parent, _, leaf = key.rpartition(".")
    names = [v for v in valid if not v.startswith("_")]
    if not names:
        return f"{key}: no such key ({parent or 'the config'} holds none; add one with +{key}=VALUE)"
    best = closest(leaf, names)
    hint = f"; did you mean {parent + '.' if parent else ''}{best}?" if best else "."
    where = f"of {parent}" if parent else "at the top level"
    return f"{key}: no such key{hint} Valid keys {where}: {', '.join(names)}"


def check_value(key: str, value: Any, spec: Spec, source: str | None = None) -> None:
    """Raise a one-line ``ConfigError`` naming ``key`` and what is valid when ``value`` is not
    (``source``: how an interpolated value was written, e.g. ``${trainer.max_steps}``). A value
    of a dataclass type (``data.prepare``, each of ``data.mix``) is checked key by key."""
    inner, many = _dataclass_in(spec.hint)
    if inner is not None and not many and _is_mapping(value):
        check_node(value, inner, key)
        return
    if inner is not None and many and (isinstance(value, (list, tuple)) or _is_list_config(value)):
        for i, item in enumerate(value):
            if not _is_mapping(item):
                raise ConfigError(f"{key}[{i}]={shown(_plain(item))}: expected {_describe(inner)}")
            check_node(item, inner, f"{key}[{i}]")
        return
    problem = spec.problem(_plain(value))
    if problem:
        written = shown(_plain(value)) if source is None else f"{source} (= {shown(_plain(value))})"
        raise ConfigError(f"{key}={written}: expected {problem}")


def _is_mapping(value: Any) -> bool:
    from omegaconf import DictConfig

    return isinstance(value, (Mapping, DictConfig))


def _is_list_config(value: Any) -> bool:
    from omegaconf import ListConfig

    return isinstance(value, ListConfig)


# -- the groups written in YAML ---------------------------------------------------------------------------

LIGHTNING_PRECISIONS = (64, 32, 16, "transformer-engine", "transformer-engine-float16", "16-true", "16-mixed",
                        "bf16-true", "bf16-mixed", "32-true", "64-true", "64", "32", "16", "bf16")  # what Lightning's Trainer accepts
PRECISIONS = ("auto", *LIGHTNING_PRECISIONS)  # auto: ftlab.precision.resolve_precision
DTYPE_NAMES = ("float32", "fp32", "bfloat16", "bf16", "float16", "fp16")  # ftlab.models.quant.DTYPES
QUANT_NAMES = ("none", "nf4", "fp4", "int8")  # ftlab.models.quant.QUANT_NAMES
MODEL_KINDS = ("tiny", "pretrained")  # ftlab.models.loading.checkpoint_path
MAX_SEED = 2**32 - 1  # numpy's (and Lightning's seed_everything's) largest seed


def _batches(value: Any) -> str | None:
    """Lightning's ``limit_*_batches`` / ``overfit_batches``: a count or a share of the batches."""
    if isinstance(value, float) and not 0.0 <= value <= 1.0:
        return "an integer >= 0 (batches) or a number in [0.0, 1.0] (a share of them)"
    if isinstance(value, int) and value < 0:
        return "an integer >= 0 (batches) or a number in [0.0, 1.0] (a share of them)"
    return None


def _dtype(value: Any) -> str | None:
    if str(value).lower().removeprefix("torch.") not in DTYPE_NAMES:
        return "one of: " + " | ".join(DTYPE_NAMES)
    return None


def _compute_dtype(value: Any) -> str | None:
    if str(value).lower() != "auto" and _dtype(value):
        return "one of: auto | " + " | ".join(DTYPE_NAMES)
    return None


def _model_source(value: Any) -> str | None:
    from ftlab.models.files import check_model_source

    check_model_source(value)  # a local folder that cannot load raises; a hub id passes
    return None


def _chat_template(value: Any) -> str | None:
    from ftlab.models.chat_templates import TEMPLATES

    if value is None or str(value) in TEMPLATES or "{%" in str(value) or "{{" in str(value):
        return None
    return f"null (the tokenizer's own), {' | '.join(TEMPLATES)} or a Jinja template"


def _checkpoint_source(value: Any) -> str | None:
    from pathlib import Path

    if value in (None, ""):
        return None
    path = Path(str(value)).expanduser()
    return None if path.exists() else "a checkpoint file or a run folder; no such file or folder"


def _meta(help: str = "", **ranges: Any) -> dict[str, Any]:
    return {"help": help, **ranges}


@dataclass
class TrainerConfig:
    """The ``trainer`` node: ``pytorch_lightning.Trainer`` arguments (any other argument of the
    Trainer may be added with ``+trainer.NAME=VALUE``)."""

    accelerator: str = "auto"
    devices: Union[int, str, list[int]] = field(default=1, metadata=_meta(min=1, also={-1: "every device"}))
    strategy: Any = "auto"
    num_nodes: int = field(default=1, metadata=_meta(min=1))
    precision: Any = field(default="auto", metadata=_meta("auto: bf16-mixed where bf16 is native, else 32-true",
                                                            choices=PRECISIONS))
    max_steps: int = field(default=100, metadata=_meta("optimizer steps", min=1, also={-1: "no limit"}))
    max_epochs: Optional[int] = field(default=-1, metadata=_meta(min=1, also={-1: "no limit"}))
    val_check_interval: Optional[int] = field(default=50, metadata=_meta("optimizer steps", min=1))
    check_val_every_n_epoch: Optional[int] = field(default=None, metadata=_meta(min=1))
    limit_train_batches: Union[int, float, None] = field(default=None, metadata=_meta(check=_batches))
    limit_val_batches: Union[int, float, None] = field(default=1.0, metadata=_meta(check=_batches))
    overfit_batches: Union[int, float] = field(default=0.0, metadata=_meta(check=_batches))
    num_sanity_val_steps: Optional[int] = field(default=0, metadata=_meta(min=0, also={-1: "all"}))
    accumulate_grad_batches: int = field(default=1, metadata=_meta(min=1))
    gradient_clip_val: Optional[float] = field(default=1.0, metadata=_meta(min=0))
    gradient_clip_algorithm: Optional[str] = field(default=None, metadata=_meta(choices=("norm", "value")))
    log_every_n_steps: Optional[int] = field(default=1, metadata=_meta(min=0))
    enable_checkpointing: Optional[bool] = True
    enable_model_summary: Optional[bool] = False
    enable_progress_bar: Optional[bool] = True
    deterministic: Union[bool, Literal["warn"], None] = False
    default_root_dir: Any = None


@dataclass
class ModelConfig:
    """The ``model`` node (``conf/model/*.yaml``)."""

    name: str = "llama"
    kind: str = field(default="pretrained", metadata=_meta(choices=MODEL_KINDS))
    name_or_path: Optional[str] = field(default=None, metadata=_meta(check=_model_source))
    gguf_file: Optional[str] = None
    family: str = field(default="llama", metadata=_meta("architecture family (kind=tiny builds one)",
                                                        choices=tuple(FAMILIES)))
    chat_template: Optional[str] = field(default=None, metadata=_meta(check=_chat_template))
    dtype: str = field(default="float32", metadata=_meta(check=_dtype))
    trust_remote_code: bool = False
    gradient_checkpointing: bool = False
    hidden_size: int = field(default=64, metadata=_meta(min=1))
    intermediate_size: int = field(default=128, metadata=_meta(min=1))
    num_hidden_layers: int = field(default=2, metadata=_meta(min=1))
    num_attention_heads: int = field(default=4, metadata=_meta(min=1))
    num_key_value_heads: int = field(default=2, metadata=_meta(min=1))
    max_position_embeddings: int = field(default=512, metadata=_meta(min=1))
    init_seed: int = field(default=0, metadata=_meta(min=0, max=MAX_SEED))


@dataclass
class QuantizationConfig:
    """The ``quantization`` node (``conf/quantization/*.yaml``)."""

    name: str = field(default="none", metadata=_meta(choices=QUANT_NAMES))
    load_in_4bit: bool = False
    load_in_8bit: bool = False
    bnb_4bit_quant_type: str = field(default="nf4", metadata=_meta(choices=("nf4", "fp4")))
    bnb_4bit_use_double_quant: bool = True
    bnb_4bit_compute_dtype: str = field(default="auto", metadata=_meta(check=_compute_dtype))
    bnb_4bit_quant_storage: str = field(default="uint8", metadata=_meta(
        "the dtype 4-bit weights are packed in; FSDP and ZeRO-3 need model.dtype",
        choices=("uint8", "bfloat16", "float16", "float32")))
    llm_int8_skip_modules: Optional[list[str]] = None


@dataclass
class SchedulerConfig:
    """The ``scheduler`` node (``conf/scheduler/*.yaml``)."""

    name: str = "cosine"
    warmup_ratio: float = field(default=0.1, metadata=_meta("share of the steps spent warming up", min=0, lt=1))


@dataclass
class EvalConfig:
    """The ``eval`` node of ``train.yaml``."""

    generate: bool = True
    checker: str = "exact"
    num_prompts: Optional[int] = field(default=50, metadata=_meta(min=1))
    max_new_tokens: Optional[int] = field(default=None, metadata=_meta(min=1))
    batch_size: int = field(default=16, metadata=_meta(min=1))
    num_samples: int = field(default=4, metadata=_meta(min=0))


@dataclass
class CheckpointConfig:
    """``checkpoint:``: resumable checkpoints (``ftlab.checkpoints``)."""

    every_n_steps: Optional[int] = field(default=50, metadata=_meta("optimizer steps between checkpoints", min=1))
    keep: int = field(default=2, metadata=_meta("newest checkpoints kept", min=1))
    keep_after_success: bool = False


@dataclass
class DivergenceConfig:
    """``divergence:``: the divergence guard (``ftlab.guards``)."""

    enabled: bool = True
    uniform_steps: Optional[int] = field(default=5, metadata=_meta(min=1))
    uniform_tol: float = field(default=1e-3, metadata=_meta(gt=0))
    rise_factor: Optional[float] = field(default=3.0, metadata=_meta(gt=1))
    rise_steps: Optional[int] = field(default=5, metadata=_meta(min=1))
    max_weight_growth: Optional[float] = field(default=1000.0, metadata=_meta(gt=1))


@dataclass
class RunConfig:
    """The root of a composed config: the top-level keys of ``train.yaml`` and the nodes with a
    schema (the ``method`` node's is the selected method's ``Config``)."""

    seed: int = field(default=0, metadata=_meta(min=0, max=MAX_SEED))
    task_name: str = "train"
    save_model: bool = True
    resume: bool = False
    ckpt_path: Optional[str] = field(default=None, metadata=_meta(check=_checkpoint_source))
    objective: str = "val_loss"
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    divergence: DivergenceConfig = field(default_factory=DivergenceConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    quantization: QuantizationConfig = field(default_factory=QuantizationConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    data: DataConfig = field(default_factory=DataConfig)


# The ranges of the data node's fields: ``DataConfig`` is the data layer's (its ``check()`` stays the
# authority on combinations); these are the single-field ranges, so they are known before composing.
RANGES: dict[type, dict[str, dict[str, Any]]] = {
    DataConfig: {
        "val_ratio": {"min": 0, "lt": 1},
        "format": {"choices": FORMAT_CHOICES},
        "synthetic": {"choices": SYNTHETIC},
        "limit": {"min": 1},
        "num_train": {"min": 1},
        "num_val": {"min": 0},  # 0: no validation (the data module supports it, as val_ratio=0)
        "max_length": {"min": 1},
        "min_tokens": {"min": 0},
        "max_tokens": {"min": 1},
        "batch_size": {"min": 1},
        "eval_batch_size": {"min": 1},
        "num_workers": {"min": 0},
        "seed": {"min": 0, "max": MAX_SEED},
    },
    SourceConfig: {"weight": {"gt": 0}, "format": {"choices": FORMAT_CHOICES}},
    PrepareConfig: {"missing": {"choices": MISSING_ACTIONS}, "augment_ratio": {"min": 0, "max": 1}},
}
CLOSED: frozenset[type] = frozenset({DataConfig, SourceConfig, PrepareConfig})  # the data layer refuses other keys


def spec_at(key: str, method_config: type | None = None) -> Spec | None:
    """The spec of a dotted key of a composed config (``data.prepare.missing``), None when the
    key has none; ``method.*`` needs the selected method's ``Config``."""
    parts = key.split(".")
    cls: type | None = RunConfig
    if parts[0] == "method":
        cls, parts = method_config, parts[1:]
    spec = None
    for i, part in enumerate(parts):
        if cls is None or part not in {f.name for f in dataclasses.fields(cls)}:
            return None
        spec = spec_of(cls, part)
        inner, many = _dataclass_in(spec.hint)
        if i < len(parts) - 1:
            if many or inner is None:
                return None
            cls = inner
    return spec


# -- a composed config ------------------------------------------------------------------------------------


def check_config(cfg: Any, method_config: type | None = None) -> None:
    """Check every field of a composed config that has a spec: types, ranges, choices, required
    values; keys added to a node with a ``_target_`` (``+trainer.NAME=``) against the target's
    arguments; then the data node's own checks (``DataConfig.from_any``). The first problem is a
    one-line ``FtlabError``."""
    from omegaconf import DictConfig

    check_node(cfg, RunConfig, "")
    if method_config is not None and isinstance(cfg.get("method"), DictConfig):
        check_node(cfg.method, method_config, "method")
    for name, hint in _hints(RunConfig).items():
        node = cfg.get(name)
        if isinstance(node, DictConfig) and dataclasses.is_dataclass(hint):
            _check_target_arguments(node, hint, name)
    if isinstance(cfg.get("data"), DictConfig):
        DataConfig.from_any(cfg.data)


def _check_target_arguments(node: Any, cls: type, path: str) -> None:
    """Keys of a ``_target_`` node beyond its schema must be arguments of the target (a Trainer
    argument added with ``+trainer.NAME=``); the target is imported only when there are such keys."""
    import inspect

    target = node.get("_target_")
    extra = [str(k) for k in node.keys() if not str(k).startswith("_") and str(k) not in
             {f.name for f in dataclasses.fields(cls)}]
    if not target or not extra:
        return
    from hydra.utils import get_object

    try:
        params = inspect.signature(get_object(str(target))).parameters
    except Exception:  # a target that does not import or has no signature: Hydra reports it when it runs
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    for key in extra:
        if key not in params:
            valid = sorted(p for p in params if p != "self")
            message = unknown_key_message(f"{path}.{key}", valid).replace("no such key", f"not an argument of {target}")
            raise ConfigError(message)


def check_node(node: Any, cls: type, prefix: str) -> None:
    """Check the keys of one node (a DictConfig or a mapping) against dataclass ``cls``."""
    from omegaconf import DictConfig, OmegaConf

    names = [f.name for f in dataclasses.fields(cls)]
    keys = [str(k) for k in node.keys()]
    if cls in CLOSED:
        for key in keys:
            if key not in names and not key.startswith("_"):
                raise ConfigError(unknown_key_message(_join(prefix, key), names))
    for key in keys:
        if key not in names:
            continue
        path = _join(prefix, key)
        if isinstance(node, DictConfig) and OmegaConf.is_missing(node, key):
            if key == "name" and prefix == "method":
                continue
            raise ConfigError(f"{path} is required: set it with {path}=VALUE ({spec_of(cls, key).expected()})")
        spec = spec_of(cls, key)
        if spec.hint is Any and not spec.ranged and spec.choices is None and spec.check is None and not spec.also:
            continue  # nothing to check: not even resolved (``${hydra:...}`` needs a running job)
        value, source = _resolved(node, key, path)
        if value is not _UNRESOLVED:
            check_value(path, value, spec, source)


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _plain(value: Any) -> Any:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def _resolved(node: Any, key: str, path: str) -> tuple[Any, str | None]:
    """The value at ``key`` (interpolations resolved) and, for an interpolation, how it was written."""
    from omegaconf import DictConfig, OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    if not isinstance(node, DictConfig):
        return node[key], None
    source = None
    if OmegaConf.is_interpolation(node, key):
        source = str(node._get_node(key)._value())  # type: ignore[union-attr]
    try:
        return node[key], source
    except OmegaConfBaseException as exc:
        if "HydraConfig was not set" in str(exc):
            return _UNRESOLVED, source  # ${hydra:...} outside a run: Hydra resolves it in the job
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"{path}={source}: cannot be resolved ({first})") from None


_UNRESOLVED = object()
