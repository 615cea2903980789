"""The example plugin imports only ftlab's public API, and docs/plugins.md names that API.

``PUBLIC_API`` is the list; docs/plugins.md states it in one sentence ("ftlab's public API for a
plugin is: ..."), and the two must name the same things. Every ``.py`` file of
``plugins/ftlab-lorafa`` (its package and its tests) is parsed and every import in it, anywhere
(a function body, a class, a conditional), must name a public module or a public name inside
one: ``from ftlab.config import compose`` is public, ``from ftlab.config import validate`` and
``import ftlab.config`` (which reaches all of it) are not. Imports by a literal string
(``importlib.import_module("ftlab.x")``, ``__import__``, ``pytest.importorskip``) count too.
"""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PLUGIN = ROOT / "plugins" / "ftlab-lorafa"
DOC = ROOT / "docs" / "plugins.md"

# A module (anything in it may be imported) or one name in a module (only that name).
PUBLIC_API = ("ftlab.method", "ftlab.peft_method", "ftlab.errors", "ftlab.testing", "ftlab.models.structure",
              "ftlab.config.compose")

_STRING_IMPORTERS = {"import_module", "__import__", "importorskip"}


def imported_names(source: str) -> list[tuple[int, str]]:
    """(line, dotted name) of everything an import anywhere in ``source`` brings in: ``import a.b``
    gives ``a.b``, ``from a import b`` gives ``a.b``, ``import_module("a.b")`` gives ``a.b``.
    Relative imports stay inside the plugin's own package and are left out."""
    names: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            names.extend((node.lineno, f"{node.module}.{alias.name}") for alias in node.names)
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if called in _STRING_IMPORTERS:
                names.append((node.lineno, node.args[0].value))
    return names


def is_public(name: str, public: tuple[str, ...] = PUBLIC_API) -> bool:
    return any(name == p or name.startswith(p + ".") for p in public)


def private_imports(files: list[Path], public: tuple[str, ...] = PUBLIC_API) -> list[str]:
    """``file:line name`` for every import of ftlab that is not in ``public``."""
    found = []
    for path in files:
        for line, name in imported_names(path.read_text(encoding="utf-8")):
            if (name == "ftlab" or name.startswith("ftlab.")) and not is_public(name, public):
                shown = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
                found.append(f"{shown}:{line} {name}")
    return found


def documented_public_api(text: str) -> set[str]:
    """The names in backticks in docs/plugins.md's sentence "ftlab's public API for a plugin is: ..."."""
    match = re.search(r"public API for a plugin is:(.*?)\.(?:\s|$)", text, re.S)
    assert match, "docs/plugins.md has no sentence \"ftlab's public API for a plugin is: ...\""
    return set(re.findall(r"`([^`]+)`", match.group(1)))


def plugin_files() -> list[Path]:
    return sorted(p for p in PLUGIN.rglob("*.py") if "egg-info" not in str(p))


def test_the_plugin_imports_only_the_public_api() -> None:
    files = plugin_files()
    assert PLUGIN / "src" / "ftlab_lorafa" / "__init__.py" in files
    assert PLUGIN / "tests" / "test_lora_fa.py" in files
    found = private_imports(files)
    assert found == [], (f"the example plugin imports ftlab beyond its public API {list(PUBLIC_API)} "
                         f"(docs/plugins.md): {found}")


def test_the_doc_names_the_same_public_api() -> None:
    assert documented_public_api(DOC.read_text(encoding="utf-8")) == set(PUBLIC_API)


@pytest.mark.parametrize("source, reported", [
    ("import ftlab.train\n", ["ftlab.train"]),
    ("from ftlab.models import load_model\n", ["ftlab.models.load_model"]),
    ("def f():\n    from ftlab.build import build\n", ["ftlab.build.build"]),
    ("class T:\n    def m(self):\n        import ftlab.registry as r\n", ["ftlab.registry"]),
    ("from ftlab import train, testing\n", ["ftlab.train"]),
    ("import ftlab\n", ["ftlab"]),
    ("import ftlab.config\n", ["ftlab.config"]),
    ("from ftlab.config import validate, compose\n", ["ftlab.config.validate"]),
    ("from ftlab.config import *\n", ["ftlab.config.*"]),
    ("import importlib\nm = importlib.import_module('ftlab.train')\n", ["ftlab.train"]),
    ("if True:\n    __import__('ftlab.models')\n", ["ftlab.models"]),
    # public: whole modules, a public module's names and submodules, and the one public name of ftlab.config
    ("from ftlab.method import MethodConfig\nimport ftlab.peft_method\nfrom ftlab import testing\n"
     "from ftlab.testing import *\nfrom ftlab.errors import ConfigError\nfrom ftlab.config import compose\n"
     "from ftlab.models.structure import decoder_blocks\n", []),
    ("from ftlab.models import structure, loading\n", ["ftlab.models.loading"]),  # a public submodule only
    # not ftlab at all, and relative imports inside the plugin's package
    ("import ftlabx\nfrom ftlab_lorafa import LoraFA\nfrom . import presets\nfrom .x import ftlab\n", []),
])
def test_the_checker_reports_every_spelling(tmp_path: Path, source: str, reported: list[str]) -> None:
    probe = tmp_path / "pkg" / "mod" / "probe.py"
    probe.parent.mkdir(parents=True)
    probe.write_text(source)
    assert [entry.rsplit(" ", 1)[1] for entry in private_imports([probe])] == reported


def test_the_doc_check_sees_a_missing_or_extra_name() -> None:
    sentence = "ftlab's public API for a plugin is: `ftlab.method`, `ftlab.testing` and `ftlab.config.compose`. More."
    assert documented_public_api(sentence) == {"ftlab.method", "ftlab.testing", "ftlab.config.compose"}
    assert documented_public_api(sentence) != set(PUBLIC_API)


@pytest.mark.parametrize("public, behind", [("ftlab.method", "ftlab.methods.base"),
                                            ("ftlab.peft_method", "ftlab.methods.peft_base")])
def test_public_names_re_export_everything_behind_them(public: str, behind: str) -> None:
    front, back = importlib.import_module(public), importlib.import_module(behind)
    assert sorted(front.__all__) == sorted(back.__all__)
    for name in back.__all__:
        assert getattr(front, name) is getattr(back, name), name
