"""Sweep comparison: every job's ``metrics.json`` -> ``results.csv``, ``comparison.md``, ``comparison.png``.

Jobs are grouped by what was swept (the overrides that differ between jobs, seeds excluded),
so ``-m method=full,lora seed=0,1,2`` gives one row per method with mean and spread over seeds.
Columns that only some runs measure (exact match, classification metrics, preference accuracy of
the base and the fine-tuned model, a reward model's accuracy) are shown when a run has them.
"""

from __future__ import annotations

import csv
import io
import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from ftlab.cache import atomic_write, atomic_write_text
from ftlab.results import METRICS_FILE

IGNORED_KEYS = ("seed", "resume", "hydra.")  # never define a group: seeds are what we average over
COLUMNS = [
    "job", "method", "model", "seed", "status", "val_loss", "base_exact_match", "exact_match", "accuracy",
    "precision", "recall", "f1", "base_preference_accuracy", "preference_accuracy", "reward_accuracy",
    "reward_margin", "base_mean_reward", "mean_reward", "val_rewards_accuracy", "val_rewards_margin", "train_loss_first", "train_loss_last",
    "trainable_params", "total_params", "artifact_mb", "peak_rss_mb", "peak_anon_mb", "peak_file_mb", "tokens_per_s", "wall_s", "steps",
    "train_tokens", "world_size", "global_batch_size", "overrides", "error", "run_dir",
]
# (column, label, format) of the aggregated table
SUMMARY = [
    ("val_loss", "val loss", "{:.4f}"),
    ("base_exact_match", "base exact match", "{:.3f}"),
    ("exact_match", "exact match", "{:.3f}"),
    ("accuracy", "accuracy", "{:.3f}"),
    ("precision", "macro precision", "{:.3f}"),
    ("recall", "macro recall", "{:.3f}"),
    ("f1", "macro F1", "{:.3f}"),
    ("base_preference_accuracy", "base preference acc", "{:.3f}"),
    ("preference_accuracy", "preference acc", "{:.3f}"),
    ("reward_accuracy", "reward acc", "{:.3f}"),
    ("base_mean_reward", "base mean reward", "{:.3f}"),
    ("mean_reward", "mean reward", "{:.3f}"),
    ("trainable_params", "trainable params", "{:,.0f}"),
    ("artifact_mb", "saved MB", "{:.1f}"),
    ("peak_rss_mb", "peak RSS MB", "{:,.0f}"),
    ("peak_anon_mb", "allocated MB", "{:,.0f}"),  # RSS less touched pages of mapped weight files
    ("tokens_per_s", "tokens/s", "{:,.0f}"),
    ("wall_s", "wall s", "{:.1f}"),
]


@dataclass
class Group:
    label: str
    rows: list[dict[str, Any]] = field(default_factory=list)

    def values(self, key: str) -> list[float]:
        return [float(r[key]) for r in self.rows if r.get("status") == "completed" and r.get(key) is not None]

    def cell(self, key: str, fmt: str) -> str:
        values = self.values(key)
        if not values:
            return "-"
        mean = fmt.format(statistics.fmean(values))
        return mean if len(values) < 2 else f"{mean} ± {fmt.format(statistics.stdev(values))}"

    def count(self, status: str) -> int:
        return sum(1 for r in self.rows if r.get("status") == status)


def load_runs(sweep_dirs: Iterable[str | Path]) -> list[dict[str, Any]]:
    """Every job record under the sweep folders, in job-number order (not glob order), and a row
    for each job that did not finish: ``killed`` (a record left ``running`` by a process that is
    gone, or a job folder without a record) and ``not run`` (a job of the sweep's grid with no folder)."""
    rows: list[dict[str, Any]] = []
    for sweep in map(Path, sweep_dirs):
        if not sweep.is_dir():
            raise FileNotFoundError(f"{sweep}: no such sweep folder")
        found = [_record(p.parent) for p in sweep.glob(f"*/{METRICS_FILE}")]
        found += [{"status": "killed", "error": "no run record: the job was stopped before it started training",
                   "overrides": _job_overrides(d), "run_dir": str(d)}
                  for d in sweep.iterdir() if (d / ".hydra").is_dir() and not (d / METRICS_FILE).is_file()]
        if (sweep / METRICS_FILE).is_file():  # a single run's folder
            found.append(_record(sweep))
        jobs = expected_jobs(sweep)
        found += not_run(jobs, found)
        keys = {o.split("=", 1)[0] for job in jobs for o in job}
        for row in found if keys else []:  # a grid sweep: its rows are told apart by its swept keys only
            row["swept_keys"] = sorted(keys)
        found.sort(key=lambda r: (r.get("job_num") is None, r.get("job_num") or 0, r.get("run_dir") or ""))
        rows.extend(found)
    return rows


def _record(folder: Path) -> dict[str, Any]:
    from ftlab.locks import is_held

    row = json.loads((folder / METRICS_FILE).read_text()) | {"run_dir": str(folder)}
    if row.get("status") == "running" and not is_held(folder):
        row["status"] = "killed"
        row.setdefault("error", "the process ended without recording how (SIGKILL, out of memory, power loss)")
    return row


def _job_overrides(folder: Path) -> list[str]:
    from omegaconf import OmegaConf

    try:
        return [str(o) for o in OmegaConf.load(folder / ".hydra" / "overrides.yaml")]
    except (OSError, ValueError):
        return []


def expected_jobs(sweep: Path) -> list[list[str]]:
    """The jobs a grid sweep (Hydra's basic sweeper) was asked for, each as its swept
    ``key=value`` overrides, from the sweep's ``multirun.yaml``; [] for other sweepers (Optuna
    decides its trials as it goes) or a folder without one."""
    import itertools

    from omegaconf import OmegaConf

    from ftlab.overrides import parse

    config = Path(sweep) / "multirun.yaml"
    if not config.is_file():
        return []
    hydra = OmegaConf.load(config).hydra
    if not str(hydra.sweeper.get("_target_", "")).endswith("BasicSweeper"):
        return []
    lines = [str(o) for o in hydra.overrides.task]
    params = hydra.sweeper.get("params") or {}
    lines += [f"{key}={value}" for key, value in params.items()]
    swept = [o for o in parse(lines) if o.is_sweep_override()]
    choices = [[f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()] for o in swept]
    return [list(combo) for combo in itertools.product(*choices)] if choices else []


def not_run(jobs: Sequence[Sequence[str]], rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """A ``not run`` row for each of ``jobs`` (a sweep's grid, ``expected_jobs``) that no row
    (record or job folder) holds."""
    held = [set(r.get("overrides") or []) for r in rows]
    return [{"status": "not run", "overrides": job, "seed": _seed(job), "error": "no job folder: the sweep stopped before this job"}
            for job in jobs if not any(set(job) <= h for h in held)]


def _seed(overrides: Sequence[str]) -> Any:
    values = [o.split("=", 1)[1] for o in overrides if o.startswith("seed=")]
    return int(values[0]) if values and values[0].lstrip("-").isdigit() else None


def _swept(row: dict[str, Any]) -> list[str]:
    keys = row.get("swept_keys")
    overrides = [o for o in row.get("overrides") or [] if not o.startswith(IGNORED_KEYS)]
    return [o for o in overrides if o.split("=", 1)[0] in keys] if keys else overrides


def _common(rows: Sequence[dict[str, Any]], overrides: Any) -> set[str]:
    """The overrides every recorded job shares (not-run rows hold their swept values only)."""
    recorded = [r for r in rows if r.get("status") != "not run"] or list(rows)
    return set.intersection(*(set(overrides(r)) for r in recorded)) if recorded else set()


def group_runs(rows: Sequence[dict[str, Any]]) -> list[Group]:
    """Group jobs by the overrides that vary between them (common ones would only add noise)."""
    common = set() if any(r.get("swept_keys") for r in rows) else _common(rows, _swept)
    groups: dict[str, Group] = {}
    for row in rows:
        label = " ".join(o for o in _swept(row) if o not in common) or str(row.get("method"))
        groups.setdefault(label, Group(label)).rows.append(row)
    return list(groups.values())


def budget(rows: Sequence[dict[str, Any]]) -> str:
    """The training budget every job got, so a reader knows the comparison was like for like."""
    steps = sorted({r.get("max_steps") for r in rows if r.get("max_steps") is not None})
    tokens = [r["train_tokens"] for r in rows if r.get("train_tokens")]
    text = f"max_steps={', '.join(map(str, steps)) or '?'}"
    batches = sorted({r["global_batch_size"] for r in rows if r.get("global_batch_size")})
    if batches:  # examples per optimizer step over every rank: jobs on other world sizes stay comparable
        text += f", global batch {', '.join(map(str, batches))}"
    if tokens:
        text += f", training tokens per job {min(tokens):,}–{max(tokens):,}" if min(tokens) != max(tokens) else f", {tokens[0]:,} training tokens per job"
    return text


UNFINISHED = ("pruned", "diverged", "interrupted", "killed", "not run")  # shown when some run ended so
OPTIONAL = {"base_exact_match", "exact_match", "accuracy", "precision", "recall", "f1", "base_preference_accuracy",
            "preference_accuracy", "reward_accuracy", "base_mean_reward", "mean_reward"}  # shown when measured


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    groups = group_runs(rows)
    summary = [c for c in SUMMARY if c[0] not in OPTIONAL or any(g.values(c[0]) for g in groups)]
    higher = [label for key, label, _ in summary if key in OPTIONAL]
    statuses = ["completed", "failed"] + [s for s in UNFINISHED if any(r.get("status") == s for r in rows)]
    seeds = sorted({r.get("seed") for r in rows}, key=str)
    models = list(dict.fromkeys(str(r["model"]) for r in rows if r.get("model")))
    by_model = len(models) > 1  # a sweep over models shows each group's model; one model is said once
    lines = [
        f"# Comparison of {len(rows)} runs",
        "",
        (f"Model: {models[0]}. " if len(models) == 1 else "")
        + f"Budget: {budget(rows)}. Seeds: {', '.join(map(str, seeds))}. Cells: mean ± std over completed runs.",
        "Lower val loss is better." + (f" Higher {', '.join(higher)} is better." if higher else "")
        + (" The val loss of an RL method (grpo, ppo) is a surrogate near 0: compare those by mean reward."
           if any(key == "mean_reward" for key, _, _ in summary) else ""),
        "",
        "| run | " + ("model | " if by_model else "") + " | ".join(statuses + [label for _, label, _ in summary]) + " |",
        "|---|" + "---|" * (len(statuses) + len(summary) + by_model),
    ]
    for g in groups:
        cells = [g.cell(key, fmt) for key, _, fmt in summary]
        model = (", ".join(dict.fromkeys(str(r.get("model") or "-") for r in g.rows)) + " | ") if by_model else ""
        lines.append(f"| {g.label} | {model}" + " | ".join([str(g.count(s)) for s in statuses] + cells) + " |")
    failed = [r for r in rows if r.get("status") in ("failed", "diverged")]
    if failed:
        lines += ["", "Failed runs:", ""]
        lines += [f"- {r['run_dir']}: {r.get('error', '?')}" for r in failed]
    unfinished = [r for r in rows if r.get("status") in ("interrupted", "killed", "not run")]
    if unfinished:
        lines += ["", "Did not finish (run the sweep's command again with resume=true to finish them):", ""]
        lines += [f"- {r['status']}: {_job_label(r, rows)}" + _where(r) for r in unfinished]
    return "\n".join(lines) + "\n"


def _job_label(row: dict[str, Any], rows: Sequence[dict[str, Any]]) -> str:
    """The overrides that set this job apart, seed included (a grid sweep's swept values)."""
    def own(r: dict[str, Any]) -> list[str]:
        keys = r.get("swept_keys")
        overrides = [o for o in r.get("overrides") or [] if not o.startswith(("resume", "hydra."))]
        return [o for o in overrides if o.split("=", 1)[0] in keys] if keys else overrides
    common = _common(rows, own) if not row.get("swept_keys") else set()
    return " ".join(o for o in own(row) if o not in common) or str(row.get("run_dir"))


def _where(row: dict[str, Any]) -> str:
    if row.get("checkpoint"):
        return f" (at step {row.get('steps')}, checkpoint {row['checkpoint']})"
    return f" ({row['run_dir']})" if row.get("run_dir") else ""


def write_results_csv(rows: Sequence[dict[str, Any]], path: Path) -> None:
    buffer = io.StringIO(newline="")
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, extrasaction="ignore")
    writer.writeheader()
    for r in rows:
        writer.writerow(r | {"job": r.get("job_num"), "overrides": " ".join(r.get("overrides") or [])})
    atomic_write_text(path, buffer.getvalue())  # a reader never sees half a table


def plot(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """Val loss against trainable parameters and against peak memory, one point per group,
    error bars over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [g for g in group_runs(rows) if g.values("val_loss")]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for ax, (key, xlabel) in zip(axes, [("trainable_params", "trainable parameters"), ("peak_rss_mb", "peak RSS (MB)")]):
        for g in groups:
            xs, ys = g.values(key), g.values("val_loss")
            if not xs:
                continue
            x, y = statistics.fmean(xs), statistics.fmean(ys)
            xerr = statistics.stdev(xs) if len(xs) > 1 else 0.0
            yerr = statistics.stdev(ys) if len(ys) > 1 else 0.0
            ax.errorbar(x, y, xerr=xerr, yerr=yerr, fmt="o", capsize=4, label=g.label)
            ax.annotate(g.label, (x, y), textcoords="offset points", xytext=(6, 6), fontsize=8)
        if groups:
            ax.legend(fontsize=8)
        if key == "trainable_params":
            ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("validation loss (lower is better)")
        ax.grid(alpha=0.3)
    axes[0].set_title("quality vs trainable parameters")
    axes[1].set_title("quality vs peak memory")
    fig.suptitle(f"{len(rows)} runs; budget: {budget(rows)}", fontsize=9)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, dpi=120, format="png"))
    plt.close(fig)


def write_comparison(sweep_dirs: Sequence[str | Path], out_dir: str | Path) -> str:
    """Write results.csv, comparison.md and comparison.png into ``out_dir``; return the table."""
    rows = load_runs(sweep_dirs)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = markdown_table(rows)
    write_results_csv(rows, out / "results.csv")
    atomic_write_text(out / "comparison.md", table)
    if rows:
        plot(rows, out / "comparison.png")
    return table
