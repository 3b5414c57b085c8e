"""Tiny real models for tests and the smoke run: real transformers configs, a locally trained tokenizer.

Nothing is downloaded. :func:`build_tiny_model` writes a Hugging Face model folder (``config.json``,
``model.safetensors``, ``generation_config.json`` and tokenizer files) for a few-layer Llama (with GQA),
Qwen3 or Mistral with random weights; the tokenizer is a byte-level BPE trained with ``tokenizers`` on the
bundled dataset, with distinct ``<pad>``, ``<s>`` (BOS) and ``</s>`` (EOS) tokens and no chat template.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"


@dataclass(frozen=True)
class TinyShape:
    """Architecture knobs of a tiny model; the defaults give a 2-layer GQA model with hidden 128.

    ``initializer_range`` 0.3 gives weights at the scale of a trained model. At transformers' default
    0.02 a frozen RMSNorm + lm_head cap the logits near +-1.3, so a LoRA adapter on such a random base
    cannot get below about 5.5 nats on the bundled tasks, while at 0.3 it learns them (about 0.3 after
    300 steps), which makes the smoke run's loss curve and evaluation scores mean something.
    """

    hidden_size: int = 128
    intermediate_size: int = 256
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 1024
    tie_word_embeddings: bool = False
    initializer_range: float = 0.3


def bundled_dataset_path() -> Path:
    """The committed tiny instruction dataset (jsonl, Dolly-style columns)."""
    return Path(str(resources.files("trnft.examples") / "data" / "tiny_instructions.jsonl"))


def bundled_chat_path() -> Path:
    """The same data as conversations (``messages``, OpenAI format; examples/data/generate_tiny_chat.py)."""
    return Path(str(resources.files("trnft.examples") / "data" / "tiny_chat.jsonl"))


def bundled_texts() -> list[str]:
    rows = [json.loads(line) for line in bundled_dataset_path().read_text().splitlines() if line.strip()]
    return [" ".join(str(r[k]) for k in ("instruction", "context", "response")) for r in rows]


# The tiny tokenizer's chat template (trnft's own): BOS, then each turn under an instruction-style header the
# tokenizer has as tokens; assistant replies end with EOS and are marked as generation blocks, so
# transformers' assistant mask can be compared with trnft's. Used by `trnft smoke --chat`.
TINY_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'assistant' %}{{ '### Response:\n' }}"
    "{% generation %}{{ m['content'] + eos_token }}{% endgeneration %}{{ '\n' }}"
    "{% elif m['role'] == 'system' %}{{ 'Context: ' + m['content'] + '\n' }}"
    "{% else %}{{ '### Instruction:\n' + m['content'] + '\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '### Response:\n' }}{% endif %}"
)


def train_tokenizer(texts: Iterable[str], vocab_size: int = 512) -> Any:
    """A byte-level BPE ``PreTrainedTokenizerFast`` that prepends BOS; pad, BOS, EOS are distinct."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, BOS, EOS, UNK],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Instruction-style headers so that common template words are single tokens too.
    extra = ["### Instruction:", "### Input:", "### Response:", "Question:", "Answer:", "Context:"]
    tok.train_from_iterator([*texts, *extra], trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK, padding_side="right"
    )
    fast.model_max_length = 1 << 20
    fast.chat_template = TINY_CHAT_TEMPLATE
    return fast


def _round_up(n: int, multiple: int) -> int:
    return (n + multiple - 1) // multiple * multiple


# Families only transformers 5 has (the current line): built on demand, their config classes do not exist
# in the trn1 line's transformers 4.57.1.
CURRENT_LINE_FAMILIES = ("ministral3", "gemma4")
CAUSAL_LM_CLASSES = {
    "llama": "LlamaForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "mistral": "MistralForCausalLM",
    "ministral3": "Ministral3ForCausalLM",
    "gemma4": "Gemma4ForCausalLM",
}


def tiny_config(family: str, vocab_size: int, shape: TinyShape, tokenizer: Any) -> Any:
    """A transformers config of ``family`` (llama, qwen3, mistral; ministral3 and gemma4 on transformers 5)
    with tiny dimensions."""
    import transformers

    head_dim = shape.hidden_size // shape.num_attention_heads
    common = dict(
        vocab_size=vocab_size,
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_key_value_heads,
        max_position_embeddings=shape.max_position_embeddings,
        tie_word_embeddings=shape.tie_word_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        rms_norm_eps=1e-5,
        initializer_range=shape.initializer_range,
    )
    builders = {
        "llama": lambda: transformers.LlamaConfig(**common, rope_theta=10000.0),  # type: ignore[call-arg]
        "qwen3": lambda: transformers.Qwen3Config(**common, head_dim=head_dim),
        "mistral": lambda: transformers.MistralConfig(**common, sliding_window=None),
        # Ministral 3 (2025-12): Mistral's dense decoder with YaRN RoPE and llama-4 attention scaling.
        "ministral3": lambda: transformers.Ministral3Config(**common, head_dim=head_dim),
        # Gemma 4 text (2026): sliding and global attention layers, per-layer input embeddings, q/k norms.
        "gemma4": lambda: transformers.Gemma4TextConfig(  # type: ignore[call-arg]  # kwargs of PreTrainedConfig
            **common,
            head_dim=head_dim,
            global_head_dim=head_dim,
            sliding_window=64,
            layer_types=["sliding_attention"] * (shape.num_hidden_layers - 1) + ["full_attention"],
            vocab_size_per_layer_input=vocab_size,
            hidden_size_per_layer_input=16,
        ),
    }
    if family not in builders:
        raise ValueError(f"unknown tiny model family {family!r}; choose from {sorted(builders)}")
    if family in CURRENT_LINE_FAMILIES and int(transformers.__version__.split(".")[0]) < 5:
        raise ValueError(f"tiny model family {family!r} needs transformers 5 (the current line)")
    config = builders[family]()
    config.architectures = [CAUSAL_LM_CLASSES[family]]
    return config


def build_tiny_model(
    out_dir: str | Path,
    family: str = "llama",
    *,
    shape: TinyShape | None = None,
    seed: int = 0,
    dtype: str = "float32",
    tokenizer: Any = None,
    vocab_multiple: int = 64,
) -> Path:
    """Write a tiny random model folder and return its path.

    The vocabulary is the tokenizer's, rounded up to ``vocab_multiple`` so that every tensor-parallel
    degree up to 64 divides it (as NxD requires for vocab-parallel embeddings).
    """
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    shape = shape or TinyShape()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = tokenizer or train_tokenizer(bundled_texts())
    config = tiny_config(family, _round_up(len(tokenizer), vocab_multiple), shape, tokenizer)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
    )
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out
