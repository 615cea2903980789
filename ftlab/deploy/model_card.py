"""The README.md of an export: what the weights are, how they were made, how to load them.

An exported folder travels without its run folder, so the card carries everything a reader
needs to trust and reproduce it: base model, method and its settings, quantization, the data
with a fingerprint of the prepared training examples, the run's scores and the two commands
(the training run and the export) that produced it. It is rendered from the same facts that go
into ``ftlab_export.json``, so the two never disagree.
"""

from __future__ import annotations

from typing import Any, Mapping

import yaml

__all__ = ["model_card"]


def _front_matter(facts: Mapping[str, Any]) -> str:
    """Hugging Face Hub metadata (local base paths are not valid ``base_model`` ids, so left out)."""
    meta = {
        "library_name": "peft" if facts["format"] == "peft-adapter" else "transformers",
        "tags": ["ftlab", str(facts["method"])],
        "pipeline_tag": "text-classification" if facts["task"] == "classification" else "text-generation",
    }
    return "---\n" + yaml.safe_dump(meta, sort_keys=False) + "---\n"


def _metrics_lines(metrics: Mapping[str, Any]) -> list[str]:
    def num(value: Any, digits: int = 4) -> str:
        return f"{value:.{digits}f}" if isinstance(value, (int, float)) else "not measured"

    lines = [f"- validation loss: {num(metrics.get('val_loss'))}"]
    if metrics.get("train_loss_first") is not None:
        lines.append(f"- training loss: {num(metrics.get('train_loss_first'))} -> {num(metrics.get('train_loss_last'))} "
                     f"over {metrics.get('steps', '?')} steps")
    generation = metrics.get("generation") or {}
    if metrics.get("exact_match") is not None:
        lines.append(f"- {generation.get('checker', 'exact')} match on {generation.get('prompts', '?')} held-out prompts: "
                     f"fine-tuned {num(metrics['exact_match'], 3)}, base {num(metrics.get('base_exact_match'), 3)}")
    if metrics.get("accuracy") is not None:
        lines.append(f"- accuracy {num(metrics['accuracy'])}, macro precision {num(metrics.get('precision'))}, "
                     f"recall {num(metrics.get('recall'))}, F1 {num(metrics.get('f1'))}")
    return lines


def _load_snippet(facts: Mapping[str, Any]) -> str:
    auto = "AutoModelForSequenceClassification" if facts["task"] == "classification" else "AutoModelForCausalLM"
    out = facts["out"]
    if facts["format"] != "peft-adapter":
        return (f"from transformers import {auto}, AutoTokenizer\n"
                f"model = {auto}.from_pretrained({out!r})\n"
                f"tokenizer = AutoTokenizer.from_pretrained({out!r})\n")
    head = ""
    if facts["task"] == "classification":
        labels = list(facts.get("labels") or [])
        head = f", num_labels={len(labels)}, id2label={dict(enumerate(labels))!r}"
    quant = facts.get("quantization_config")
    if quant:
        return (f"from peft import PeftModel\n"
                f"from transformers import {auto}, AutoTokenizer, BitsAndBytesConfig\n"
                f"quantization = BitsAndBytesConfig(**{quant!r})\n"
                f"base = {auto}.from_pretrained({facts['base_model']!r}, quantization_config=quantization{head})\n"
                f"model = PeftModel.from_pretrained(base, {out!r})\n"
                f"tokenizer = AutoTokenizer.from_pretrained({out!r})\n")
    return (f"from peft import PeftModel\n"
            f"from transformers import {auto}, AutoTokenizer\n"
            f"base = {auto}.from_pretrained({facts['base_model']!r}{head})\n"
            f"model = PeftModel.from_pretrained(base, {out!r})\n"
            f"tokenizer = AutoTokenizer.from_pretrained({out!r})\n")


def _weights_section(facts: Mapping[str, Any]) -> list[str]:
    quant = facts["quantization"]
    if facts["format"] == "peft-adapter":
        lines = [f"A PEFT adapter ({facts['peft_type']}) for the base model below; the base weights are not in "
                 f"this folder. `adapter_config.json` names the base in `base_model_name_or_path`: "
                 f"`{facts['base_model']}`."]
        if quant != "none":
            lines.append(f"The adapter was trained on the base held in {quant} (bitsandbytes): load the base with "
                         "the same quantization (below) to get the trained model. On the unquantized base it is "
                         "another model (off by the base's whole quantization error, which on small models is "
                         "large); for a float model, export the run with --merge instead.")
        if facts.get("cannot_merge"):
            lines.append(f"It cannot be merged into the base weights: {facts['cannot_merge']}.")
        return lines
    if facts["merged"] and facts["dequantized"]:
        return [f"A full model: the adapter merged into the base, which trained held in {quant} and was "
                f"**dequantized to {facts['dequantized_to']}** for the merge (merging into 4/8-bit weights would "
                f"round most of the update away); the weights are stored in {facts['dtype']}."]
    if facts["merged"]:
        return [f"A full model: the adapter merged into the base weights, stored in {facts['dtype']}."]
    return [f"A full model: method {facts['method']} trains the base weights themselves (nothing to merge); "
            f"stored in {facts['dtype']}."]


def model_card(facts: Mapping[str, Any]) -> str:
    """The README.md text for an export described by ``facts`` (the ``ftlab_export.json`` payload)."""
    data = facts["data"]
    source = data.get("path") or f"ftlab built-in ({data.get('synthetic')})"
    sections = [
        _front_matter(facts),
        f"# {facts['method']} fine-tune of {facts['base_name']}\n",
        "\n".join(_weights_section(facts)) + "\n",
        "## Base model\n",
        f"- name: {facts['base_name']}\n- weights: `{facts['base_model']}`\n"
        f"- quantization while training: {facts['quantization']}\n- task: {facts['task']}\n",
        f"## Method: {facts['method']}\n",
        "```yaml\n" + yaml.safe_dump(facts["method_config"], sort_keys=False) + "```\n",
        "## Data\n",
        f"- data: {data.get('name')} from {source}"
        + (f" (validation: {data['val_path']})" if data.get("val_path") else "") + "\n"
        f"- training examples: {data['train_examples']}\n"
        f"- fingerprint of the prepared training examples (sha256): `{data['fingerprint']}`\n",
        "## Results of the run\n",
        "\n".join(_metrics_lines(facts["metrics"])) + "\n",
        "## How it was made\n",
        f"The training run (`{facts['run_dir']}`):\n\n    {facts['run_command']}\n\nThe export:\n\n    {facts['export_command']}\n",
        "## Loading it\n",
        "```python\n" + _load_snippet(facts) + "```\n",
    ]
    if facts.get("gguf"):
        sections.append(f"`{facts['gguf']}` holds the same merged weights as a GGUF file (llama.cpp).\n")
    return "\n".join(sections)
