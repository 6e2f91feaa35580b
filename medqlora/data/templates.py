"""Prompt templating: the one place a prompt's text is built, for training and inference alike.

    prompt = format_prompt(tokenizer, "What is anaemia?", system="Answer briefly.")

With a tokenizer that ships a chat template, the prompt is that template applied to
[system?, user] with the generation prompt added. Otherwise it is the documented default
(Alpaca-style, the system text on top when given):

    {system}\n\n### Instruction:\n{user_text}\n\n### Response:\n

The prompt ends exactly where the answer begins, so prepare can tokenise prompt and answer
separately and mask the prompt's tokens, and evaluate/merge/generate see the same text the
model was trained on.

The answer ends with the token that closes an assistant turn in the chat template
(`end_of_turn_id`: `<|im_end|>` for ChatML, `<|eot_id|>` for Llama-3), else eos; training
puts it in the labels and decoding stops on it (`stop_ids`), so a model learns to stop where
its template says a turn ends, and stops there in every engine.
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


_SENTINEL = "medqlora-answer-sentinel"


def end_of_turn_id(tokenizer: Any) -> int:
    """The token that closes an assistant turn: the first special token the chat template puts
    after an answer (ChatML: <|im_end|>), else eos (also when the template closes turns with
    plain text, or has no chat template)."""
    if has_chat_template(tokenizer):
        try:
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": "q"}, {"role": "assistant", "content": _SENTINEL}],
                tokenize=False)
        except Exception:  # noqa: BLE001 - jinja raises TemplateError (or ValueError) by template
            text = ""
        if _SENTINEL in text:
            tail = text.split(_SENTINEL, 1)[1]
            # Special in the vocabulary, not only the few named ones (bos, eos, pad, unk): a
            # tokenizer whose eos is wrong still marks <|im_end|> as an added special token.
            special = set(tokenizer.all_special_ids) | {
                i for i, added in getattr(tokenizer, "added_tokens_decoder", {}).items()
                if getattr(added, "special", False)}
            for token in tokenizer(tail, add_special_tokens=False)["input_ids"]:
                if token in special:
                    return token
    return tokenizer.eos_token_id


def stop_ids(tokenizer: Any) -> list[int]:
    """Token ids that end an answer when decoding: eos and the end-of-turn token."""
    return list(dict.fromkeys(i for i in (tokenizer.eos_token_id, end_of_turn_id(tokenizer))
                              if i is not None))
