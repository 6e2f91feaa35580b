"""Prompt templating: the one place a prompt's text is built, for training and inference alike.

    prompt = format_prompt(tokenizer, "What is anaemia?", system="Answer briefly.")

With a tokenizer that ships a chat template, the prompt is that template applied to
[system?, user] with the generation prompt added. Otherwise it is the documented default
(Alpaca-style, the system text on top when given):

    {system}\n\n### Instruction:\n{user_text}\n\n### Response:\n

The prompt ends exactly where the answer begins, so prepare can tokenise prompt and answer
separately and mask the prompt's tokens, and evaluate/merge/generate see the same text the
model was trained on.
"""
from __future__ import annotations

from typing import Any

DEFAULT_TEMPLATE = "### Instruction:\n{user_text}\n\n### Response:\n"
DEFAULT_NAME = "medqlora-default"
CHAT_NAME = "tokenizer-chat-template"


def has_chat_template(tokenizer: Any) -> bool:
    """True when the tokenizer carries a chat template of its own."""
    return bool(getattr(tokenizer, "chat_template", None))


def template_name(tokenizer: Any) -> str:
    """Name of the template `format_prompt` uses with this tokenizer (recorded in meta.json)."""
    return CHAT_NAME if has_chat_template(tokenizer) else DEFAULT_NAME


def _apply_chat(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    """The tokenizer's chat template; templates without a system role get it folded into
    the first user turn (Mistral's template raises on a system message)."""
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception:  # noqa: BLE001 - jinja raises TemplateError (or ValueError) by template
        if not messages or messages[0]["role"] != "system":
            raise
        system, rest = messages[0]["content"], [dict(m) for m in messages[1:]]
        rest[0]["content"] = f"{system}\n\n{rest[0]['content']}"
        return tokenizer.apply_chat_template(rest, tokenize=False, add_generation_prompt=True)


def format_prompt(tokenizer: Any, user_text: str, system: str = "") -> str:
    """The full prompt text for one user turn, ending where the answer begins."""
    return format_messages(tokenizer, [{"role": "user", "content": user_text}], system)


def format_messages(tokenizer: Any, messages: list[dict[str, str]], system: str = "") -> str:
    """Prompt for a conversation whose next turn is the assistant's.

    `messages` alternate user/assistant and end with a user turn. In the default template
    earlier turns are repeated as Instruction/Response blocks, so one turn gives exactly
    DEFAULT_TEMPLATE.
    """
    if messages and messages[0]["role"] == "system":
        system = "\n\n".join(t for t in (system, messages[0]["content"]) if t)
        messages = messages[1:]
    if has_chat_template(tokenizer):
        head = [{"role": "system", "content": system}] if system else []
        return _apply_chat(tokenizer, head + list(messages))
    blocks = [f"{system}\n\n"] if system else []
    for message in messages:
        if message["role"] == "user":
            blocks.append(DEFAULT_TEMPLATE.format(user_text=message["content"]))
        else:  # an earlier assistant answer closes the block it answers
            blocks.append(f"{message['content']}\n\n")
    return "".join(blocks)
