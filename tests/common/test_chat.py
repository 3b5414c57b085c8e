"""Conversational data: assistant-only masks from the rendered text (common/chat.py) and the tokenize stage on
chat rows."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from trnft.common import chat, cli
from trnft.common.config.run_config import load_config
from trnft.common.errors import TrnftError
from trnft.common.testing.fixtures import (
    TINY_CHAT_TEMPLATE,
    bundled_chat_path,
    bundled_texts,
    train_tokenizer,
)
from trnft.common.tokenize import TokenizeFigures, run
from trnft.common.training.data import IGNORE_INDEX, TokenizeOutput

pytestmark = pytest.mark.both_lines  # shared code whose libraries differ between the lines

REPO = Path(__file__).resolve().parents[2]
SYSTEM = {"role": "system", "content": "Answer with the words only."}


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(bundled_texts())


def conversation(turns: int, system: bool) -> list[dict[str, str]]:
    messages = [SYSTEM] if system else []
    for t in range(turns):
        messages += [
            {"role": "user", "content": f"Repeat the words.\nred owl {t}"},
            {"role": "assistant", "content": f"red owl {t}"},
        ]
    return messages


def supervised_runs(tok, ids: list[int], labels: list[int]) -> list[str]:
    """The decoded text of every maximal run of supervised tokens, in order."""
    runs, current = [], []
    for tid, label in zip(ids, labels):
        if label != IGNORE_INDEX:
            assert label == tid
            current.append(tid)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tok.decode(r) for r in runs]


@pytest.mark.parametrize("system", [False, True], ids=["no-system", "system"])
@pytest.mark.parametrize("turns", [1, 2, 3])
def test_every_assistant_reply_and_its_end_token_is_supervised_and_nothing_else(tok, turns, system):
    messages = conversation(turns, system)
    rendered = chat.render(tok, messages, TINY_CHAT_TEMPLATE)
    # Hand-computed: each reply's characters, then EOS, and the header before it is not in the span.
    for span, reply in zip(rendered.spans, [m["content"] for m in messages if m["role"] == "assistant"]):
        assert rendered.text[span[0] : span[1]] == reply + tok.eos_token
        assert rendered.text[: span[0]].endswith("### Response:\n")
    encoded = chat.encode(tok, rendered, max_len=4096)
    assert encoded.ids[0] == tok.bos_token_id and encoded.labels[0] == IGNORE_INDEX
    replies = [f"red owl {t}{tok.eos_token}" for t in range(turns)]
    assert supervised_runs(tok, encoded.ids, encoded.labels) == replies
    assert (encoded.dropped_turns, encoded.cut_tokens) == (0, False)
    # The evaluation prompt: everything up to the last reply, with the generation prompt; its reference.
    assert (
        rendered.prompt.endswith(f"red owl {turns - 1}\n### Response:\n")
        and rendered.answer == f"red owl {turns - 1}"
    )


@pytest.mark.parametrize("turns", [1, 2, 3])
def test_masks_equal_transformers_assistant_masks_on_a_template_with_generation_blocks(tok, turns):
    """transformers' `return_assistant_tokens_mask` (what TRL's assistant_only_loss uses) needs
    `{% generation %}` markers, which the tiny template has; trnft needs none and must agree with it."""
    messages = conversation(turns, system=turns == 2)
    theirs = tok.apply_chat_template(
        messages,
        chat_template=TINY_CHAT_TEMPLATE,
        tokenize=True,
        return_dict=True,
        return_assistant_tokens_mask=True,
    )
    ours = chat.encode(tok, chat.render(tok, messages, TINY_CHAT_TEMPLATE), max_len=4096)
    assert ours.ids == list(theirs["input_ids"])
    mask = [label != IGNORE_INDEX for label in ours.labels]
    assert mask[1:] == [bool(m) for m in theirs["assistant_masks"]][1:]
    assert sum(mask) > turns


def test_openai_exports_content_parts_and_the_developer_role():
    """What OpenAI-style exports write: content as a list of text parts (joined in order, never the list's
    repr) and the `developer` role (OpenAI's name for the system message)."""
    row = [
        {"role": "developer", "content": "Be brief."},
        {
            "role": "user",
            "content": [{"type": "text", "text": "What hoots "}, {"type": "text", "text": "at night?"}],
        },
        {"role": "assistant", "content": [{"type": "text", "text": "owl"}]},
        {"role": "user", "content": 42},
        {"role": "assistant", "content": "still owl"},
    ]
    messages = chat.parse(row, "openai", "role", "content")
    assert messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What hoots at night?"},
        {"role": "assistant", "content": "owl"},
        {"role": "user", "content": "42"},
        {"role": "assistant", "content": "still owl"},
    ]


def test_sharegpt_rows_and_custom_keys(tok):
    row = [
        {"from": "system", "value": "Be brief."},
        {"from": "human", "value": "Hi"},
        {"from": "gpt", "value": "owl"},
    ]
    role, content = chat.keys("sharegpt", None, None)
    messages = chat.parse(row, "sharegpt", role, content)
    assert [m["role"] for m in messages] == ["system", "user", "assistant"]
    custom = [{"speaker": "user", "text": "Hi"}, {"speaker": "assistant", "text": "owl"}]
    assert chat.parse(custom, "openai", *chat.keys("openai", "speaker", "text"))[1]["content"] == "owl"


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("hello", "the messages are a str, not a list (nor JSON text of one)"),
        ('{"role": "user"}', "the messages are a dict, not a list"),
        (None, "the messages are a NoneType, not a list"),
        ([{"role": "user"}], "message 0 is not an object with 'role' and 'content'"),
        ([{"role": "tool", "content": "x"}], "message 0 has unknown role 'tool'"),
        ([{"role": "user", "content": "x"}], "no assistant turn"),
        (
            [{"role": "user", "content": None}, {"role": "assistant", "content": "owl"}],
            "message 0 has content null (no text)",
        ),
        (
            [
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]},
                {"role": "assistant", "content": "owl"},
            ],
            "message 0, content part 0: a 'image_url' part; trnft trains on text only",
        ),
        (
            [{"role": "user", "content": ["plain"]}, {"role": "assistant", "content": "owl"}],
            "message 0, content part 0: a part that is not",
        ),
        (
            [{"role": "user", "content": {"text": "x"}}, {"role": "assistant", "content": "owl"}],
            "message 0 has content of type dict, not text",
        ),
    ],
)
def test_bad_conversations_are_refused_with_the_reason(value, reason):
    with pytest.raises(chat.BadConversation, match=reason.replace("(", r"\(").replace(")", r"\)")):
        chat.parse(value, "openai", "role", "content")


def test_a_template_that_fails_or_rewrites_earlier_turns_is_a_bad_row(tok):
    failing = "{{ raise_exception('only user and assistant roles') }}"
    with pytest.raises(chat.BadConversation, match=r"failed to render it .*only user and assistant roles"):
        chat.render(tok, conversation(1, False), failing)
    # Drops every assistant reply but the last, as some reasoning templates do with their thinking.
    rewriting = (
        "{% for m in messages %}{% if m['role'] != 'assistant' or loop.last %}{{ m['role'] + ': ' + m['content'] + '\\n' }}"
        "{% endif %}{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
    )
    with pytest.raises(chat.BadConversation, match="the chat template leaves out assistant message 1, so"):
        chat.render(tok, conversation(2, False), rewriting)
    twice = "{% for m in messages %}{{ m['content'] + ' ' + m['content'] + '\\n' }}{% endfor %}"
    with pytest.raises(chat.BadConversation, match="writes 2 copies of assistant message 1"):
        chat.render(tok, conversation(1, False), twice)


def test_too_long_conversations_lose_whole_turns_first_then_tokens(tok):
    rendered = chat.render(tok, conversation(3, True), TINY_CHAT_TEMPLATE)
    whole = chat.encode(tok, rendered, max_len=4096)
    first_end, second_end = [i + 1 for i in range(1, len(whole.ids)) if whole.ids[i] == tok.eos_token_id][:2]
    two = chat.encode(tok, rendered, max_len=second_end + 3)
    assert (two.dropped_turns, two.cut_tokens, len(two.ids)) == (1, False, second_end)
    assert supervised_runs(tok, two.ids, two.labels) == [f"red owl {t}{tok.eos_token}" for t in range(2)]
    tiny = chat.encode(tok, rendered, max_len=first_end - 1)
    assert tiny.cut_tokens and len(tiny.ids) == first_end - 1 and tiny.dropped_turns == 0


def _chat_config(run_config, tmp_path, rows: list | None = None, **dataset):
    path = bundled_chat_path()
    if rows is not None:
        path = tmp_path / "chat.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run_config(
        dataset={"files": [str(path)], "messages_field": "messages", "max_seq_length": 128, **dataset}
    )


def test_the_tokenize_stage_trains_on_assistant_turns_and_writes_chat_prompts(run_config, tmp_path):
    from transformers import AutoTokenizer

    cfg = load_config(_chat_config(run_config, tmp_path))
    lines = []
    result = run(cfg, log=lines.append)
    out = TokenizeOutput(result.path)
    assert out.info["chat"] is True
    tok = AutoTokenizer.from_pretrained(out.tokenizer_dir)
    ids, labels = (np.load(out.root / "train" / f"{k}.npy") for k in ("input_ids", "labels"))
    supervised = ids[labels != IGNORE_INDEX]
    # Only replies and their EOS are learned: no header or instruction token is ever a label.
    headers = set(tok("### Response:\n### Instruction:\nContext:", add_special_tokens=False)["input_ids"])
    assert not headers & set(supervised.tolist()) and tok.eos_token_id in supervised
    rows = [json.loads(line) for line in (out.root / "test.jsonl").read_text().splitlines()]
    assert rows and all(
        r["input"].startswith(tok.bos_token) and r["input"].endswith("### Response:\n") for r in rows
    )
    figures = TokenizeFigures.of(json.loads((out.root / "manifest.json").read_text()))
    assert figures.rows.dropped_bad_conversation == 0 and figures.rows.formatted == 350
    assert (
        any("train" in line and "at a turn boundary" in line for line in lines)
        or figures.train.truncated_turns == 0
    )


def test_unusable_rows_are_named_and_counted_and_too_many_stop_the_stage(run_config, tmp_path, capsys):
    good = json.loads(bundled_chat_path().read_text().splitlines()[0])
    rows = [good] * 40 + [{"messages": []}, {"messages": [{"role": "robot", "content": "x"}]}]
    lines: list[str] = []
    result = run(load_config(_chat_config(run_config, tmp_path, rows)), log=lines.append)
    assert "tokenize: row 40 dropped: no assistant turn" in lines
    assert any(
        line.startswith("tokenize: row 41 dropped: message 0 has unknown role 'robot'") for line in lines
    )
    assert (
        TokenizeFigures.of(
            json.loads((result.path / "manifest.json").read_text())
        ).rows.dropped_bad_conversation
        == 2
    )
    config = _chat_config(run_config, tmp_path, rows[:4] + rows[40:])
    code = cli.main(["tokenize", "--config", str(config), "--force"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1
    assert "2 of 6 rows cannot be used, more than dataset.max_bad_row_fraction=0.05 (first: row 4:" in err[0]


def test_a_tokenizer_without_a_chat_template_needs_one_named(run_config, tmp_path):
    with pytest.raises(TrnftError, match=r"dataset\.chat_template: the tokenizer has no chat template"):
        chat.load_template(None, _no_template())
    template_file = tmp_path / "t.jinja"
    template_file.write_text(TINY_CHAT_TEMPLATE)
    assert chat.load_template(str(template_file), _no_template()) == TINY_CHAT_TEMPLATE


def _no_template():
    tok = train_tokenizer(["a b c"])
    tok.chat_template = None
    return tok


def test_chat_prompts_get_no_second_bos_at_evaluation(tok):
    from trnft.common.evaluate import prompt_ids

    prompt = chat.render(tok, conversation(1, False), TINY_CHAT_TEMPLATE).prompt
    (ids,) = prompt_ids(tok, [prompt], special_tokens=False)
    assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id


def test_the_committed_chat_data_is_the_generators_output(tmp_path):
    script = REPO / "examples" / "data" / "generate_tiny_chat.py"
    committed = (REPO / "examples" / "data" / "tiny_chat.jsonl").read_text()
    subprocess.run([sys.executable, str(script)], check=True)
    assert (REPO / "examples" / "data" / "tiny_chat.jsonl").read_text() == committed
    counts = [
        len([m for m in json.loads(line)["messages"] if m["role"] == "assistant"])
        for line in committed.splitlines()
    ]
    assert {1, 2, 3} <= set(counts)


REAL_TEMPLATES = Path(__file__).with_name("chat_templates")


@pytest.mark.parametrize("template", ["llama3_training", "qwen2_5_training", "qwen3_instruct_2507_training"])
@pytest.mark.parametrize("system", [False, True], ids=["no-system", "system"])
@pytest.mark.parametrize("turns", [1, 2, 3])
def test_masks_match_trls_on_real_templates(tok, template, turns, system):
    """TRL's training variants of real templates (chat_templates/README.md) give transformers' assistant mask,
    what TRL's assistant_only_loss trains on. Llama 3: identical. Qwen: identical but for whitespace tokens
    at the edges of TRL's generation block, which trnft leaves out on purpose: the newline after
    `<|im_start|>assistant` that the generation prompt already wrote (Qwen 2.5's block starts before it), and
    the newline after `<|im_end|>`, which a model never generates (generation stops at `<|im_end|>`)."""
    text = (REAL_TEMPLATES / f"{template}.jinja").read_text()
    messages = conversation(turns, system)
    theirs = tok.apply_chat_template(
        messages, chat_template=text, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    ours = chat.encode(tok, chat.render(tok, messages, text), max_len=8192)
    assert ours.ids == list(theirs["input_ids"])
    mine = [label != IGNORE_INDEX for label in ours.labels]
    trl = [bool(m) for m in theirs["assistant_masks"]]
    differ = [i for i in range(1, len(mine)) if mine[i] != trl[i]]
    if template.startswith("llama3"):
        assert differ == []
    else:
        assert all(trl[i] and not mine[i] and tok.decode([ours.ids[i]]).strip() == "" for i in differ)
        assert 0 < len(differ) <= 2 * turns
    # Every reply's text is learned exactly once, whatever the template.
    learned = tok.decode([t for t, m in zip(ours.ids, mine) if m])
    assert all(f"red owl {t}" in learned for t in range(turns)) and "Repeat the words" not in learned


@pytest.mark.parametrize("kind", ["missing", "folder", "latin-1"])
def test_a_template_path_that_cannot_be_a_template_is_a_config_error(tmp_path, kind):
    from trnft.common.chat import load_template
    from trnft.common.errors import ConfigError

    path = tmp_path / "template.jinja"
    if kind == "folder":
        path.mkdir()
    elif kind == "latin-1":
        path.write_bytes("{{ messages }} caf\u00e9".encode("latin-1"))
    with pytest.raises(ConfigError) as refused:
        load_template(str(path), tokenizer=None)
    assert refused.value.exit_code == 2 and str(refused.value).startswith("dataset.chat_template:")
    assert "\n" not in str(refused.value)


@pytest.mark.parametrize(
    ("template", "words"),
    [
        ("{% for m in messages %}{{ m['content'] }", "Jinja syntax error at line 1"),
        ("line one\n{% if messages %}{{ messages[0]['content'] }}", "Jinja syntax error at line 2"),
    ],
)
def test_a_template_that_does_not_compile_is_a_config_error_not_dropped_rows(
    run_config, capsys, template, words
):
    """Every row would fail the same way: one line naming dataset.chat_template, exit 2, nothing written."""
    from trnft.common import cli
    from trnft.common.testing.fixtures import bundled_chat_path

    config = run_config(dataset={"files": [str(bundled_chat_path())], "messages_field": "messages",
                                 "chat_template": template})  # fmt: skip
    assert cli.main(["tokenize", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "dataset.chat_template: " + words in err, err
    assert "dropped" not in err


# A template in the manner of Phi-3.5-mini's: each turn closes with <|end|>, and the conversation ends with
# eos_token only when no generation prompt follows, so the rendering through turn 1 ends "<|end|>\n" + eos
# while the whole conversation goes on with the next user turn there.
EOS_WHEN_CLOSED = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' + m['content'] + '<|end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}{% endif %}"
)


def test_a_template_that_closes_only_the_last_turn_with_eos_masks_every_turn(tok):
    """Multi-turn rows of such a template were refused ("rewrites earlier turns"). Each reply and its <|end|>
    is learned; the eos only where the conversation ends; user turns never."""
    messages = conversation(3, True)
    rendered = chat.render(tok, messages, EOS_WHEN_CLOSED)
    learned = [rendered.text[a:b] for a, b in rendered.spans]
    assert learned == [f"red owl {t}<|end|>" for t in range(2)] + [f"red owl 2<|end|>\n{tok.eos_token}"]
    assert rendered.prompt.endswith("<|user|>\nRepeat the words.\nred owl 2<|end|>\n<|assistant|>\n")
    # every learned span starts right after its assistant header: no user or system text is learned
    assert all(rendered.text[:a].endswith("<|assistant|>\n") for a, _ in rendered.spans)


def test_a_template_whose_scaffolding_depends_on_the_message_text_is_refused_with_that_reason(tok):
    """Writes a marker before a message only when its text has a word: the rendering is no longer the
    template's text around the messages, so the reply cannot be located (what stands in its place is not
    its text); the row is refused, saying so, and no user text is trained."""
    marker_by_text = (
        "{% for m in messages %}{% if 'owl' in m['content'] %}[OWL]{% endif %}{{ m['content'] + '\\n' }}"
        "{% endfor %}"
    )
    with pytest.raises(
        chat.BadConversation, match="writes assistant message 1 as text that is not the message"
    ):
        chat.render(tok, conversation(1, False), marker_by_text)


# Each shipped template's special tokens, as its model's tokenizer has them (the test tokenizer learns them
# as added special tokens), and the text that closes a reply in the middle and at the end of a conversation.
SHIPPED = {
    "microsoft-Phi-3.5-mini-instruct": {
        "tokens": ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<|endoftext|>"],
        "eos": "<|endoftext|>",
        "bos": None,
        "close": "<|end|>",
        "close_last": "<|end|>\n<|endoftext|>",
    },
    "mistralai-Mistral-Nemo-Instruct-2407": {
        "tokens": ["[INST]", "[/INST]"],
        "eos": "</s>",
        "bos": "<s>",
        "close": "</s>",
        "close_last": "</s>",
    },
    "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B": {
        "tokens": ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>"],
        "eos": "<｜end▁of▁sentence｜>",
        "bos": "<｜begin▁of▁sentence｜>",
        "close": "<｜end▁of▁sentence｜>",
        "close_last": "<｜end▁of▁sentence｜>",
    },
}


def shipped_tokenizer(name: str):
    spec = SHIPPED[name]
    tok = train_tokenizer(bundled_texts())
    tok.add_tokens(spec["tokens"], special_tokens=True)
    tok.eos_token = spec["eos"]
    if spec["bos"]:
        tok.bos_token = spec["bos"]
    return tok


def learned_runs(tok, rendered) -> list[str]:
    encoded = chat.encode(tok, rendered, max_len=8192)
    assert encoded.ids == tok.backend_tokenizer.encode(rendered.text, add_special_tokens=False).ids
    return supervised_runs(tok, encoded.ids, encoded.labels)


@pytest.mark.parametrize("template", sorted(SHIPPED))
@pytest.mark.parametrize("system", [False, True], ids=["no-system", "system"])
@pytest.mark.parametrize("turns", [1, 2, 3])
def test_shipped_templates_train_every_reply_and_its_end_of_turn_only(template, turns, system):
    """Phi-3.5 (eos only at the very end), Mistral Nemo (system text inside the last user turn) and
    DeepSeek-R1 (generation prompt opens <think>) were refused before on every multi-turn row (or every
    row). The reference is written out per turn: each reply, then its end-of-turn text; nothing else."""
    spec, tok = SHIPPED[template], shipped_tokenizer(template)
    text = (REAL_TEMPLATES / f"{template}.jinja").read_text()
    messages = conversation(turns, system)
    rendered = chat.render(tok, messages, text)
    expected = [f"red owl {t}{spec['close']}" for t in range(turns - 1)]
    expected.append(f"red owl {turns - 1}{spec['close_last']}")
    assert learned_runs(tok, rendered) == expected
    assert rendered.text == tok.apply_chat_template(messages, tokenize=False, chat_template=text)
    assert rendered.prompt == tok.apply_chat_template(
        messages[:-1], tokenize=False, add_generation_prompt=True, chat_template=text
    )
    assert rendered.answer == f"red owl {turns - 1}"
    assert (rendered.reasoning_dropped, rendered.rewritten) == (0, 0)
    if system and template.startswith("mistralai"):
        # Nemo writes the system message only into the last user turn of a conversation ending with one:
        # the prompt has it, the training text does not, and that is counted, not silent.
        assert rendered.left_out == 1 and SYSTEM["content"] not in rendered.text
        assert SYSTEM["content"] in rendered.prompt
    elif system:  # the system text is in the rendering, never learned
        assert SYSTEM["content"] in rendered.text and rendered.left_out == 0


def reasoning_conversation(turns: int) -> list[dict[str, str]]:
    messages = []
    for t in range(turns):
        messages += [
            {"role": "user", "content": f"Repeat the words.\nred owl {t}"},
            {"role": "assistant", "content": f"<think>\nThe words are red owl {t}.\n</think>\n\nred owl {t}"},
        ]
    return messages


@pytest.mark.parametrize("turns", [1, 2])
def test_reasoning_the_template_drops_is_counted_and_trained_with_keep_reasoning(turns):
    """DeepSeek-R1's template writes only what follows </think>: by default that is trained (and is the
    evaluation reference) and every such turn is counted; with keep_reasoning the last reply's reasoning is
    trained too, after the <think> that the generation prompt already opens."""
    name = "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B"
    tok, text = shipped_tokenizer(name), (REAL_TEMPLATES / f"{name}.jinja").read_text()
    close = SHIPPED[name]["close"]
    messages = reasoning_conversation(turns)

    dropped = chat.render(tok, messages, text)
    assert (dropped.reasoning_dropped, dropped.reasoning_kept) == (turns, 0)
    assert learned_runs(tok, dropped) == [f"\n\nred owl {t}{close}" for t in range(turns)]
    assert "The words are" not in dropped.text and dropped.answer == f"\n\nred owl {turns - 1}"

    # The last reply is trained as the model should produce it; earlier ones as the template writes them
    # (as they are when a later turn is generated), so the prompt is the text before the last reply.
    kept = chat.render(tok, messages, text, keep_reasoning=True)
    assert (kept.reasoning_dropped, kept.reasoning_kept) == (turns - 1, 1)
    reasoning = f"The words are red owl {turns - 1}.\n</think>\n\nred owl {turns - 1}"
    earlier = [f"\n\nred owl {t}{close}" for t in range(turns - 1)]
    assert learned_runs(tok, kept) == [*earlier, f"{reasoning}{close}"]
    assert kept.prompt.endswith("<｜Assistant｜><think>\n") and kept.answer == reasoning
    assert kept.text == kept.prompt + kept.answer + close


def test_an_empty_assistant_turn_in_the_middle_keeps_the_rest_of_the_conversation(tok):
    messages = conversation(3, False)
    messages[3]["content"] = ""
    rendered = chat.render(tok, messages, TINY_CHAT_TEMPLATE)
    assert rendered.empty == 1 and len(rendered.spans) == 2
    runs = learned_runs(tok, rendered)
    assert [r.startswith(f"red owl {t}") for r, t in zip(runs, (0, 2))] == [True, True]
    with pytest.raises(chat.BadConversation, match="no assistant turn with text"):
        chat.render(
            tok, [{"role": "user", "content": "x"}, {"role": "assistant", "content": " "}], TINY_CHAT_TEMPLATE
        )


def test_a_template_that_changes_the_case_of_replies_is_counted_and_evaluated_as_trained(tok):
    lower = (
        "{% for m in messages %}{{ '<' + m['role'] + '>' }}{% if m['role'] == 'assistant' %}"
        "{{ m['content'] | lower }}{% else %}{{ m['content'] }}{% endif %}{{ eos_token }}{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    messages = [{"role": "user", "content": "Say it."}, {"role": "assistant", "content": "Red Owl"}]
    rendered = chat.render(tok, messages, lower)
    assert rendered.rewritten == 1 and rendered.answer == "red owl"
    assert learned_runs(tok, rendered) == [f"red owl{tok.eos_token}"]


# DeepSeek-R1's handling of reasoning in the test tokenizer's tokens: each reply loses what precedes
# </think>, and the generation prompt opens <think>.
STRIPS_REASONING = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ '### Instruction:\\n' + m['content'] + '\\n' }}"
    "{% else %}{{ '### Response:\\n' + m['content'].split('</think>')[-1] + eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Response:\\n<think>\\n' }}{% endif %}"
)


def test_the_stage_renders_in_num_proc_workers_and_reports_what_the_template_dropped(
    run_config, tmp_path, monkeypatch
):
    """The same arrays and texts from 1 or 2 rendering processes; the reasoning the template leaves out is
    counted in the manifest and said in the log; keep_reasoning changes the output (a rerun redoes it)."""
    from trnft.common import tokenize as stage

    monkeypatch.setattr(stage, "RENDER_CHUNK", 16)  # 80 rows make 5 chunks: a real pool of 2
    rows = [{"messages": reasoning_conversation(1 + i % 3)} for i in range(80)]
    outputs, workers, figures, logs = [], [], [], []
    for num_proc, keep in ((1, False), (2, False), (2, True)):
        config = _chat_config(run_config, tmp_path, rows, num_proc=num_proc, chat_template=STRIPS_REASONING,
                              keep_reasoning=keep)  # fmt: skip
        lines: list[str] = []
        result = run(load_config(config, [f"run.root={tmp_path}/r{num_proc}{keep}"]), log=lines.append)
        fig = TokenizeFigures.of(result.manifest)
        out = TokenizeOutput(result.path)
        outputs.append(
            (out.split("train").rows(range(len(out.split("train")))), out.text("test").read_text())
        )
        workers.append(fig.train.tokenize_workers)
        figures.append(fig.rows.chat)
        logs.append(lines)
    assert workers == [1, 2, 2]
    for name, array in outputs[0][0].items():
        assert np.array_equal(array, outputs[1][0][name])
    assert outputs[0][1] == outputs[1][1]
    turns = sum(1 + i % 3 for i in range(80))
    assert (
        figures[0].reasoning_dropped_turns == turns and figures[0].first_rows["reasoning_dropped_turns"] == 0
    )
    assert any("leaves out the reasoning" in line and "keep_reasoning" in line for line in logs[0])
    assert (figures[2].reasoning_kept_turns, figures[2].reasoning_dropped_turns) == (80, turns - 80)
    assert "The words are" in outputs[2][1] and "The words are" not in outputs[0][1]
