"""Conversational rows: a list of messages rendered with a chat template, loss on every assistant turn.

A row's ``dataset.messages_field`` holds the conversation, OpenAI style (``[{role, content}]``) or ShareGPT
(``[{from, value}]``, roles human/gpt/system); the key names can be changed (``dataset.role_key``,
``dataset.content_key``). It is rendered with the tokenizer's chat template, or ``dataset.chat_template``.

Which tokens are supervised comes from the rendered text, for any template (with or without
``{% generation %}`` markers): assistant turn ``i`` spans from the end of ``render(messages[:i],
add_generation_prompt=True)`` to the end of ``render(messages[:i + 1])`` (trailing whitespace excluded), so it
holds the reply and the template's end-of-turn token, and never the role header the generation prompt
already shows. That needs each rendered prefix to be a prefix of the whole rendering; a template that
rewrites earlier turns (e.g. one that drops reasoning from all but the last turn) fails that check, and the
row is refused with the reason. Tokens whose first character lies in a span are labelled, through the fast
tokenizer's character offsets. System and user turns and all scaffolding are masked.

Too long for ``max_seq_length``: whole turns are dropped from the end first (the conversation ends after the
last assistant turn that fits), then, when even the first does not fit, tokens from the right.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trnft.common.errors import ConfigError
from trnft.common.training.data import IGNORE_INDEX

ROLES = {
    # "developer" is OpenAI's newer name for the system message (its exports write it).
    "openai": {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"},
    "sharegpt": {
        "system": "system",
        "human": "user",
        "user": "user",
        "gpt": "assistant",
        "assistant": "assistant",
    },
}
DEFAULT_KEYS = {"openai": ("role", "content"), "sharegpt": ("from", "value")}


class BadConversation(ValueError):
    """A row that cannot be trained on; the message is the reason, for one line naming the row."""


def keys(message_format: str, role_key: str | None, content_key: str | None) -> tuple[str, str]:
    role, content = DEFAULT_KEYS[message_format]
    return role_key or role, content_key or content


def parse(value: Any, message_format: str, role_key: str, content_key: str) -> list[dict[str, str]]:
    """The conversation as ``[{role, content}]`` with roles system/user/assistant, or BadConversation."""
    if isinstance(value, str):  # CSV and some parquet files hold the conversation as JSON text
        try:
            value = json.loads(value)
        except ValueError:
            raise BadConversation("the messages are a str, not a list (nor JSON text of one)") from None
    if not isinstance(value, list):
        raise BadConversation(f"the messages are a {type(value).__name__}, not a list")
    roles = ROLES[message_format]
    messages = []
    for i, item in enumerate(value):
        if not isinstance(item, dict) or role_key not in item or content_key not in item:
            raise BadConversation(f"message {i} is not an object with {role_key!r} and {content_key!r}")
        role = roles.get(str(item[role_key]))
        if role is None:
            raise BadConversation(
                f"message {i} has unknown role {item[role_key]!r} (known: {', '.join(sorted(roles))})"
            )
        content = _content_text(item[content_key], i)
        if role == "assistant" and not content.strip():
            raise BadConversation(f"message {i} is an empty assistant turn")
        messages.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in messages):
        raise BadConversation("no assistant turn")
    return messages


def _content_text(value: Any, i: int) -> str:
    """A message's text: a string as it is, or OpenAI content parts (``[{"type": "text", "text": ...}]``)
    joined in order. ``null`` and non-text parts (images, audio, files) are refused, never trained as
    ``""`` or as the list's Python repr."""
    if isinstance(value, str):
        return value
    if value is None:
        raise BadConversation(f"message {i} has content null (no text); drop the row or give it text")
    if isinstance(value, list):
        texts = []
        for j, part in enumerate(value):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind != "text" or not isinstance(part.get("text"), str):
                what = f"a {kind!r} part" if kind else "a part that is not {'type': 'text', 'text': ...}"
                raise BadConversation(f"message {i}, content part {j}: {what}; trnft trains on text only")
            texts.append(part["text"])
        return "".join(texts)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # a number written without quotes
    raise BadConversation(f"message {i} has content of type {type(value).__name__}, not text")


def load_template(value: str | None, tokenizer: Any) -> str:
    """``dataset.chat_template`` (a Jinja string, or the path of a file holding one) or the tokenizer's,
    compiled once here: a template that does not compile is a config error (one line, exit 2), not a
    reason to drop every row."""
    template = _template_text(value, tokenizer)
    check_compiles(template, "dataset.chat_template" if value else "the tokenizer's chat template")
    return template


def check_compiles(template: str, what: str) -> None:
    """Compile ``template`` the way transformers renders chat templates (its sandboxed Jinja environment
    with the ``generation`` tag; ``_compile_jinja_template`` in transformers 4.57 and 5.20 alike)."""
    import jinja2
    from transformers.utils.chat_template_utils import _compile_jinja_template

    try:
        _compile_jinja_template(template)
    except jinja2.TemplateSyntaxError as exc:
        raise ConfigError(
            f"{what}: Jinja syntax error at line {exc.lineno}: {exc.message}; fix the template"
        ) from exc


def _template_text(value: str | None, tokenizer: Any) -> str:
    if value:
        path = Path(value)
        if "{" not in value and path.is_file():
            try:
                return path.read_text(encoding="utf-8")
            except UnicodeDecodeError as exc:
                raise ConfigError(
                    f"dataset.chat_template: {value} is not UTF-8 text (byte {exc.start}); save the template as UTF-8"
                ) from exc
            except OSError as exc:
                raise ConfigError(f"dataset.chat_template: {value} cannot be read ({exc.strerror})") from exc
        if "{" not in value:
            what = "a folder" if path.is_dir() else "neither a Jinja template nor an existing file"
            raise ConfigError(
                f"dataset.chat_template: {value} is {what}; give a template file or the template text"
            )
        return value
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        raise ConfigError(
            "dataset.chat_template: the tokenizer has no chat template; set dataset.chat_template to a Jinja "
            "template or a file holding one"
        )
    return template


@dataclass(frozen=True)
class Rendered:
    """A conversation as text: its assistant spans, and the evaluation prompt and reference (the
    conversation up to its last assistant turn with the generation prompt, and that turn)."""

    text: str
    spans: tuple[tuple[int, int], ...]
    prompt: str
    answer: str


def render(tokenizer: Any, messages: list[dict[str, str]], template: str) -> Rendered:
    def text(upto: int, generation_prompt: bool) -> str:
        return tokenizer.apply_chat_template(
            messages[:upto], tokenize=False, add_generation_prompt=generation_prompt, chat_template=template
        )

    # longest first, so that "<|endoftext|>" is set aside whole rather than as a shorter token it ends with
    specials = sorted(set(getattr(tokenizer, "all_special_tokens", None) or []), key=len, reverse=True)
    try:
        full = text(len(messages), False)
        spans = []
        last = 0
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before, through = text(i, True), text(i + 1, False)
            closed = _turn_in_conversation(before, through, full, message["content"], specials)
            if closed is None:
                raise BadConversation(
                    f"the chat template does not render turn {i} as a prefix of the conversation (it rewrites "
                    "earlier turns), so the assistant tokens cannot be found"
                )
            spans.append((len(before), len(closed.rstrip())))
            last = i
        prompt = text(last, True)
    except BadConversation:
        raise
    except Exception as exc:  # jinja2 errors, raise_exception() in templates, a template expecting other keys
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BadConversation(f"the chat template failed to render it ({reason})") from exc
    return Rendered(full, tuple(spans), prompt, messages[last]["content"])


def _turn_in_conversation(
    before: str, through: str, full: str, content: str, specials: list[str]
) -> str | None:
    """The conversation rendered through an assistant turn, as the full conversation contains it; None when
    the template renders that turn differently once later turns follow.

    Usually that is ``through`` itself. Some templates close a conversation with special tokens only its
    last turn gets (Phi-3.5 appends ``eos_token`` when there is no generation prompt): then ``through`` ends
    with them and the full conversation goes on with the next turn there. Such trailing special tokens (and
    whitespace) are set aside while the rest is not a prefix of the full conversation and still holds the
    whole reply; the turn's own end-of-turn text stays learned.
    """
    if not through.startswith(before):
        return None
    start = through.find(content, len(before))
    if start < 0:  # the reply is not in its own rendering as given: nothing to keep it by
        return None
    reply_end = start + len(content)
    kept = through
    while not full.startswith(kept):
        shorter = kept.rstrip()
        ending = next((t for t in specials if t and shorter.endswith(t)), None)
        if ending is not None:
            shorter = shorter[: -len(ending)]
        if shorter == kept or len(shorter) < reply_end:
            return None
        kept = shorter
    return kept


@dataclass(frozen=True)
class EncodedConversation:
    ids: list[int]
    labels: list[int]
    dropped_turns: int  # assistant turns cut off at turn boundaries
    cut_tokens: bool  # the first assistant turn alone did not fit: tokens cut from the right


def encode(tokenizer: Any, rendered: Rendered, max_len: int) -> EncodedConversation:
    """Token ids of the rendered text (the template writes any BOS itself) and labels: the id where the
    token starts inside an assistant span, else -100; the first token is never supervised (packing)."""
    encoding = tokenizer.backend_tokenizer.encode(rendered.text, add_special_tokens=False)
    ids, offsets = list(encoding.ids), encoding.offsets
    span_of = [
        next((k for k, (s, e) in enumerate(rendered.spans) if s <= start < e), None) if end > start else None
        for start, end in offsets
    ]
    labels = [tid if k is not None else IGNORE_INDEX for tid, k in zip(ids, span_of)]
    dropped, cut_tokens = 0, False
    if len(ids) > max_len:
        # Where each assistant turn's last supervised token ends (exclusive), in turn order.
        turns = sorted({k for k in span_of if k is not None})
        ends = [max(t for t, k in enumerate(span_of) if k == turn) + 1 for turn in turns]
        fitting = [e for e in ends if e <= max_len]
        if fitting:
            cut = fitting[-1]
            dropped = len(ends) - len(fitting)
        else:
            cut, cut_tokens = max_len, True
        ids, labels = ids[:cut], labels[:cut]
    if labels:
        labels[0] = IGNORE_INDEX
    return EncodedConversation(ids, labels, dropped, cut_tokens)
