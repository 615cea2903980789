"""One error boundary: every exception class ftlab defines lives in ``ftlab.errors`` and is an
``FtlabError``, which the command line reports as one ``ftlab: error: ...`` line."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from pathlib import Path

import pytest

import ftlab
from ftlab import errors
from ftlab.errors import FtlabError


def _exception_classes(module) -> dict[str, type]:
    """The exception classes ``module`` itself defines (not those it imports)."""
    return {name: obj for name, obj in vars(module).items()
            if inspect.isclass(obj) and issubclass(obj, BaseException) and obj.__module__ == module.__name__}


def test_every_error_class_is_an_ftlab_error() -> None:
    classes = _exception_classes(errors)
    assert {"FtlabError", "ConfigError", "MethodError", "DataError", "ModelLoadError", "ExportError", "GgufError",
            "ChatError"} <= set(classes)
    assert issubclass(FtlabError, ValueError)  # callers that catch ValueError keep catching it
    for name, cls in classes.items():
        if cls is errors.Interrupted:  # the one ending that is not bad input: a signal's exit status
            assert issubclass(cls, SystemExit) and errors.Interrupted(15).code == 143
            continue
        assert issubclass(cls, FtlabError), f"ftlab.errors.{name} is no FtlabError"


def test_no_other_module_defines_an_exception_class() -> None:
    names = [m.name for m in pkgutil.walk_packages(ftlab.__path__, "ftlab.")]
    assert len(names) > 30 and "ftlab.data.sources" in names and "ftlab.methods.lora" in names
    elsewhere = {f"{name}.{cls}" for name in names if name != "ftlab.errors"
                 for cls in _exception_classes(importlib.import_module(name))}
    assert not elsewhere, f"exception classes outside ftlab.errors (move them there): {sorted(elsewhere)}"


@pytest.mark.parametrize("module,name", [
    ("ftlab.models.loading", "ModelLoadError"), ("ftlab.deploy.export", "ExportError"), ("ftlab.deploy.gguf", "GgufError"),
    ("ftlab.deploy.chat", "ChatError"), ("ftlab.data.sources", "DataError"), ("ftlab.registry", "MethodError"),
])
def test_old_import_locations_still_work(module: str, name: str) -> None:
    assert getattr(importlib.import_module(module), name) is getattr(errors, name)


def test_cli_reports_an_ftlab_error_of_any_command_as_one_line(tmp_path: Path) -> None:
    from ftlab.cli import main

    with pytest.raises(SystemExit) as exited:
        main(["eval", str(tmp_path)])
    assert str(exited.value.code).startswith(f"ftlab: error: {tmp_path}: not a run folder of ftlab")
    assert exited.value.__cause__ is None and exited.value.__suppress_context__


def test_help_lists_every_command_of_the_table() -> None:
    from omegaconf import OmegaConf

    from ftlab.cli import COMMANDS, usage
    from ftlab.config import CONF_DIR

    header = OmegaConf.create({"help": OmegaConf.load(CONF_DIR / "hydra" / "default.yaml").help}).help.header
    assert usage() in header  # the resolver ftlab.cli registers fills in the table's lines
    for name in COMMANDS:
        if name != "train":  # train is the default: its lines show python -m ftlab
            assert f"       ftlab {name}" in usage()
