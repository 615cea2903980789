"""ftlab's method contract (ftlab.testing) over every registered method, built-in or installed."""

from __future__ import annotations

from ftlab.registry import get_registry
from ftlab.testing import MethodContract

REGISTRY = get_registry()

for _name in sorted(REGISTRY.methods):
    globals()[f"TestContract_{_name}"] = type(f"TestContract_{_name}", (MethodContract,), {"method": _name})


def test_no_installed_method_or_preset_is_broken() -> None:
    assert not REGISTRY.broken, "broken plugins: " + "; ".join(f"{n}: {r}" for n, r in REGISTRY.broken.items())


def test_at_least_sixteen_methods_are_registered() -> None:
    assert len(REGISTRY.methods) >= 16, sorted(REGISTRY.methods)
