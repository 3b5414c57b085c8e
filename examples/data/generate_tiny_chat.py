"""Write ``tiny_chat.jsonl``: the bundled instruction data as conversations, for `trnft smoke --chat`.

Each row of ``tiny_instructions.jsonl`` becomes a user turn (instruction and words) and an assistant turn (the
response). Every third conversation starts with a system turn; every fourth row is joined to the next
one or two rows as a multi-turn conversation, so assistant-only masking covers 1-, 2- and 3-turn
conversations with and without a system prompt. OpenAI message format (``messages: [{role, content}]``).

Run ``python examples/data/generate_tiny_chat.py`` to regenerate; a test checks that the committed file
equals this script's output.
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).parent
SYSTEM = "Answer with the words only."


def conversations(rows: list[dict]) -> list[dict]:
    out, i, n = [], 0, 0
    while i < len(rows):
        turns = 1 + (n % 4 == 3) + (n % 8 == 7)  # 1, or 2 and 3 turns now and then
        messages = [{"role": "system", "content": SYSTEM}] if n % 3 == 0 else []
        for row in rows[i : i + turns]:
            messages.append({"role": "user", "content": f"{row['instruction']}\n{row['context']}"})
            messages.append({"role": "assistant", "content": row["response"]})
        out.append({"messages": messages})
        i, n = i + turns, n + 1
    return out


def main() -> None:
    rows = [json.loads(line) for line in (HERE / "tiny_instructions.jsonl").read_text().splitlines()]
    text = "".join(json.dumps(c, ensure_ascii=False) + "\n" for c in conversations(rows))
    (HERE / "tiny_chat.jsonl").write_text(text)


if __name__ == "__main__":
    main()
