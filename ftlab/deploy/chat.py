"""``ftlab generate`` and ``ftlab chat``: answer prompts with a run's model or an export.

A run folder is loaded through its method (``ftlab.deploy.run_loading``), exactly the model the run
trained. An export folder is loaded the way its README tells anyone to, with plain
transformers/peft: a merged model folder with ``AutoModelForCausalLM``, an adapter folder with
``PeftModel.from_pretrained`` on the base named in its ``adapter_config.json`` (held in the
run's quantization when ``ftlab_export.json`` records one, so a QLoRA adapter meets the 4-bit
base it trained on). So ``ftlab generate EXPORT`` also checks that the export stands alone.

Prompts go through the chat template as in training (``encode_prompt``) and generation stops
at the template's end of turn. Answers stream to stdout token by token (``TextStreamer``),
except for prompt-learning PEFT models: transformers' generate mishandles their virtual tokens
with peft 0.21 (see ``ftlab.evaluation.generation``), so their answer comes from ``generate_ids``, greedy,
and is printed whole when it is done.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ftlab.data.encode import pad_id_of
from ftlab.errors import ChatError
from ftlab.deploy.export import EXPORT_INFO
from ftlab.models.quant import keep_standard_4bit_layout
from ftlab.evaluation.generation import (
    ModelInputs, generate_batch, generate_ids, generation_config, prompt_learning_config, stop_token_ids, until_stop,
)

__all__ = ["ChatError", "Chatbot", "chat_loop", "check_settings", "generate_once", "load_chatbot", "reply"]


DEFAULT_MAX_NEW_TOKENS = 256
HELP = "ftlab chat: type a message; /reset starts a new conversation, /exit (or Ctrl-D) ends"

Messages = list[dict[str, str]]


@dataclass
class Chatbot:
    model: nn.Module
    tokenizer: Any
    model_inputs: ModelInputs | None = None

    @property
    def prompt_learning(self) -> bool:
        return prompt_learning_config(self.model) is not None


def _device_map() -> dict[str, Any]:
    return {"": 0} if torch.cuda.is_available() else {"": "cpu"}


def _not_causal(folder: Path, what: str) -> ChatError:
    return ChatError(f"{folder} holds a {what}; generate and chat need a causal language model "
                     "(a task=causal_lm run or its export)")


def _load_run(folder: Path) -> Chatbot:
    from ftlab.build import method_class
    from ftlab.deploy.run_loading import open_run

    finished = open_run(folder)
    if finished.task != "causal_lm":
        raise _not_causal(folder, f"task={finished.task} run")
    if method_class(finished.cfg).head != "lm":
        raise ChatError(f"{folder} holds a reward model (method={finished.cfg.method.name}): it scores answers and "
                        "writes none; use it as method.reward_model of a PPO run, or score with "
                        "ftlab.methods.reward.load_reward_model")
    loaded = finished.load()
    return Chatbot(loaded.model, loaded.tokenizer, loaded.method.model_inputs)


def _load_export(folder: Path) -> Chatbot:
    from transformers import AutoModelForCausalLM

    from ftlab.models.loading import load_tokenizer

    adapter_config, config_file = folder / "adapter_config.json", folder / "config.json"
    if not adapter_config.is_file() and not config_file.is_file():
        raise ChatError(f"{folder} is neither a run folder (.hydra/overrides.yaml), an adapter export "
                        "(adapter_config.json) nor a model folder (config.json)")
    tokenizer = load_tokenizer(folder)
    if adapter_config.is_file():
        from peft import PeftModel

        config = json.loads(adapter_config.read_text())
        if config.get("task_type") not in (None, "CAUSAL_LM"):
            raise _not_causal(folder, f"{config.get('task_type')} adapter")
        if config.get("peft_type") == "MULTITASK_PROMPT_TUNING":
            raise ChatError(f"{folder} is a multitask prompt adapter, which needs the task id of every input; "
                            "generate with its run folder, whose method supplies it")
        base_path = config.get("base_model_name_or_path")
        if not base_path:
            raise ChatError(f"{adapter_config} names no base model (base_model_name_or_path); set it to the "
                            "folder or hub id of the base the adapter trained on")
        quantization = _recorded_quantization(folder)
        base = AutoModelForCausalLM.from_pretrained(
            base_path, quantization_config=quantization, device_map=_device_map() if quantization else None)
        keep_standard_4bit_layout(base)  # bitsandbytes' CPU repack asserts on narrow layers
        return Chatbot(PeftModel.from_pretrained(base, str(folder)), tokenizer)
    architectures = json.loads(config_file.read_text()).get("architectures") or []
    if any(a.endswith("ForSequenceClassification") for a in architectures):
        raise _not_causal(folder, "sequence-classification model")
    return Chatbot(AutoModelForCausalLM.from_pretrained(str(folder)), tokenizer)


def _recorded_quantization(folder: Path) -> Any:
    """The BitsAndBytesConfig the adapter trained under, when the export recorded one."""
    info = folder / EXPORT_INFO
    if not info.is_file():
        return None
    settings = json.loads(info.read_text()).get("quantization_config")
    if not settings:
        return None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(**settings)


def load_chatbot(path: str | Path) -> Chatbot:
    """The model in a run folder or an export folder, in eval mode on the GPU when there is one."""
    from ftlab.deploy.run_loading import is_run_folder

    folder = Path(path)
    if not folder.is_dir():
        raise ChatError(f"{folder} is not a folder; give a run folder or an export folder (ftlab export)")
    bot = _load_run(folder) if is_run_folder(folder) else _load_export(folder)
    if torch.cuda.is_available() and not getattr(bot.model, "hf_device_map", None):
        bot.model.to("cuda")
    bot.model.eval()
    return bot


def _context(model: nn.Module) -> int | None:
    return getattr(getattr(model, "config", None), "max_position_embeddings", None)


def _fit_context(bot: Chatbot, messages: Messages, max_new_tokens: int) -> tuple[Messages, list[int]]:
    """Drop the oldest exchanges (a system message stays) until prompt and answer fit the context."""
    from ftlab.data.chat_masking import encode_prompt

    context = _context(bot.model)
    messages = list(messages)
    while True:
        ids = encode_prompt(bot.tokenizer, messages)
        system = 1 if messages and messages[0]["role"] == "system" else 0
        if context is None or len(ids) + max_new_tokens <= context or len(messages) - system <= 1:
            return messages, ids
        del messages[system:system + 2]


def check_settings(max_new_tokens: int, temperature: float) -> None:
    """Refuse bad generation settings before a model is loaded."""
    if max_new_tokens < 1:
        raise ChatError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    if temperature < 0:
        raise ChatError(f"--temperature must be 0 (greedy) or positive, got {temperature}")


def reply(bot: Chatbot, messages: Messages, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
          temperature: float = 0.0) -> str:
    """Answer the conversation's last user message, printed to stdout (streamed where possible).

    Stop tokens, padding, the method's extra inputs (multitask prompt's ``task_ids``) and the cut
    at the end of turn are ``ftlab.evaluation.generation``'s, as in evaluation; only the sampling
    settings and the streamer are chat's own."""
    check_settings(max_new_tokens, temperature)
    messages, prompt = _fit_context(bot, messages, max_new_tokens)
    tokenizer, model = bot.tokenizer, bot.model
    if bot.prompt_learning:
        if temperature > 0:
            raise ChatError("--temperature: prompt-learning models (prompt, prefix, ptuning, multitask_prompt) "
                            "answer greedily only here; leave --temperature out")
        ids = generate_ids(model, tokenizer, [{"messages": messages}], max_new_tokens, batch_size=1,
                           model_inputs=bot.model_inputs)[0]
        text = tokenizer.decode(ids, skip_special_tokens=True)
        print(text, flush=True)
        return text
    from transformers import TextStreamer

    stop, pad_id = stop_token_ids(tokenizer, model), pad_id_of(tokenizer)
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    config = generation_config(max_new_tokens, stop, pad_id, **sampling)
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)  # prints to stdout
    with torch.no_grad():
        new = generate_batch(model, [prompt], config, pad_id, bot.model_inputs, streamer=streamer)[0]
    return tokenizer.decode(until_stop(new, stop), skip_special_tokens=True)


def generate_once(path: str | Path, prompt: str, system: str | None = None,
                  max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, temperature: float = 0.0) -> str:
    """``ftlab generate``: one answer to ``prompt``."""
    check_settings(max_new_tokens, temperature)
    bot = load_chatbot(path)
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    return reply(bot, messages, max_new_tokens, temperature)


def chat_loop(bot: Chatbot, system: str | None = None, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
              temperature: float = 0.0, read: Callable[[str], str] = input) -> None:
    """``ftlab chat``: read a line, answer it with the conversation so far; /reset, /exit, EOF."""
    start: Messages = [{"role": "system", "content": system}] if system else []
    history = list(start)
    print(HELP, file=sys.stderr, flush=True)
    while True:
        try:
            line = read("> ").strip()
        except EOFError:
            print()
            return
        if line == "/exit":
            return
        if line == "/reset":
            history = list(start)
            print("(new conversation)", flush=True)
            continue
        if not line:
            continue
        history.append({"role": "user", "content": line})
        history.append({"role": "assistant", "content": reply(bot, history, max_new_tokens, temperature)})
