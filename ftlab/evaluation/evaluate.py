"""``ftlab eval RUN_DIR [OVERRIDES]``: evaluate a finished run again, on its data or other data.

The run's config is composed again from its recorded overrides (``.hydra/overrides.yaml``), so
the base model, quantization, method and data are exactly those it trained with; the extra
overrides change what is evaluated (``data.path=other.jsonl``, ``eval.num_prompts=200``,
``eval.checker=normalized``). The trained artifact is loaded onto a fresh base through the
method's own ``load``; the result (validation loss, exact match of base and fine-tuned model or
the classification metrics) is printed and written to ``RUN_DIR/eval.json``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

__all__ = ["evaluate_run"]

log = logging.getLogger("ftlab")
EVAL_FILE = "eval.json"


def evaluate_run(run_dir: str | Path, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Validation loss and scores of the run's trained model; also written to ``eval.json``."""
    import pytorch_lightning as pl

    from ftlab.build import (CONNECT_KWARGS, final_scores, generation_records, pair_records, reward_records, score_base,
                             score_base_preference, score_base_reward)
    from ftlab.module import FineTuneModule
    from ftlab.precision import resolve_precision
    from ftlab.results import write_json
    from ftlab.deploy.run_loading import open_run

    finished = open_run(run_dir, overrides)
    run_dir, cfg, datamodule, labels = finished.run_dir, finished.cfg, finished.datamodule, finished.labels
    method, base, tokenizer = finished.load_base()
    base_score = score_base(cfg, base, tokenizer, datamodule)
    base_preference = score_base_preference(cfg, base, tokenizer, datamodule)
    base_reward = score_base_reward(cfg, base, tokenizer, datamodule, method)
    model = finished.load_trained(method, base)
    context = getattr(model.config, "max_position_embeddings", None)
    datamodule.connect(tokenizer, max_length=context, cache_dir=cfg.paths.cache_dir, packing=False,
                       **CONNECT_KWARGS[method.batch_kind])
    if method.batch_kind == "prompt":
        method.use_data(tokenizer, datamodule.train_records, datamodule.val_records)
    module = FineTuneModule(model, method, optimizer=None, labels=labels)  # type: ignore[arg-type]
    # the run's own precision (trainer.precision=auto resolves as it did in training), so that
    # val_loss is the number training recorded for the same model and data
    precision = resolve_precision(cfg.trainer.get("precision", "32-true"), "auto")
    trainer = pl.Trainer(accelerator="auto", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=True, enable_model_summary=False, precision=precision)
    (metrics,) = trainer.validate(module, datamodule=datamodule, verbose=False)

    result: dict[str, Any] = {
        "run_dir": str(run_dir),
        "overrides": list(overrides),
        "method": cfg.method.name,
        "val_loss": float(metrics["val/loss"]) if "val/loss" in metrics else None,
        **final_scores(cfg, model, tokenizer, method, classification=module.classification_metrics,
                       records=generation_records(cfg, datamodule), base_score=base_score,
                       pairs=pair_records(cfg, datamodule), base_preference=base_preference,
                       prompts=reward_records(cfg, datamodule), base_reward=base_reward),
        "data": datamodule.summary(),
    }
    write_json(run_dir / EVAL_FILE, result)
    return result


def summary_lines(result: dict[str, Any]) -> list[str]:
    """The headline numbers of an evaluation, one per line, and a markdown table of the
    classification metrics per class (``ftlab eval`` prints them with ``ftlab.tables``)."""
    from ftlab.tables import pipe_table

    lines = [f"run: {result['run_dir']} (method {result['method']})"]
    if result.get("val_loss") is not None:
        lines.append(f"validation loss: {result['val_loss']:.4f}")
    if result.get("exact_match") is not None:
        gen = result["generation"]
        base = result.get("base_exact_match")
        lines.append(
            f"{gen['checker']} match on {gen['prompts']} held-out prompts: fine-tuned {result['exact_match']:.3f}"
            + (f", base {base:.3f}" if base is not None else "")
        )
    if result.get("preference_accuracy") is not None:
        pairs, base = result["preference"]["pairs"], result.get("base_preference_accuracy")
        lines.append(f"preference accuracy on {pairs} held-out pairs: fine-tuned {result['preference_accuracy']:.3f}"
                     + (f", base {base:.3f}" if base is not None else ""))
    if result.get("reward_accuracy") is not None:
        lines.append(f"reward model: chosen scored higher in {result['reward_accuracy']:.3f} of "
                     f"{result['preference']['pairs']} held-out pairs, mean margin {result['reward_margin']:.4f}")
    if result.get("mean_reward") is not None:
        base = result.get("base_mean_reward")
        lines.append(f"mean reward on held-out prompts: fine-tuned {result['mean_reward']:.3f}"
                     + (f", base {base:.3f}" if base is not None else ""))
    if result.get("accuracy") is not None:
        lines.append(
            f"accuracy {result['accuracy']:.4f}, macro precision {result['precision']:.4f}, "
            f"recall {result['recall']:.4f}, F1 {result['f1']:.4f}"
        )
        per_class = [[str(label), f"{v['precision']:.3f}", f"{v['recall']:.3f}", f"{v['f1']:.3f}", str(v["support"])]
                     for label, v in result["classification"]["per_class"].items()]
        lines += ["", *pipe_table(["class", "precision", "recall", "F1", "n"], per_class).splitlines(), ""]
    lines.append(f"written to {Path(result['run_dir']) / EVAL_FILE}")
    return lines
