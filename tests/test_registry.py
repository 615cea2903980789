"""The method registry: discovery through entry points, and its errors."""

from __future__ import annotations

import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

from ftlab.config import compose
from ftlab.data import augment
from ftlab.errors import ConfigError, DataError
from ftlab.evaluation import checkers
from ftlab.registry import ENTRY_POINT_GROUP, PRESET_GROUP, MethodError, Registry, discover, get_registry

BUILTIN = {"full", "freeze", "lora", "qlora"}


def _builtin_eps() -> list[metadata.EntryPoint]:
    return [ep for ep in metadata.entry_points(group=ENTRY_POINT_GROUP) if ep.name in BUILTIN]


def test_builtin_methods_come_through_entry_points() -> None:
    registry = get_registry()
    assert BUILTIN <= set(registry.methods)
    for name in BUILTIN:
        assert registry.methods[name].package == "ftlab"


def test_unknown_method_lists_installed_methods() -> None:
    with pytest.raises(MethodError) as error:
        compose(["method=nope"])
    text = str(error.value)
    installed = text.removeprefix("unknown method 'nope'. Installed methods: ").split(". Presets: ")[0].split(", ")
    assert text.startswith("unknown method 'nope'. Installed methods: ") and installed == sorted(installed)
    assert {"adalora", "adapter", "freeze", "full", "ia3", "lora", "qlora", "vera", "dpo", "grpo"} <= set(installed)
    assert text.split(". Presets: ")[1].rstrip(".").split(", ")[:1] == ["dora"] and "rslora" in text


def test_bad_field_names_field_and_valid_fields() -> None:
    with pytest.raises(MethodError) as err:
        compose(["method=lora", "method.rr=8"])
    assert "method 'lora' has no field 'rr'" in str(err.value)
    assert "Valid fields: lr, r, alpha, dropout, target_modules, rslora, dora" in str(err.value)


def test_bad_field_checked_for_every_swept_method() -> None:
    with pytest.raises(MethodError, match="method 'freeze' has no field 'r'"):
        compose(["method=lora,freeze", "method.r=4"])


def test_broken_plugin_is_reported_and_others_still_work() -> None:
    broken = metadata.EntryPoint(name="broken", value="ftlab_no_such_module:Method", group=ENTRY_POINT_GROUP)
    registry = discover([*_builtin_eps(), broken])
    assert set(registry.methods) == BUILTIN
    assert "ftlab_no_such_module" in registry.broken["broken"]
    assert "ModuleNotFoundError" in registry.broken["broken"]
    with pytest.raises(MethodError, match="method 'broken' is installed but could not be loaded: .*ModuleNotFoundError"):
        registry.get("broken")


def test_plugin_breaking_the_contract_is_rejected() -> None:
    not_a_method = metadata.EntryPoint(name="notmethod", value="ftlab.config:compose", group=ENTRY_POINT_GROUP)
    bad_name = metadata.EntryPoint(name="Bad-Name", value="ftlab.methods.full:Full", group=ENTRY_POINT_GROUP)
    registry = discover([not_a_method, bad_name])
    assert not registry.methods
    assert "must point at a method class" in registry.broken["notmethod"]
    assert "must be lowercase" in registry.broken["Bad-Name"]


def _fake_distribution(tmp_path: Path) -> Path:
    """An installed distribution (a .dist-info on sys.path) whose method fails to import."""
    site = tmp_path / "site"
    info = site / "ftlab_broken_plugin-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: ftlab-broken-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\nbrokenmethod = ftlab_broken_plugin:Method\n")
    (site / "ftlab_broken_plugin.py").write_text("import not_installed_dependency\n")
    return site


def test_cli_methods_reports_broken_installed_plugin(tmp_path: Path) -> None:
    site = _fake_distribution(tmp_path)
    env = {"PYTHONPATH": str(site), "COLUMNS": "200", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-m", "ftlab", "methods"], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "broken plugin brokenmethod" in out.stdout
    assert "No module named 'not_installed_dependency'" in out.stdout
    for name in BUILTIN:
        assert name in out.stdout


def test_cli_bad_field_exits_with_message(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "ftlab", "method=lora", "method.rr=8", f"hydra.run.dir={tmp_path}"],
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode != 0
    assert "ftlab: error: method 'lora' has no field 'rr'. Valid fields: lr, r, alpha" in out.stderr


def test_cli_cfg_job_prints_composed_config() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "ftlab", "--cfg", "job", "method=qlora", "model=tiny"],
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "name: qlora" in out.stdout and "bnb_4bit_quant_type: nf4" in out.stdout
    assert "_target_: bitsandbytes.optim.PagedAdamW8bit" in out.stdout


def _preset_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, files: dict[str, str]) -> metadata.EntryPoint:
    package = tmp_path / "my_presets"
    package.mkdir()
    (package / "__init__.py").write_text("")
    for name, text in files.items():
        (package / name).write_text(text)
    monkeypatch.syspath_prepend(str(tmp_path))
    return metadata.EntryPoint(name="mine", value="my_presets", group=PRESET_GROUP)


def test_builtin_presets_start_from_lora_and_compose() -> None:
    registry = get_registry()
    assert {"lora_r64", "dora", "rslora"} <= set(registry.presets)
    assert registry.presets["lora_r64"].base == "lora" and registry.presets["lora_r64"].package == "ftlab"
    cfg = compose(["method=lora_r64", "method.alpha=8"])  # the command line wins over the preset
    assert (cfg.method.name, cfg.method.r, cfg.method.alpha, cfg.method.dropout) == ("lora", 64, 8, 0.05)
    assert compose(["method=dora"]).method.dora is True


def test_preset_fields_are_checked_against_its_method() -> None:
    with pytest.raises(MethodError, match="method 'dora' has no field 'rr'. Valid fields: lr, r, alpha"):
        compose(["method=dora", "method.rr=8"])


def test_plugin_preset_package_is_discovered(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ep = _preset_package(tmp_path, monkeypatch, {
        "lora_tiny_rank.yaml": "# LoRA with rank 2.\ndefaults:\n  - lora\nr: 2\n",
        "bad_field.yaml": "defaults:\n  - lora\nrr: 2\n",
        "bad_base.yaml": "defaults:\n  - nothing_here\nr: 2\n",
        "full.yaml": "defaults:\n  - lora\n",
    })
    registry = discover(_builtin_eps(), [ep])
    preset = registry.presets["lora_tiny_rank"]
    assert (preset.base, preset.values, preset.summary) == ("lora", {"r": 2}, "LoRA with rank 2.")
    assert registry.get("lora_tiny_rank").name == "lora"
    assert "'rr' is not a field of method 'lora'. Valid fields: lr, r," in registry.broken["bad_field"]
    assert "bad_field.yaml" in registry.broken["bad_field"]
    assert "must start with the registered method it extends" in registry.broken["bad_base"]
    assert "got 'nothing_here'" in registry.broken["bad_base"]
    assert "has the name of an installed method" in registry.broken["full"]
    assert set(registry.methods) == BUILTIN  # broken presets leave the methods alone


def test_preset_package_that_does_not_import_is_reported(tmp_path: Path) -> None:
    ep = metadata.EntryPoint(name="gone", value="no_such_presets_pkg", group=PRESET_GROUP)
    registry = discover(_builtin_eps(), [ep])
    assert "ModuleNotFoundError" in registry.broken["presets:gone"]
    assert set(registry.methods) == BUILTIN


# -- the lookup every plugin group shares (methods, checkers, augmentations) ---------------------

GONE = "ModuleNotFoundError: No module named 'ftlab_no_such_module'"
GROUPS = {  # kind: (discovery, entry-point group, a working entry point, the error a lookup raises)
    "method": (discover, ENTRY_POINT_GROUP, "ftlab.methods.full:Full", MethodError),
    "checker": (checkers.discover_checkers, checkers.ENTRY_POINT_GROUP, "ftlab.evaluation.checkers:exact", ConfigError),
    "augmentation": (augment.discover_augmentations, augment.ENTRY_POINT_GROUP, "ftlab.data.augment:typos", DataError),
}


@pytest.mark.parametrize("kind", list(GROUPS))
def test_every_plugin_group_discovers_and_looks_up_names_the_same_way(kind: str) -> None:
    find, group, good, error = GROUPS[kind]
    eps = [
        metadata.EntryPoint("twice", good, group),
        metadata.EntryPoint("gone", "ftlab_no_such_module:thing", group),
        metadata.EntryPoint("zgood", good, group),
        metadata.EntryPoint("twice", good, group),
    ]
    found = find(eps)

    assert list(found.found) == ["zgood"]  # the duplicate name is unusable, the import error too
    assert found.broken == {
        "gone": f"ftlab_no_such_module:thing: {GONE}",
        "twice": f"duplicate {kind} name 'twice' (from {good})",
    }
    assert found.get("zgood") is found.found["zgood"]
    with pytest.raises(error) as err:
        found.get("gone")
    assert type(err.value) is error
    assert str(err.value) == f"{kind} 'gone' is installed but could not be loaded: ftlab_no_such_module:thing: {GONE}"
    with pytest.raises(error) as err:
        found.get("nope")
    assert type(err.value) is error
    assert str(err.value) == (
        f"unknown {kind} 'nope'. Installed {kind}s: zgood. Broken plugins: gone (ftlab_no_such_module:thing: {GONE}); "
        f"twice (duplicate {kind} name 'twice' (from {good}))"
    )


def test_a_plugin_rejected_by_its_groups_validation_says_why_without_a_traceback_class() -> None:
    registry = discover([metadata.EntryPoint("notmethod", "ftlab.config:compose", ENTRY_POINT_GROUP)])
    assert registry.broken["notmethod"].startswith("ftlab.config:compose: 'notmethod' must point at a method class")
    found = checkers.discover_checkers([metadata.EntryPoint("constant", "ftlab.errors:__doc__", checkers.ENTRY_POINT_GROUP)])
    assert found.broken["constant"].startswith("ftlab.errors:__doc__: not callable (got str '")


def test_method_lookup_lists_presets_between_methods_and_broken_plugins() -> None:
    installed = get_registry()
    registry = Registry(found={"lora": installed.methods["lora"]}, broken={"gone": "why"})
    registry.presets["lora_r64"] = installed.presets["lora_r64"]
    with pytest.raises(MethodError, match=r"^unknown method 'nope'\. Installed methods: lora\. Presets: lora_r64\. "
                                          r"Broken plugins: gone \(why\)$"):
        registry.get("nope")
    assert registry.get("lora_r64") is registry.methods["lora"]  # a preset selects the method it starts from
