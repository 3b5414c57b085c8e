"""Conversational rows: a list of messages rendered with a chat template, loss on every assistant turn.

A row's ``dataset.messages_field`` holds the conversation, OpenAI style (``[{role, content}]``) or ShareGPT
(``[{from, value}]``, roles human/gpt/system); the key names can be changed (``dataset.role_key``,
``dataset.content_key``). It is rendered with the tokenizer's chat template, or ``dataset.chat_template``.

Which tokens are supervised comes from the rendered text, for any template (with or without
``{% generation %}`` markers, see :func:`render`): each assistant reply and its end-of-turn text, never the
role header the generation prompt already shows, found by rendering the conversation a bounded number of
times (linear in its length). Templates that write earlier turns differently once later ones follow
(a system message moved into the last user turn), add a closing token only at the very end (Phi-3.5) or
open the reply in the generation prompt (DeepSeek-R1's ``<think>``) are handled; a reply the template
changes is counted (reasoning left out, text rewritten) and trained as the template writes it, or with its
reasoning under ``dataset.keep_reasoning``. Tokens whose first character lies in a span are labelled,
through the fast tokenizer's character offsets. System and user turns and all scaffolding are masked; an
empty assistant turn is kept in the text and not trained.

Too long for ``max_seq_length``: whole turns are dropped from the end first (the conversation ends after the
last assistant turn that fits), then, when even the first does not fit, tokens from the right.
"""

from __future__ import annotations

import bisect
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .training.data import IGNORE_INDEX

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
        # An empty assistant turn stays in the conversation (the turns around it are trained); render()
        # refuses a conversation with no assistant text at all.
        messages.append({"role": role, "content": _content_text(item[content_key], i)})
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
    conversation up to its last assistant turn with the generation prompt, and what is trained of that turn
    without its end-of-turn text, so that evaluation compares against the training target).

    ``reasoning_dropped``: assistant turns whose reasoning (``<think>...</think>``) the template leaves out and
    that are trained without it; ``reasoning_kept``: such turns trained with it (``dataset.keep_reasoning``);
    ``rewritten``: turns the template writes differently otherwise (case, text); ``empty``: assistant turns
    without text, kept in the conversation but not trained; ``left_out``: system or user messages with text
    that the template does not write (Mistral Nemo's writes the system message only into a conversation
    that ends with a user turn, so its training text has none)."""

    text: str
    spans: tuple[tuple[int, int], ...]
    prompt: str
    answer: str
    reasoning_dropped: int = 0
    reasoning_kept: int = 0
    rewritten: int = 0
    empty: int = 0
    left_out: int = 0


# Stand-ins for message texts: private-use characters, which no template writes itself and which case
# changes, strip() and split() on ordinary text leave as they are.
_MARK = "\ue000{}\ue001"
_MARKS = re.compile("\ue000(\\d+)\ue001")
_REASONING_END = "</think>"


def render(
    tokenizer: Any, messages: list[dict[str, str]], template: str, keep_reasoning: bool = False
) -> Rendered:
    """Render a conversation and find what to train, rendering it a bounded number of times (five at most,
    whatever its length).

    The conversation is rendered as it is, and once with each message's text replaced by a stand-in: that
    skeleton shows the template's own text between messages whatever order it writes them in (a system
    message moved into the last user turn, as Mistral Nemo's template does), and the real rendering must be
    the skeleton with each stand-in replaced by a text, which locates every assistant reply. A reply's span
    starts where the generation prompt (from a rendering up to the last assistant turn with
    ``add_generation_prompt``) stops agreeing with the conversation, so a prompt that opens more than the
    turn header (DeepSeek-R1's ``<think>``) or less is handled, and ends after the end-of-turn text: what
    follows the reply both in the conversation and where the conversation closes after it (Phi-3.5's eos,
    added only at the very end, is learned there alone). A reply the template writes differently is counted:
    reasoning left out is trained as the template writes it unless ``keep_reasoning``, which trains the
    message as given.
    """

    def text(upto: list[dict[str, str]], generation_prompt: bool) -> str:
        return tokenizer.apply_chat_template(
            upto, tokenize=False, add_generation_prompt=generation_prompt, chat_template=template
        )

    with_text = [i for i, m in enumerate(messages) if m["role"] == "assistant" and m["content"].strip()]
    if not with_text:
        raise BadConversation("no assistant turn with text")
    last = with_text[-1]
    marked = [{**m, "content": _MARK.format(i) if m["content"] else ""} for i, m in enumerate(messages)]
    try:
        full = text(messages, False)
        skeleton = text(marked, False)
        closed = skeleton if last == len(messages) - 1 else text(marked[: last + 1], False)
        opening = text(marked[:last], True)
        prompt = text(messages[:last], True)
    except Exception as exc:  # jinja2 errors, raise_exception() in templates, a template expecting other keys
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BadConversation(f"the chat template failed to render it ({reason})") from exc

    scaffolds, slots = _align(skeleton, full, messages)
    written: dict[int, list[int]] = {}
    for j, (k, _, _) in enumerate(slots):
        written.setdefault(k, []).append(j)
    for k in with_text:
        if len(written.get(k, [])) != 1:
            how = "leaves out" if k not in written else f"writes {len(written[k])} copies of"
            raise BadConversation(f"the chat template {how} assistant message {k}, so it cannot be trained")

    generation = _after_last_mark(opening)
    closing = _after_mark(closed, last)
    specials = _special_tokens(tokenizer)
    pieces, spans = [scaffolds[0]], []
    shift = 0  # how much longer the trained text is than the rendering so far (kept reasoning)
    dropped = kept = rewritten = 0
    answer = ""
    for j, (k, start, end) in enumerate(slots):
        slot = full[start:end]
        if messages[k]["role"] != "assistant" or k not in with_text:
            pieces += [slot, scaffolds[j + 1]]
            continue
        content = messages[k]["content"]
        if slot.strip() != content.strip():
            if _REASONING_END in content and content.split(_REASONING_END)[-1].strip() == slot.strip():
                if keep_reasoning and k == last:
                    slot, kept = content, kept + 1
                else:
                    dropped += 1
            elif slot.strip().casefold() == content.strip().casefold():
                rewritten += 1  # the template changes its case: trained (and evaluated) as written
            else:
                raise BadConversation(
                    f"the chat template writes assistant message {k} as text that is not the message "
                    f"({_excerpt(slot)} for {_excerpt(content)}), so it cannot be trained"
                )
        begin = start + shift
        shift += len(slot) - (end - start)
        first = begin + _reply_offset(scaffolds[j], generation, slot)
        close = _end_of_turn(scaffolds[j + 1], closing, specials)
        spans.append((first, begin + len(slot) + len(close)))
        if k == last:
            answer = (scaffolds[j] + slot)[len(scaffolds[j]) + first - begin :]
        pieces += [slot, scaffolds[j + 1]]
    empty = sum(1 for m in messages if m["role"] == "assistant" and not m["content"].strip())
    left_out = sum(1 for k, m in enumerate(messages) if m["content"] and k not in written)
    return Rendered(
        "".join(pieces), tuple(sorted(spans)), prompt, answer, dropped, kept, rewritten, empty, left_out
    )


def _align(
    skeleton: str, full: str, messages: list[dict[str, str]]
) -> tuple[list[str], list[tuple[int, int, int]]]:
    """The template's own text around each message (``scaffolds``, one more than the slots) and, per stand-in
    in the skeleton, ``(message index, start, end)`` of the text written in its place in ``full``.

    A slot holds its message's text as given, trimmed, or without its reasoning when the rendering goes on
    with the template's next text right after it; otherwise (a template that changes the text in another
    way) the slot ends where the template's next text is found, which :func:`render` accepts for a reply
    only if the reply is recognisable in it."""
    parts = _MARKS.split(skeleton)
    scaffolds, order = parts[0::2], [int(k) for k in parts[1::2]]
    if not full.startswith(scaffolds[0]):
        raise _shape_differs()
    pos, slots = len(scaffolds[0]), []
    for j, k in enumerate(order):
        after, final = scaffolds[j + 1], j == len(order) - 1

        def resumes(end: int, after: str = after, final: bool = final) -> bool:
            if final:
                return len(full) - len(after) == end and full.endswith(after)
            return full.startswith(after, end)

        ends = [pos + len(t) for t in _written_forms(messages[k]["content"]) if full.startswith(t, pos)]
        end = next((e for e in ends if resumes(e)), -1)
        if end < 0:  # changed in another way: the slot ends where the template's text resumes
            if final:
                end = len(full) - len(after) if full.endswith(after) else -1
            elif after:
                end = full.find(after, pos)
            if end < pos:
                raise _shape_differs()
        slots.append((k, pos, end))
        pos = end + len(after)
    if pos != len(full):
        raise _shape_differs()
    return scaffolds, slots


def _written_forms(content: str) -> list[str]:
    """How templates commonly write a message's text: as given, trimmed, without its reasoning."""
    forms = [content, content.strip()]
    if _REASONING_END in content:
        answer = content.split(_REASONING_END)[-1]
        forms += [answer, answer.strip(), answer.lstrip("\n")]
    return sorted(set(forms), key=len, reverse=True)


def _special_tokens(tokenizer: Any) -> list[str]:
    """The tokenizer's special tokens, those added as special included (a chat template's turn markers)."""
    found = set(getattr(tokenizer, "all_special_tokens", None) or [])
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    found.update(t.content for t in added.values() if getattr(t, "special", False))
    return sorted(found, key=len, reverse=True)


def _excerpt(text: str, limit: int = 40) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


def _shape_differs() -> BadConversation:
    return BadConversation(
        "the chat template writes this conversation differently depending on the message texts (not only "
        "where they go), so the assistant tokens cannot be found"
    )


def _after_last_mark(rendered: str) -> str:
    marks = list(_MARKS.finditer(rendered))
    return rendered[marks[-1].end() :] if marks else rendered


def _after_mark(rendered: str, k: int) -> str:
    at = rendered.rfind(_MARK.format(k))
    return rendered[at + len(_MARK.format(k)) :]


def _reply_offset(header: str, generation: str, slot: str) -> int:
    """Where the trained part of a reply starts, relative to its text: at it when the turn header is the
    generation prompt; before it by what the header writes beyond the prompt (the model must produce
    that); after it by what the prompt writes beyond the header and the reply repeats (DeepSeek-R1's
    prompt opens ``<think>\\n``, a kept reasoning starts with it)."""
    if header.endswith(generation):
        return 0
    at = header.rfind(generation) if generation else -1
    if at >= 0:
        return -(len(header) - at - len(generation))
    opened = max((m for m in range(len(generation), 0, -1) if header.endswith(generation[:m])), default=0)
    beyond = generation[opened:]
    same = 0
    while same < min(len(beyond), len(slot)) and beyond[same] == slot[same]:
        same += 1
    return same


def _end_of_turn(after: str, closing: str, specials: list[str]) -> str:
    """The end-of-turn text of a reply: the longest start shared by what follows it in the conversation and
    what follows the last reply where the conversation closes, ending at a whole special token or at
    whitespace (so no part of the next turn's header is learned), trailing whitespace excluded."""
    shared = 0
    while shared < min(len(after), len(closing)) and after[shared] == closing[shared]:
        shared += 1
    if shared not in (len(after), len(closing)):
        cut = after[:shared]
        while cut and not cut[-1].isspace() and not any(cut.endswith(t) for t in specials if t):
            cut = cut[:-1]
        shared = len(cut)
    return after[:shared].rstrip()


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
    starts = [s for s, _ in rendered.spans]  # sorted, not overlapping: one bisect per token

    def span_at(start: int, end: int) -> int | None:
        k = bisect.bisect_right(starts, start) - 1
        return k if end > start and k >= 0 and start < rendered.spans[k][1] else None

    span_of = [span_at(start, end) for start, end in offsets]
    labels = [tid if k is not None else IGNORE_INDEX for tid, k in zip(ids, span_of)]
    dropped, cut_tokens = 0, False
    if len(ids) > max_len:
        # Where each assistant turn's last supervised token ends (exclusive), in turn order.
        last_token: dict[int, int] = {}
        for t, k in enumerate(span_of):
            if k is not None:
                last_token[k] = t
        ends = [last_token[turn] + 1 for turn in sorted(last_token)]
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
