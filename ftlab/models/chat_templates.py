"""Chat templates a model config can name (``model.chat_template``), for tokenizers that ship none.

Base checkpoints (GPT-2, Pythia, OPT, Phi-2, ...) have no chat template, and chat data is rendered
through one (``ftlab.data.chat_masking``). ``model.chat_template`` is ``null`` (the tokenizer's
own; ChatML, with one log line, when it has none), a name from ``TEMPLATES``, or a Jinja template
string. The template chosen is set on the tokenizer, so it is saved with every adapter and export.
"""

from __future__ import annotations

import logging
from typing import Any

__all__ = ["CHATML", "TEMPLATES", "resolve_chat_template", "set_chat_template"]

log = logging.getLogger(__name__)

# ChatML as SmolLM2 and Qwen write it, without a default system prompt: every turn is
# ``<|im_start|>{role}\n{content}<|im_end|>\n``; the generation prompt opens the assistant turn.
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

TEMPLATES: dict[str, str] = {"chatml": CHATML}


def resolve_chat_template(value: str | None) -> str | None:
    """The Jinja text for a ``model.chat_template`` value (a name or a template; None stays None)."""
    if value is None:
        return None
    return TEMPLATES.get(str(value), str(value))


def set_chat_template(tokenizer: Any, value: str | None, model_name: str = "the model") -> None:
    """Give ``tokenizer`` the configured template; with none configured keep its own, or use
    ChatML (saying so once) when it has none."""
    template = resolve_chat_template(value)
    if template is not None:
        tokenizer.chat_template = template
    elif not getattr(tokenizer, "chat_template", None):
        log.info("the tokenizer of %s has no chat template: chat data is rendered as ChatML "
                 "(model.chat_template sets another)", model_name)
        tokenizer.chat_template = CHATML
