"""ftlab's method contract (ftlab.testing) over every registered method and preset, built-in or
installed."""

from __future__ import annotations

from typing import Iterator, Mapping

import pytest

from ftlab.evaluation.rewards import registered_reward
from ftlab.registry import get_registry
from ftlab.testing import MethodContract

REGISTRY = get_registry()


def _starts_with_vowel(prompt: str, completion: str, record: Mapping) -> float:
    return float(completion[:1].lower() in "aeiou")


# What a method or preset needs to run at all: the linear probe trains a classification head only;
# GRPO and PPO need a reward the random tiny model can earn (with `exact` every reward is 0: no gradient).
PRESET_OVERRIDES = {
    "linear_probe": ("task=classification",),
    "grpo": ("method.reward=contract_vowel", "method.max_new_tokens=2", "method.num_generations=4"),
    "ppo": ("method.reward=contract_vowel", "method.max_new_tokens=2", "method.num_generations=4"),
}


@pytest.fixture(autouse=True, scope="module")
def _contract_reward() -> Iterator[None]:
    with registered_reward("contract_vowel", _starts_with_vowel):
        yield

for _name in sorted([*REGISTRY.methods, *REGISTRY.presets]):
    globals()[f"TestContract_{_name}"] = type(
        f"TestContract_{_name}", (MethodContract,), {"method": _name, "overrides": PRESET_OVERRIDES.get(_name, ())}
    )


def test_no_installed_method_or_preset_is_broken() -> None:
    assert not REGISTRY.broken, "broken plugins: " + "; ".join(f"{n}: {r}" for n, r in REGISTRY.broken.items())


def test_at_least_sixteen_methods_and_the_shipped_presets_are_registered() -> None:
    assert len(REGISTRY.methods) >= 16, sorted(REGISTRY.methods)
    assert {"dora", "rslora", "lora_r64", "lora_plus", "linear_probe"} <= set(REGISTRY.presets)
