"""bench/peers.py's loss-agreement check, on the tiny model: ftlab, TRL and the plain PEFT loop
trained on the same prepared batches agree at step 0 within the stated tolerance, and the check
fails when one of them is given other labels."""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest

pytest.importorskip("trl")

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

import _runners  # noqa: E402
import peers  # noqa: E402

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]  # three short training runs: CI, not the quick loop
STEPS = 2
SETTING = "lora-fp32-padded"


def shifted(data: dict) -> dict:
    """The same batches with every row's labels moved one token to the left (a classic off-by-one)."""
    batches = [[{**ex, "labels": ex["labels"][1:] + [_runners.IGNORE_INDEX]} for ex in batch]
               for batch in data["batches"]]
    return {**data, "batches": batches}


def test_tools_agree_and_a_shifted_tool_does_not(tmp_path: Path, cache_dir: Path) -> None:
    spec = _runners.Spec(tool="ftlab", setting=SETTING, batches_file=str(tmp_path / "batches.json"), model="tiny",
                         cache_dir=str(cache_dir), steps=STEPS, num_train=32)
    data = _runners.prepare_batches(spec, spec.batches_file)
    assert len(data["batches"]) == STEPS
    runs = {tool: _runners.run(replace(spec, tool=tool)) for tool in _runners.TOOLS}
    assert peers.agreement(runs, data["checksums"], "fp32", STEPS) == []
    step0 = [r["losses"][0] for r in runs.values()]
    assert max(step0) - min(step0) <= peers.STEP0_TOL["fp32"]

    bad_file = tmp_path / "shifted.json"
    bad_file.write_text(json.dumps(shifted(data)))
    runs["trl"] = _runners.run(replace(spec, tool="trl", batches_file=str(bad_file)))
    problems = peers.agreement(runs, data["checksums"], "fp32", STEPS)
    assert any("trl trained on other labels" in p for p in problems)
    assert any(p.startswith("trl loss at step 0") for p in problems)
