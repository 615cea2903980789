"""Bad input fails fast, in one line, before anything heavy: every config value against its type
and declared range (ftlab.schema), every key against the config, every swept value, model folders
by their headers (ftlab.models.files). Each bad case has a control at the edge of what is valid."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import time
import typing
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from ftlab.config import check_overrides, compose, validate
from ftlab.errors import ConfigError, FtlabError, MethodError, ModelLoadError
from ftlab.methods.base import BaseMethod, MethodConfig
from ftlab.models.files import check_model_source, is_hub_id
from ftlab.overrides import check as quick_check
from ftlab.overrides import inventory, variations
from ftlab.registry import ENTRY_POINT_GROUP, discover
from ftlab.schema import RANGES, RunConfig, Spec, spec_at, spec_of

TINY = ["model=tiny"]


def _error(overrides: list[str], kind: type[Exception] = FtlabError, multirun: bool = False) -> str:
    """The message of the one-line error ``overrides`` give (composed as the command line would)."""
    with pytest.raises(kind) as err:
        check_overrides([*TINY, *overrides], multirun=multirun)
    text = str(err.value)
    assert "\n" not in text, text
    return text


# -- the probes: types and ranges --------------------------------------------------------------------------


@pytest.mark.parametrize("bad,message,edges", [
    ("trainer.max_steps=abc", "trainer.max_steps=abc: expected an integer >= 1 (or -1: no limit)",
     ["trainer.max_steps=1", "trainer.max_steps=-1"]),
    ("trainer.max_steps=0", "trainer.max_steps=0: expected an integer >= 1", ["trainer.max_steps=1"]),
    ("seed=abc", "seed=abc: expected an integer in [0, 4294967295]", ["seed=0", "seed=4294967295"]),
    ("seed=-1", "seed=-1: expected an integer in [0, 4294967295]", ["seed=0"]),
    ("method.lr=-1", "method.lr=-1: expected a number > 0", ["method.lr=1e-12", "method.lr=1e3"]),
    ("method.lr=0", "method.lr=0: expected a number > 0", ["method.lr=1e-12"]),
    ("method.r=0", "method.r=0: expected an integer >= 1", ["method.r=1"]),
    ("method.r=abc", "method.r=abc: expected an integer >= 1", ["method.r=1"]),
    ("method.dropout=1", "method.dropout=1: expected a number in [0, 1)", ["method.dropout=0", "method.dropout=0.999"]),
    ("method.bias=some", "method.bias=some: expected one of: none | all | lora_only", ["method.bias=lora_only"]),
    ("data.batch_size=0", "data.batch_size=0: expected an integer >= 1", ["data.batch_size=1"]),
    ("data.max_length=0", "data.max_length=0: expected an integer >= 1", ["data.max_length=1"]),
    ("data.val_ratio=1", "data.val_ratio=1: expected a number in [0, 1)", ["data.val_ratio=0", "data.val_ratio=0.99"]),
    ("eval.num_prompts=0", "eval.num_prompts=0: expected an integer >= 1 or null", ["eval.num_prompts=null"]),
    ("eval.num_samples=-1", "eval.num_samples=-1: expected an integer >= 0", ["eval.num_samples=0"]),
    ("trainer.accumulate_grad_batches=0", "trainer.accumulate_grad_batches=0: expected an integer >= 1",
     ["trainer.accumulate_grad_batches=1"]),
    ("trainer.val_check_interval=0.5", "trainer.val_check_interval=0.5: expected an integer >= 1 or null",
     ["trainer.val_check_interval=1", "trainer.val_check_interval=null"]),
    ("trainer.precision=bf17", "trainer.precision=bf17: expected one of: auto | 64 | 32 | 16 | transformer-engine",
     ["trainer.precision=bf16-mixed", "trainer.precision=16", "trainer.precision=auto"]),
    ("trainer.limit_val_batches=1.5", "trainer.limit_val_batches=1.5: expected an integer >= 0 (batches)",
     ["trainer.limit_val_batches=1.0", "trainer.limit_val_batches=0", "trainer.limit_val_batches=7"]),
    ("trainer.enable_progress_bar=1", "trainer.enable_progress_bar=1: expected true or false",
     ["trainer.enable_progress_bar=false"]),
    ("scheduler.warmup_ratio=1", "scheduler.warmup_ratio=1: expected a number in [0, 1)", ["scheduler.warmup_ratio=0"]),
    ("model.kind=tinyy", "model.kind=tinyy: expected one of: tiny | pretrained", ["model.kind=tiny"]),
    ("model.hidden_size=0", "model.hidden_size=0: expected an integer >= 1", ["model.hidden_size=64"]),
    ("model.dtype=float33", "model.dtype=float33: expected one of: float32 | fp32 | bfloat16", ["model.dtype=bf16"]),
])
def test_a_bad_value_names_its_key_and_what_is_valid(bad: str, message: str, edges: list[str]) -> None:
    assert _error([bad]).startswith(message)
    for edge in edges:  # the control: the edge of the range composes
        check_overrides([*TINY, edge])


def test_a_plugin_field_gets_its_type_checked_for_free_and_a_redeclared_field_keeps_its_range() -> None:
    # lora_fa (plugins/) declares no ranges; its int field still refuses a string
    assert _error(["method=lora_fa", "method.r=four"]).startswith("method.r=four: expected an integer")
    check_overrides([*TINY, "method=lora_fa", "method.r=4"])
    # adalora declares lr again (its own default); the base's "> 0" still holds
    assert _error(["method=adalora", "method.lr=-0.1"]) == "method.lr=-0.1: expected a number > 0"
    # grpo needs groups of two; ppo, on the same base config, needs one
    assert _error(["method=grpo", "method.num_generations=1"]) == "method.num_generations=1: expected an integer >= 2"
    check_overrides([*TINY, "method=ppo", "method.num_generations=1"])


def test_an_interpolated_value_is_named_with_how_it_was_written() -> None:
    text = _error(["eval.num_samples=0", "data.batch_size=${eval.num_samples}"])
    assert text == "data.batch_size=${eval.num_samples} (= 0): expected an integer >= 1"
    check_overrides([*TINY, "eval.num_samples=1", "data.batch_size=${eval.num_samples}"])


def test_the_error_comes_before_anything_heavy(monkeypatch: pytest.MonkeyPatch) -> None:
    import ftlab.build
    import ftlab.data.loading

    def heavy(*args, **kwargs):
        raise AssertionError("loaded something before refusing the config")

    monkeypatch.setattr(ftlab.build, "load_model", heavy)
    monkeypatch.setattr(ftlab.data.loading, "load_splits", heavy)
    start = time.perf_counter()
    assert _error(["data.batch_size=0"]).startswith("data.batch_size=0")
    assert time.perf_counter() - start < 5


# -- unknown keys ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad,key,suggestion,valid", [
    ("trainer.max_stpes=3", "trainer.max_stpes", "trainer.max_steps", "Valid keys of trainer: "),
    ("data.batch_sise=4", "data.batch_sise", "data.batch_size", "Valid keys of data: "),
    ("eval.num_promts=4", "eval.num_promts", "eval.num_prompts", "Valid keys of eval: "),
    ("model.name_or_pth=x", "model.name_or_pth", "model.name_or_path", "Valid keys of model: "),
    ("data.prepare.dedpu=false", "data.prepare.dedpu", "data.prepare.dedup", "Valid keys of data.prepare: "),
    ("seedd=3", "seedd", "seed", "Valid keys at the top level: "),
])
def test_a_misspelt_key_names_the_closest_key_and_every_valid_one(bad: str, key: str, suggestion: str,
                                                                   valid: str) -> None:
    text = _error([bad], ConfigError)
    assert text.startswith(f"{key}: no such key; did you mean {suggestion}? {valid}")
    assert suggestion.rpartition(".")[2] in text.split(valid)[1].split(", ")


def test_a_key_only_another_option_of_its_group_has_is_named_with_the_selected_options_keys() -> None:
    text = _error(["model=llama", "model.hidden_size=64"], ConfigError)  # tiny's, not llama's
    assert text.startswith("model.hidden_size: no such key. Valid keys of model: ")
    assert "name_or_path" in text and "hidden_size," not in text
    check_overrides(["model=tiny", "model.hidden_size=64"])


def test_a_misspelt_method_field_names_the_method_and_the_closest_field() -> None:
    text = _error(["method.dropuot=0.1"], MethodError)
    assert text.startswith("method 'lora' has no field 'dropuot'. Valid fields: lr, r, alpha, dropout")
    assert text.endswith("did you mean method.dropout?")


def test_an_unknown_group_option_lists_the_options() -> None:
    assert _error(["trainer=cpuu"]) == \
        "trainer=cpuu: no such option of the trainer group; options: cpu, ddp, deepspeed_zero2, deepspeed_zero3, default, " \
        "fsdp, gpu"
    assert _error(["method=lroa"], MethodError).startswith("unknown method 'lroa'. Installed methods: ")


def test_an_added_trainer_argument_must_be_one_of_lightnings() -> None:
    text = _error(["+trainer.max_stpes=3"], ConfigError)
    assert text.startswith("trainer.max_stpes: not an argument of pytorch_lightning.Trainer; "
                           "did you mean trainer.max_steps?")
    assert compose([*TINY, "+trainer.min_steps=1"]).trainer.min_steps == 1  # the control: a real argument


def test_a_data_mix_entry_is_checked_key_by_key() -> None:
    assert _error(["data.mix=[{path: a.jsonl, wieght: 2}]"]).startswith(
        "data.mix[0].wieght: no such key; did you mean data.mix[0].weight?")
    assert _error(["data.mix=[{path: a.jsonl, weight: 0}]"]) == "data.mix[0].weight=0: expected a number > 0"


def test_an_override_that_does_not_parse_or_sweeps_without_multirun_is_one_line() -> None:
    assert _error(["trainer.max_steps=["]).startswith("trainer.max_steps=[: cannot parse this override")
    assert _error(["seed=0,1"]).startswith("seed=0,1: a sweep runs with -m (--multirun)")


# -- sweeps ----------------------------------------------------------------------------------------------------


def test_every_swept_value_is_checked() -> None:
    assert _error(["method.lr=1e-4,-1"], multirun=True) == "method.lr=-1: expected a number > 0"
    assert _error(["trainer.max_steps=5,0,3"], multirun=True).startswith("trainer.max_steps=0: expected")
    assert _error(["seed=range(-1,3)"], multirun=True).startswith("seed=-1: expected")
    # an Optuna interval: both ends
    assert _error(["+sweep=optuna", "method.lr=tag(log, interval(0, 1e-2))"], multirun=True).startswith(
        "method.lr=0.0: expected a number > 0")
    # a swept method is composed and validated as itself (qlora refuses an unquantized base)
    assert _error(["method=lora,qlora", "quantization=none"], multirun=True).startswith(
        "method 'qlora' cannot train on a quantization=none base")
    check_overrides([*TINY, "method=lora,full", "seed=0,1", "method.lr=1e-4,3e-4"], multirun=True)  # the control


def test_sweeps_a_config_file_declares_are_composed_value_by_value(monkeypatch: pytest.MonkeyPatch) -> None:
    import ftlab.config

    composed: list[list[str]] = []

    def recording(overrides, return_hydra_config=False):
        composed.append(list(overrides))
        return compose(overrides, return_hydra_config)

    monkeypatch.setattr(ftlab.config, "compose", recording)
    check_overrides([*TINY, "experiment=lora_rank"], multirun=True)  # sweeps method.r: 4,8,16,32,64 and seed: 0,1
    swept = {o for run in composed for o in run if o.startswith(("method.r=", "seed="))}
    assert swept == {"method.r=4", "method.r=8", "method.r=16", "method.r=32", "method.r=64", "seed=0", "seed=1"}
    composed.clear()
    check_overrides([*TINY, "+sweep=grid", "method=lora", "method.lr=1e-3,1e-2"], multirun=True)
    lrs = {o for run in composed for o in run if o.startswith("method.lr=")}
    assert lrs == {"method.lr=0.001", "method.lr=0.01"}  # the command line's sweep wins over the file's


def test_variations_compose_every_value_once_not_the_product() -> None:
    runs = variations(["method=lora,full", "seed=0,1,2", "model=tiny"])
    assert runs == [["method=lora", "seed=0", "model=tiny"], ["method=full", "seed=0", "model=tiny"],
                    ["method=lora", "seed=1", "model=tiny"], ["method=lora", "seed=2", "model=tiny"]]


# -- model folders ---------------------------------------------------------------------------------------------


def _safetensors(path: Path, tensors: dict[str, int]) -> Path:
    """A safetensors file of float32 vectors (name -> length), written by hand (its format is small)."""
    header, offset = {}, 0
    for name, n in tensors.items():
        header[name] = {"dtype": "F32", "shape": [n], "data_offsets": [offset, offset + 4 * n]}
        offset += 4 * n
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(offset))
    return path


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8, "num_attention_heads": 2,
                                                    "num_key_value_heads": 2}))
    _safetensors(folder / "model.safetensors", {"a": 4, "b": 6})
    return folder


def test_a_model_folder_is_checked_by_its_headers(model_dir: Path) -> None:
    check_overrides([*TINY, "model=llama", f"model.name_or_path={model_dir}"])  # the control: a whole folder
    weights = model_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1])  # one byte short
    text = _error(["model=llama", f"model.name_or_path={model_dir}"], ModelLoadError)
    assert f"{weights} is truncated: its header declares" in text
    weights.write_bytes(weights.read_bytes()[:20])  # the header itself cut
    assert "truncated: its header needs" in _error(["model=llama", f"model.name_or_path={model_dir}"], ModelLoadError)
    weights.write_bytes(b"\x01\x00")
    assert "not even the 8-byte header length" in _error(["model=llama", f"model.name_or_path={model_dir}"], ModelLoadError)


def test_a_corrupt_config_json_is_named_with_its_line(model_dir: Path) -> None:
    (model_dir / "config.json").write_text('{"model_type": "llama",\n "hidden_size": }')
    text = _error(["model=llama", f"model.name_or_path={model_dir}"], ModelLoadError)
    assert f"{model_dir / 'config.json'} is not valid JSON (line 2 column" in text


def test_a_shard_the_index_lists_must_be_there_with_its_tensors(model_dir: Path) -> None:
    (model_dir / "model.safetensors").rename(model_dir / "model-00001-of-00002.safetensors")
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00001-of-00002.safetensors",
                            "c": "model-00002-of-00002.safetensors"}}
    (model_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    assert "lists the shard model-00002-of-00002.safetensors, which is missing" in \
        _error(["model=llama", f"model.name_or_path={model_dir}"], ModelLoadError)
    _safetensors(model_dir / "model-00002-of-00002.safetensors", {"d": 2})
    assert "lacks 1 tensor(s) model.safetensors.index.json puts there (first: c)" in \
        _error(["model=llama", f"model.name_or_path={model_dir}"], ModelLoadError)
    _safetensors(model_dir / "model-00002-of-00002.safetensors", {"c": 2})
    check_overrides([*TINY, "model=llama", f"model.name_or_path={model_dir}"])  # the control: every shard whole


def test_a_folder_needs_a_config_and_weights_and_a_missing_one_is_named(model_dir: Path, tmp_path: Path) -> None:
    assert _error(["model.name_or_path=/nonexistent"], ModelLoadError) == \
        "model.name_or_path=/nonexistent: no such folder (a hub id reads org/name)"
    (model_dir / "model.safetensors").unlink()
    assert "no model weights in" in _error(["model=llama", f"model.name_or_path={model_dir}"], ModelLoadError)
    (model_dir / "config.json").unlink()
    assert "no config.json in" in _error(["model=llama", f"model.name_or_path={model_dir}"], ModelLoadError)
    (model_dir / "m.gguf").write_bytes(b"GGUF" + bytes(8))  # a GGUF folder needs neither: its header is read instead
    assert "cannot read the config of model m: " in \
        _error(["model=llama", f"model.name_or_path={model_dir}", "model.gguf_file=m.gguf"], ModelLoadError)
    assert "model.gguf_file 'x.gguf' not found" in \
        _error(["model=llama", f"model.name_or_path={model_dir}", "model.gguf_file=x.gguf"], ModelLoadError)


def test_a_hub_id_passes_the_folder_checks_and_an_unreachable_one_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no network here: the hub answers at once that it cannot
    for name in ("gpt2", "HuggingFaceTB/SmolLM2-135M-Instruct", "org/name.v2"):
        assert is_hub_id(name)
        check_model_source(name, complete=True)
        assert f"cannot read the config of model {name} (not a local folder, and the hub cannot be reached" in \
            _error(["model=llama", f"model.name_or_path={name}"], ModelLoadError)
    for path in ("/nonexistent", "./here", "a/b/c", "~/models/x", "../x"):
        assert not is_hub_id(path)


def test_loading_runs_the_same_folder_check(model_dir: Path) -> None:
    from ftlab.models.loading import checkpoint_path

    weights = model_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4])
    cfg = OmegaConf.create({"kind": "pretrained", "name_or_path": str(model_dir), "gguf_file": None})
    with pytest.raises(ModelLoadError, match="is truncated"):
        checkpoint_path(cfg, model_dir.parent / "cache")


# -- compose, validate and the quick path apply the same checks -------------------------------------------------


def test_validate_applies_the_checks_to_a_config_built_any_way() -> None:
    cfg = compose(TINY)
    validate(cfg)
    OmegaConf.update(cfg, "data.batch_size", 0)
    with pytest.raises(ConfigError, match=r"^data.batch_size=0: expected an integer >= 1$"):
        validate(cfg)


def test_the_quick_check_needs_no_registry_and_refuses_what_compose_refuses() -> None:
    code = ("import sys; from ftlab.cli import main\n"
            "try:\n    main(['-m', 'model=tiny', 'trainer.max_steps=5,abc'])\nexcept SystemExit as e:\n    print(e.code)\n"
            "print('torch' in sys.modules, 'ftlab.registry' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.splitlines() == ["ftlab: error: trainer.max_steps=abc: expected an integer >= 1 (or -1: no limit)",
                                       "False False"], out.stderr[-2000:]
    with pytest.raises(ConfigError) as quick:
        quick_check(["eval.batch_size=0"])
    with pytest.raises(ConfigError) as composed:
        compose([*TINY, "eval.batch_size=0"])
    assert str(quick.value) == str(composed.value)


# -- declaring ranges ------------------------------------------------------------------------------------------


@dataclass
class _BadDefaultConfig(MethodConfig):
    rank: int = field(default=0, metadata={"help": "a rank", "min": 1})


@dataclass
class _BadMetadataConfig(MethodConfig):
    rank: int = field(default=4, metadata={"min": "one"})


class _BadDefault(BaseMethod):
    Config = _BadDefaultConfig

    def apply(self, model):
        return model


class _BadMetadata(_BadDefault):
    Config = _BadMetadataConfig


def test_a_plugins_declared_range_is_checked_when_it_registers() -> None:
    eps = [metadata.EntryPoint(name, f"{__name__}:{cls}", ENTRY_POINT_GROUP)
           for name, cls in (("baddefault", "_BadDefault"), ("badmeta", "_BadMetadata"))]
    registry = discover(eps)
    assert not registry.methods
    assert "the default of _BadDefaultConfig.rank (0) is outside its declared range: expected an integer >= 1" \
        in registry.broken["baddefault"]
    assert "_BadMetadataConfig.rank: metadata 'min' must be a number, got 'one'" in registry.broken["badmeta"]


def test_a_spec_describes_itself() -> None:
    assert Spec(int, min=1, also=((-1, "no limit"),)).expected() == "an integer >= 1 (or -1: no limit)"
    assert Spec(typing.Optional[float], gt=0, max=1).expected() == "a number in (0, 1] or null"
    assert Spec(str, choices=("a", "b")).expected() == "one of: a | b"
    assert Spec(list[str]).expected() == "a list of strings"
    assert Spec(bool).problem(1) == "true or false" and Spec(bool).problem(True) is None
    assert Spec(float, min=0).problem(float("nan")) == "a number >= 0"
    assert Spec(int).problem(2.0) == "an integer"


# -- the schema agrees with what it describes ------------------------------------------------------------------


def test_precisions_are_lightnings() -> None:
    import pytorch_lightning as pl

    from ftlab.schema import LIGHTNING_PRECISIONS

    hint = typing.get_type_hints(pl.Trainer.__init__)["precision"]
    accepted = {a for m in typing.get_args(hint) for a in typing.get_args(m)}
    assert set(LIGHTNING_PRECISIONS) == accepted


def test_names_the_schema_repeats_match_their_sources() -> None:
    from ftlab.models import quant
    from ftlab.schema import DTYPE_NAMES, QUANT_NAMES

    assert DTYPE_NAMES == tuple(quant.DTYPES) and QUANT_NAMES == quant.QUANT_NAMES
    assert {o.stem for o in (Path(__file__).parents[1] / "ftlab" / "conf" / "quantization").glob("*.yaml")} == \
        set(QUANT_NAMES)


def test_data_ranges_agree_with_the_data_layers_own_check() -> None:
    from ftlab.data.schema import DataConfig

    for name, bad, good in [("val_ratio", 1.0, 0.0), ("limit", 0, 1), ("max_length", 0, 1), ("max_tokens", 0, 1),
                            ("format", "csv", "auto"), ("synthetic", "books", "topics")]:
        spec = spec_of(DataConfig, name)
        assert spec.problem(bad) and spec.problem(good) is None, name
        with pytest.raises(FtlabError):
            DataConfig.from_any({name: bad})
        DataConfig.from_any({name: good})
    assert set(RANGES[DataConfig]) <= {f for f in DataConfig.__dataclass_fields__}


@pytest.mark.parametrize("group", ["trainer", "model", "quantization", "scheduler", "eval", "data"])
def test_every_shipped_key_of_a_group_with_a_schema_has_a_spec(group: str) -> None:
    """A key added to one of these groups' YAML needs its type (and range) in ftlab.schema."""
    prefix = group + "."
    keys = [k for k in inventory().keys if k.startswith(prefix) and not k.rpartition(".")[2].startswith("_")]
    missing = [k for k in keys if k.count(".") == 1 and spec_at(k) is None]
    assert missing == []
    assert all(spec_at(k) is not None for k in ("trainer.max_steps", "model.kind", "data.prepare.missing"))
    assert RunConfig.__dataclass_fields__[group]


# -- the command line ------------------------------------------------------------------------------------------


def test_the_command_line_refuses_bad_values_in_one_line_before_hydra_makes_a_folder(tmp_path: Path) -> None:
    probes = [("trainer.max_steps=abc", "ftlab: error: trainer.max_steps=abc: expected an integer >= 1"),
              ("data.batch_size=0", "ftlab: error: data.batch_size=0: expected an integer >= 1"),
              ("model.name_or_path=/nonexistent", "ftlab: error: model.name_or_path=/nonexistent: no such folder"),
              ("trainer.max_stpes=3", "ftlab: error: trainer.max_stpes: no such key; did you mean trainer.max_steps?")]
    env = {**os.environ, "FTLAB_CACHE": str(tmp_path / "cache")}
    for bad, message in probes:
        start = time.perf_counter()
        out = subprocess.run([sys.executable, "-m", "ftlab", "model=tiny", "trainer.max_steps=2", bad],
                             capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env)
        took = time.perf_counter() - start
        assert out.returncode == 1, out.stderr[-2000:]
        assert "Traceback" not in out.stderr
        errors = [line for line in out.stderr.splitlines() if line.startswith("ftlab: error:")]
        assert len(errors) == 1 and errors[0].startswith(message), out.stderr[-2000:]
        assert not (tmp_path / "outputs").exists() and not (tmp_path / "cache").exists()
        assert took < 5, f"{bad}: {took:.1f} s"


@pytest.mark.slow
def test_the_command_line_refuses_a_bad_method_value_and_a_bad_sweep_value(tmp_path: Path) -> None:
    for args in (["method.lr=-1"], ["-m", "method=lora,qlora", "quantization=none"], ["-m", "method.r=8,0"]):
        out = subprocess.run([sys.executable, "-m", "ftlab", *args, "model=tiny"], capture_output=True, text=True,
                             timeout=300, cwd=tmp_path)
        assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-2000:]
        assert len([line for line in out.stderr.splitlines() if line.startswith("ftlab: error:")]) == 1
        assert not (tmp_path / "outputs").exists()
