"""Library code never imports the training script.

``ftlab/train.py`` is the run (Trainer, callbacks, the run record, Hydra's task function); what
``ftlab eval``, ``ftlab export``, ``ftlab methods --sizes`` and the method contract share with it
lives in ``ftlab.build``. Two checks keep it that way: importing any library module in a fresh
interpreter must not bring ``ftlab.train`` into ``sys.modules``, and no library module may name
it in an import statement anywhere, a function body included (the imports this layout replaced
were all inside functions, where the first check cannot see them). Only the entry points, the
CLI and ``python -m ftlab``, may import the training script.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import pkgutil
import subprocess
import sys
from pathlib import Path
from typing import Iterable, Sequence

import pytest

import ftlab

TRAINING_SCRIPT = "ftlab.train"
# they run training; they may import it (ftlab.models.support runs the support matrix's cells)
ENTRY_POINTS = frozenset({"ftlab.train", "ftlab.cli", "ftlab.__main__", "ftlab.models.support"})

# Imports each module in turn in one interpreter; after a module brought the forbidden one in,
# everything it brought in from the checked packages is forgotten again, so a later module that
# reaches the forbidden one (through the same chain or another) is reported too. Third-party
# packages stay imported: one interpreter pays for torch, transformers and Lightning once.
_IMPORTER = r"""
import importlib, json, sys, traceback

forbidden, names = sys.argv[1], json.loads(sys.stdin.read())
packages = {n.split(".")[0] for n in names} | {forbidden.split(".")[0]}
pulled, errors = [], {}
for name in names:
    before = set(sys.modules)
    try:
        importlib.import_module(name)
    except BaseException:
        errors[name] = traceback.format_exc(limit=3)
    if forbidden in sys.modules:
        pulled.append(name)
        for key in set(sys.modules) - before:
            if key.split(".")[0] in packages:
                del sys.modules[key]
print(json.dumps({"pulled": pulled, "errors": errors}))
"""


def library_modules() -> list[str]:
    """Every module of the ftlab package except the entry points."""
    names = [m.name for m in pkgutil.walk_packages(ftlab.__path__, "ftlab.")]
    return sorted(n for n in names if n not in ENTRY_POINTS)


def modules_importing_at_import_time(forbidden: str, names: Sequence[str],
                                     extra_path: Iterable[str | Path] = ()) -> list[str]:
    """The modules of ``names`` whose import, in a fresh interpreter, brings ``forbidden`` into
    ``sys.modules``. Raises when a module cannot be imported at all (nothing could be checked)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([*map(str, extra_path), *filter(None, [env.get("PYTHONPATH")])])
    proc = subprocess.run([sys.executable, "-c", _IMPORTER, forbidden], input=json.dumps(list(names)),
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if result["errors"]:
        raise AssertionError("modules that could not be imported:\n" + "\n".join(
            f"{name}:\n{tb}" for name, tb in result["errors"].items()))
    return result["pulled"]


def imported_names(source: str, module: str, is_package: bool = False) -> set[str]:
    """Every module an import statement anywhere in ``source`` (the text of ``module``) names,
    relative imports resolved; ``from a import b`` counts as ``a`` and ``a.b``."""
    package = module if is_package else module.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                origin = ".".join([*base, node.module] if node.module else base)
            else:
                origin = node.module or ""
            names.add(origin)
            names.update(f"{origin}.{alias.name}" for alias in node.names)
    return names


def names_module(names: set[str], forbidden: str) -> bool:
    return any(n == forbidden or n.startswith(forbidden + ".") for n in names)


def test_no_library_module_imports_the_training_script_when_imported() -> None:
    modules = library_modules()
    assert "ftlab.build" in modules and "ftlab.evaluation.evaluate" in modules and "ftlab.methods.lora" in modules
    pulled = modules_importing_at_import_time(TRAINING_SCRIPT, modules)
    assert pulled == [], f"importing these brings in {TRAINING_SCRIPT}: {pulled}"


def test_no_library_module_names_the_training_script_in_an_import() -> None:
    offenders = []
    for name in library_modules():
        spec = importlib.util.find_spec(name)
        assert spec is not None and spec.origin is not None, name
        source = Path(spec.origin).read_text(encoding="utf-8")
        if names_module(imported_names(source, name, spec.submodule_search_locations is not None),
                        TRAINING_SCRIPT):
            offenders.append(name)
    assert offenders == [], f"these import {TRAINING_SCRIPT} (import from ftlab.build instead): {offenders}"


def test_the_import_time_check_reports_direct_and_indirect_importers(tmp_path: Path) -> None:
    pkg = tmp_path / "layout_probe"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "script.py").write_text("RUN = 1\n")
    (pkg / "bad.py").write_text("import layout_probe.script\n")
    (pkg / "indirect.py").write_text("from layout_probe import bad\n")
    (pkg / "good.py").write_text("import json\n")
    (pkg / "lazy.py").write_text("def f():\n    import layout_probe.script\n")
    names = ["layout_probe.bad", "layout_probe.good", "layout_probe.indirect", "layout_probe.lazy"]
    pulled = modules_importing_at_import_time("layout_probe.script", names, extra_path=[tmp_path])
    assert pulled == ["layout_probe.bad", "layout_probe.indirect"]  # the lazy import is the static check's


@pytest.mark.parametrize("source, module, expected", [
    ("from ftlab.train import load_base\n", "ftlab.evaluation.evaluate", True),
    ("def f():\n    from ftlab.train import task\n", "ftlab.evaluation.evaluate", True),
    ("import ftlab.train as t\n", "ftlab.evaluation.evaluate", True),
    ("from ftlab import train\n", "ftlab.evaluation.evaluate", True),
    ("class A:\n    def m(self):\n        from . import train\n", "ftlab.build", True),
    ("from .. import train\n", "ftlab.evaluation.evaluate", True),
    ("from . import train\n", "ftlab.evaluation.evaluate", False),  # ftlab.evaluation.train
    ("from ..train import fit\n", "ftlab.data.chat_masking", True),
    ("from ftlab.build import build\n", "ftlab.evaluation.evaluate", False),
    ("from ftlab import training_utils, build\n", "ftlab.evaluation.evaluate", False),
    ("from .train import x\n", "ftlab.data.chat_masking", False),  # ftlab.data.train, another module
])
def test_the_static_check_finds_every_spelling(source: str, module: str, expected: bool) -> None:
    assert names_module(imported_names(source, module), TRAINING_SCRIPT) is expected
