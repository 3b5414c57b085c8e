"""Which files make up a Hugging Face tokenizer and model folder, and copying them between stages.

One list for every stage that carries a tokenizer along (train checkpoints, consolidate, merge) and for
the input digests, so a tokenizer file one stage copies is never one another forgets.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable
from pathlib import Path

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
)
MODEL_CONFIG_FILES = ("config.json", "generation_config.json")


def copy_present(
    names: Iterable[str], sources: Iterable[Path], dst: Path, *, overwrite: bool = False
) -> list[str]:
    """Copy each file of ``names`` from the first source folder that has it; returns what was copied.

    Without ``overwrite`` a file already in ``dst`` is kept.
    """
    sources = list(sources)
    copied = []
    for name in names:
        if not overwrite and (dst / name).exists():
            continue
        for folder in sources:
            if (folder / name).is_file():
                shutil.copy2(folder / name, dst / name)
                copied.append(name)
                break
    return copied
