"""``ftlab export RUN_DIR --out DIR``: a run's model as a folder plain transformers/peft load.

Without ``--merge`` a PEFT method exports its adapter (``adapter_config.json`` +
``adapter_model.safetensors`` and the tokenizer), which ``peft.PeftModel.from_pretrained``
puts onto the base named in ``base_model_name_or_path``. That field is rewritten to the
absolute folder (or hub id) ftlab itself loaded the base from, ``models.checkpoint_path``:
for the default model the SmolLM2 safetensors folder converted into the cache, which is the
only form of those weights ``from_pretrained`` can read without a GGUF round trip.

With ``--merge`` the method folds what it trained into the base weights and a full model folder
is written (config, safetensors, tokenizer with its chat template, a generation config that
stops at the end of the assistant's turn). A quantized (QLoRA) base is dequantized for that,
because merging into 4/8-bit weights would round most of the update away. full and freeze
runs always export a model folder: their weights are the model. Prompt-learning methods have
nothing to merge and are refused with the method's reason.

Everything is written into a temporary sibling of ``--out`` and moved into place at the end, so
a crash never leaves a half export that looks whole. That folder is made before the model is
loaded, so an ``--out`` that cannot be written (permission denied, a read-only file system, a
file where a folder should be) is refused at once, and it is removed on every failure: a write
that fails part-way (no space left) ends in one ``ExportError`` naming the place and why, with
nothing left behind.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shlex
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import OmegaConf

from ftlab.errors import ExportError

if TYPE_CHECKING:
    from ftlab.methods.base import BaseMethod
    from ftlab.deploy.run_loading import FinishedRun, LoadedRun

__all__ = ["DTYPES", "EXPORT_INFO", "ExportError", "ExportResult", "export_run"]

log = logging.getLogger("ftlab")

DTYPES = ("float32", "bfloat16", "float16")
EXPORT_INFO = "ftlab_export.json"  # the model card's facts, machine-readable
CARD = "README.md"
ADAPTER_CONFIG = "adapter_config.json"
METRIC_KEYS = ("val_loss", "train_loss_first", "train_loss_last", "steps", "exact_match", "base_exact_match",
               "generation", "accuracy", "precision", "recall", "f1")


@dataclass
class ExportResult:
    out: Path
    format: str  # "peft-adapter" or "transformers-model"
    merged: bool
    dequantized: bool
    dtype: str | None
    base_model: str
    notes: list[str] = field(default_factory=list)


def _check_out(out: Path, run_dir: Path, force: bool) -> None:
    """Refuse to overwrite anything not asked for, and never the run being exported."""
    target, run = out.resolve(), run_dir.resolve()
    if target == run or target in run.parents:
        raise ExportError(f"--out {out} holds the run folder {run_dir} itself; export to another folder")
    if target.exists() and not target.is_dir():
        raise ExportError(f"--out {out} is a file; give a folder (new or empty, or an export to replace with --force)")
    if target.is_dir() and any(target.iterdir()) and not force:
        raise ExportError(f"--out {out} exists and is not empty; choose a new or empty folder, or give --force to replace it")


def _export_format(method: "BaseMethod", name: str, merge: bool) -> str:
    """What the method's run can be exported as: a PEFT adapter or a full model folder. The
    method instance decides, not its class: a setting can change what it saves (the preference
    methods' ``adapter=none`` saves a whole model)."""
    from ftlab.methods.peft_base import PeftMethod

    if merge:
        if method.cannot_merge:
            instead = ("export it without --merge, as a PEFT adapter" if isinstance(method, PeftMethod)
                       else "use its run folder with ftlab")
            raise ExportError(f"--merge: method '{name}' cannot be merged into the base weights: "
                              f"{method.cannot_merge} ({instead})")
        return "transformers-model"
    if isinstance(method, PeftMethod) and method.artifact != "model":
        return "peft-adapter"
    if method.artifact == "model":
        return "transformers-model"
    if method.cannot_merge:
        raise ExportError(f"method '{name}' saves its '{method.artifact}' in a format only ftlab reads (it is no PEFT "
                          f"tuner) and cannot be merged ({method.cannot_merge}); use its run folder with ftlab "
                          "(ftlab generate RUN_DIR, ftlab eval RUN_DIR)")
    raise ExportError(f"method '{name}' is no PEFT tuner, so its '{method.artifact}' is readable by ftlab only; "
                      "give --merge to export a full model folder that transformers loads")


def base_model_path(finished: "FinishedRun") -> str:
    """Where ``from_pretrained`` finds the run's base: an absolute folder, or a hub id as given."""
    from ftlab.models.loading import checkpoint_path

    path = checkpoint_path(finished.cfg.model, finished.cfg.paths.cache_dir)
    local = Path(str(path)).expanduser()
    return str(local.resolve()) if local.is_dir() else str(path)


def _write_adapter(loaded: "LoadedRun", folder: Path, base_model: str) -> str:
    """The method's own save, with the base it loads onto written in explicitly; the PEFT type."""
    loaded.method.save(loaded.model, folder)
    config_file = folder / ADAPTER_CONFIG
    config = json.loads(config_file.read_text())
    config["base_model_name_or_path"] = base_model
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return str(config.get("peft_type", "adapter"))


def _write_model(loaded: "LoadedRun", folder: Path, dtype: str | None, base_model: str) -> tuple[str, str]:
    """Merge (a no-op for methods that train the base), cast, save; (dtype after merge, dtype written)."""
    import torch

    from ftlab.evaluation.generation import stop_token_ids

    model = loaded.method.merge(loaded.model)
    merged_dtype = str(model.dtype).removeprefix("torch.")
    if dtype is not None and dtype != merged_dtype:
        model = model.to(getattr(torch, dtype))
    model.config._name_or_path = base_model
    config = getattr(model, "generation_config", None)
    if config is not None:  # stop where the chat template ends the assistant's turn, as ftlab does
        config.eos_token_id = stop_token_ids(loaded.tokenizer, model)
        config.pad_token_id = loaded.tokenizer.pad_token_id
    model.save_pretrained(folder, safe_serialization=True)
    return merged_dtype, str(model.dtype).removeprefix("torch.")


def _data_facts(finished: "FinishedRun") -> dict[str, Any]:
    from ftlab.data.cache import rows_fingerprint

    records = finished.datamodule.train_records
    data = finished.cfg.data
    return {
        "name": data.name,
        "path": data.get("path"),
        "val_path": data.get("val_path"),
        "mix": OmegaConf.to_container(data.mix, resolve=True) if data.get("mix") else [],
        "synthetic": data.get("synthetic"),
        "train_examples": len(records),
        "fingerprint": rows_fingerprint(records),
    }


def _metrics(run_dir: Path) -> dict[str, Any]:
    from ftlab.results import read_metrics

    try:
        record = read_metrics(run_dir)
    except (OSError, ValueError):
        return {}
    metrics = {k: record[k] for k in METRIC_KEYS if k in record}
    if "generation" in metrics:
        metrics["generation"] = {k: v for k, v in metrics["generation"].items() if k != "samples"}
    return metrics


def _bnb_settings(config: Any) -> dict[str, Any]:
    """The BitsAndBytesConfig arguments that rebuild the run's quantization, as JSON."""
    keep = ("load_in_4bit", "load_in_8bit", "bnb_4bit_quant_type", "bnb_4bit_use_double_quant",
            "bnb_4bit_compute_dtype", "llm_int8_skip_modules", "llm_int8_threshold")
    settings = config.to_dict()
    return {k: str(settings[k]).removeprefix("torch.") if k == "bnb_4bit_compute_dtype" else settings[k]
            for k in keep if k in settings}


def export_command(run_dir: Path, out: Path, merge: bool, dtype: str | None) -> str:
    parts = ["ftlab", "export", str(run_dir), "--out", str(out)]
    parts += ["--merge"] if merge else []
    parts += ["--dtype", dtype] if dtype else []
    return shlex.join(parts)


def _move_into_place(tmp: Path, out: Path) -> None:
    """Swap the finished export in; an old export (--force) is moved aside first, then removed,
    and put back if the new one cannot take its place."""
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        try:
            os.replace(out, old / out.name)
        except BaseException:
            shutil.rmtree(old, ignore_errors=True)
            raise
    try:
        os.replace(tmp, out)
    except BaseException:
        if old is not None:
            os.replace(old / out.name, out)
            shutil.rmtree(old, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


_WHY = {errno.EACCES: "permission denied", errno.EPERM: "permission denied",
        errno.EROFS: "the file system is read-only", errno.ENOSPC: "no space left on the device",
        errno.EDQUOT: "the disk quota is exceeded"}
# Writers in Rust (safetensors, tokenizers) report the OS error in their message only.
_WHY_IN_TEXT = {errno.ENOSPC: ("No space left on device", "os error 28"),
                errno.EDQUOT: ("Disk quota exceeded", "os error 122"),
                errno.EACCES: ("Permission denied", "os error 13"),
                errno.EROFS: ("Read-only file system", "os error 30")}


def _file_in_the_way(out: Path) -> Path | None:
    """The first part of ``out``'s path that exists and is not a folder (``--out file.txt/x``)."""
    return next((p for p in [*reversed(out.parents), out] if p.exists() and not p.is_dir()), None)


def _nearest_folder(out: Path) -> Path:
    """``out``'s parent, or the nearest ancestor of it that exists: where the write was refused."""
    return next((p for p in [out.parent, *out.parent.parents] if p.is_dir()), out.parent)


def _cannot_write(exc: BaseException, out: Path) -> ExportError | None:
    """The one-line error for ``exc`` when it means the export could not be written to ``out``
    (permission, space, a file in the way); None for anything else, which keeps its traceback."""
    code = exc.errno if isinstance(exc, OSError) else next(
        (c for c, needles in _WHY_IN_TEXT.items() if any(n in str(exc) for n in needles)), None)
    if isinstance(exc, OSError) and code in (errno.ENOTDIR, errno.EEXIST) and (blocker := _file_in_the_way(out)):
        return ExportError(f"cannot write the export to {out}: {blocker} is a file, not a folder; choose another --out")
    if code not in _WHY:
        return None
    filename = getattr(exc, "filename", None)
    folder = _nearest_folder(out)
    if filename and folder.resolve() not in [Path(filename).resolve(), *Path(filename).resolve().parents]:
        return None  # failed on something outside the export (e.g. reading the base model)
    if code in (errno.ENOSPC, errno.EDQUOT):
        return ExportError(f"cannot write the export to {out}: {_WHY[code]} holding {folder}; the partial export was"
                           " removed (free space there, or choose another --out)")
    return ExportError(f"cannot write the export to {out}: {_WHY[code]} in {folder} (choose an --out you can write to)")


def _make_temp(out: Path) -> Path:
    """The temporary sibling of ``out`` the export is written into (its parents created)."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    except OSError as exc:
        raise (_cannot_write(exc, out) or exc) from exc


def export_run(run_dir: str | Path, out: str | Path, merge: bool = False, dtype: str | None = None,
               force: bool = False, gguf: bool = False) -> ExportResult:
    """Export the run in ``run_dir`` to ``out`` (see the module docstring for what is written)."""
    from ftlab.registry import get_registry
    from ftlab.deploy.run_loading import open_run

    run_dir, out = Path(run_dir), Path(out)
    if dtype is not None and dtype not in DTYPES:
        raise ExportError(f"--dtype {dtype} is not valid; use one of: {', '.join(DTYPES)}")
    if gguf:
        from ftlab.deploy.gguf import check_gguf

        check_gguf()
    try:
        _check_out(out, run_dir, force)
    except OSError as exc:  # an --out that cannot even be looked at
        raise (_cannot_write(exc, out) or exc) from exc
    finished = open_run(run_dir)
    cfg = finished.cfg
    name = str(cfg.method.name)
    method = get_registry().get(name).cls(OmegaConf.to_object(cfg.method))
    fmt = _export_format(method, name, merge)
    if dtype is not None and fmt == "peft-adapter":
        raise ExportError("--dtype sets the dtype of full model weights (--merge, or a full/freeze run); "
                          "an adapter export keeps the adapter weights as they trained")
    if gguf and finished.task != "causal_lm":
        raise ExportError(f"--gguf writes causal language models for llama.cpp; a task={finished.task} run has none")
    if gguf and fmt == "peft-adapter":
        raise ExportError("--gguf writes full model weights for llama.cpp: add --merge (an adapter alone has no GGUF form here)")
    base_model = base_model_path(finished)
    tmp = _make_temp(out)  # before loading: a place that cannot be written is refused at once
    writing = False  # what fails before this is no failure to write the export
    try:
        loaded = finished.load()
        merged = merge and method.artifact != "model"  # full/freeze: the weights already are the model
        writing = True
        facts, notes = _write_weights(loaded, tmp, fmt, merged, dtype, base_model)
        if merge and not merged:
            notes.append(f"method {name} trains the base weights themselves: --merge had nothing to fold in")
        loaded.tokenizer.save_pretrained(tmp)
        facts.update(_facts(finished, loaded, base_model, out, merge, dtype))
        if gguf:
            from ftlab.deploy.gguf import write_gguf

            facts["gguf"] = write_gguf(tmp, out.name, base=base_model).name
            notes.append(f"wrote {facts['gguf']} (llama.cpp) beside the safetensors weights")
        _write_card(tmp, facts)
        _move_into_place(tmp, out)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        error = _cannot_write(exc, out) if writing and isinstance(exc, Exception) else None
        if error is not None:
            raise error from exc
        raise
    log.info("exported %s of run %s to %s", fmt, run_dir, out)
    return ExportResult(out, fmt, merged, bool(facts["dequantized"]), facts["dtype"], base_model, notes)


def _write_weights(loaded: "LoadedRun", folder: Path, fmt: str, merged: bool, dtype: str | None,
                   base_model: str) -> tuple[dict[str, Any], list[str]]:
    """The adapter or the (merged) model into ``folder``; the facts for the card and notes for the user."""
    quant = str(loaded.run.cfg.quantization.name)
    notes: list[str] = []
    facts: dict[str, Any] = {"format": fmt, "merged": merged, "dequantized": False, "dtype": None}
    if fmt == "peft-adapter":
        facts["peft_type"] = _write_adapter(loaded, folder, base_model)
        if quant != "none":
            from ftlab.models.quant import bnb_config

            facts["quantization_config"] = _bnb_settings(bnb_config(loaded.run.cfg.quantization))
            notes.append(f"trained on a {quant} base: load the base with the same BitsAndBytesConfig (see "
                         f"{CARD}) to reproduce the run's model exactly")
        return facts, notes
    merged_dtype, written = _write_model(loaded, folder, dtype, base_model)
    facts.update(dtype=written, dequantized=merged and quant != "none", dequantized_to=merged_dtype)
    if facts["dequantized"]:
        notes.append(f"merged into a dequantized base: the {quant} base weights were dequantized to "
                     f"{merged_dtype} and the adapter folded in; weights written in {written}")
    return facts, notes


def _write_card(folder: Path, facts: dict[str, Any]) -> None:
    """The model card and its facts as JSON; then every file readable by all (mkdtemp makes the
    folder owner-only, and an export is meant to be shared)."""
    from ftlab.deploy.model_card import model_card

    (folder / EXPORT_INFO).write_text(json.dumps(facts, indent=2, default=str) + "\n")
    (folder / CARD).write_text(model_card(facts))
    for path in [folder, *folder.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)


def _facts(finished: "FinishedRun", loaded: "LoadedRun", base_model: str, out: Path, merge: bool,
           dtype: str | None) -> dict[str, Any]:
    """What the card says beyond the weights: base, method, data, scores and commands."""
    from ftlab.deploy.run_loading import recorded_overrides
    from ftlab.models.architecture import model_label

    cfg = finished.cfg
    method_config = OmegaConf.to_container(cfg.method, resolve=True)
    return {
        "method": str(cfg.method.name),
        "method_config": method_config,
        "cannot_merge": loaded.method.cannot_merge,
        "base_name": model_label(cfg.model),
        "base_model": base_model,
        "quantization": str(cfg.quantization.name),
        "task": finished.task,
        "labels": finished.labels,
        "data": _data_facts(finished),
        "metrics": _metrics(finished.run_dir),
        "run_dir": str(finished.run_dir),
        "run_command": shlex.join(["python", "-m", "ftlab", *recorded_overrides(finished.run_dir)]),
        "export_command": export_command(finished.run_dir, out, merge, dtype),
        "out": str(out),
    }
