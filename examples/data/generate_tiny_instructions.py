"""Write ``tiny_instructions.jsonl``: the bundled instruction dataset of the smoke run and the tests.

Dolly-style columns (``instruction``, ``context``, ``response``, ``category``). Every response is a
deterministic function of the context words, so a tiny model learns the tasks within a few hundred steps
and evaluation scores mean something (a random model scores near zero, a trained one clearly higher).

Run ``python examples/data/generate_tiny_instructions.py`` to regenerate; a test checks that the
committed file equals this script's output.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

SEED = 20261121
ROWS_PER_TASK = 60

COLORS = ["red", "blue", "green", "yellow", "black", "white", "pink", "brown"]
ANIMALS = ["cat", "dog", "fox", "owl", "bee", "cow", "pig", "hen"]
FRUITS = ["apple", "pear", "plum", "lime", "fig", "kiwi", "grape", "melon"]
WORDS = COLORS + ANIMALS + FRUITS
NUMBER_WORDS = {2: "two", 3: "three", 4: "four", 5: "five", 6: "six"}


def _words(rng: random.Random, low: int = 3, high: int = 5) -> list[str]:
    return rng.sample(WORDS, rng.randint(low, high))


def _reverse(rng):
    w = _words(rng)
    return "Reverse the order of the words.", " ".join(w), " ".join(reversed(w))


def _first(rng):
    w = _words(rng)
    return "What is the first word?", " ".join(w), w[0]


def _last(rng):
    w = _words(rng)
    return "What is the last word?", " ".join(w), w[-1]


def _count(rng):
    w = _words(rng, 2, 6)
    return "How many words are there?", " ".join(w), NUMBER_WORDS[len(w)]


def _upper(rng):
    w = _words(rng, 2, 4)
    return "Write the words in capital letters.", " ".join(w), " ".join(x.upper() for x in w)


def _repeat(rng):
    w = _words(rng)
    return "Repeat the words.", " ".join(w), " ".join(w)


def _animal(rng):
    animal = rng.choice(ANIMALS)
    others = rng.sample(COLORS + FRUITS, rng.randint(2, 4))
    w = [*others, animal]
    rng.shuffle(w)
    return "Which word is an animal?", " ".join(w), animal


def _sort(rng):
    w = _words(rng, 3, 4)
    return "Sort the words alphabetically.", " ".join(w), " ".join(sorted(w))


TASKS = {
    "reverse": _reverse,
    "first_word": _first,
    "last_word": _last,
    "count": _count,
    "uppercase": _upper,
    "repeat": _repeat,
    "find_animal": _animal,
    "sort": _sort,
}


def generate() -> list[dict[str, str]]:
    """All rows, in a fixed shuffled order."""
    rng = random.Random(SEED)
    rows = []
    for category, make in TASKS.items():
        for _ in range(ROWS_PER_TASK):
            instruction, context, response = make(rng)
            rows.append(
                {"instruction": instruction, "context": context, "response": response, "category": category}
            )
    rng.shuffle(rows)
    return rows


def render(rows: list[dict[str, str]]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


OUTPUT = Path(__file__).with_name("tiny_instructions.jsonl")

if __name__ == "__main__":
    OUTPUT.write_text(render(generate()))
    print(f"wrote {OUTPUT} ({len(generate())} rows)")
