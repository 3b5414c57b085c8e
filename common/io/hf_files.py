"""Which files make up a Hugging Face tokenizer and model folder, and copying them between stages.

One list for every stage that carries a tokenizer along (train checkpoints, consolidate, merge) and for
the input digests, so a tokenizer file one stage copies is never one another forgets.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable
from pathlib import Path

from ..errors import TrnftError

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


def resolve_model_dir(name_or_path: str, revision: str | None = None) -> Path:
    """A local folder with the model files: the path itself, or the hub snapshot (cached or downloaded)."""
    p = Path(name_or_path)
    if p.is_dir():
        return p
    if name_or_path.startswith((".", "/", "~")):
        raise TrnftError(f"model.name_or_path: {name_or_path} is not a folder")
    from huggingface_hub import snapshot_download

    try:
        return Path(
            snapshot_download(
                name_or_path,
                revision=revision,
                allow_patterns=["*.safetensors", "*.json", "tokenizer*", "*.model", "*.txt", "*.jinja"],
            )
        )
    except Exception as exc:
        raise TrnftError(
            f"model.name_or_path: cannot get {name_or_path!r} from the hub or its cache ({exc})"
        ) from exc
