"""The model checks every trainer makes before any weight loads (one line each, naming the key).

The FSDP2 trainer (:func:`trnft.common.fsdp.trainer.check`), the CPU-XLA trainer
(:meth:`trnft.neuron.xla_trainer.XlaTrainer.check`) and the NeuronTrainer path
(:func:`trnft.neuron.trainium.check_settings`) read the base model's config through
:func:`base_model_config`; the two trainers that read the tokenized data check it against the model
with :func:`check_model_takes_the_data`. What only one trainer needs (its layout, its targets) stays
with it.
"""

from __future__ import annotations

from typing import Any

from ..config.run_config import RunConfig
from ..errors import TrnftError
from .data import TokenizeOutput


def base_model_config(cfg: RunConfig) -> Any:
    """The base model's ``PretrainedConfig`` (no weights), or one line naming ``model.name_or_path``."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(
            cfg.model.name_or_path, revision=cfg.model.revision, trust_remote_code=cfg.model.trust_remote_code
        )
    except Exception as exc:  # transformers raises OSError, ValueError, ... for a bad path or config
        raise TrnftError(
            f"model.name_or_path: cannot load the model config of {cfg.model.name_or_path!r} ({exc})"
        ) from exc


def check_model_takes_the_data(cfg: RunConfig, tokenized: TokenizeOutput) -> Any:
    """The base model's config, after checking that it can train on the tokenize stage's output: every
    token id inside its vocabulary, and at least one training sequence."""
    config = base_model_config(cfg)
    if tokenized.info["vocab_size"] > config.vocab_size:
        raise TrnftError(
            f"model.name_or_path: the tokenizer has {tokenized.info['vocab_size']} tokens but the model's vocabulary "
            f"is {config.vocab_size}; retokenize with a pad token inside the vocabulary (dataset.pad_token)"
        )
    if len(tokenized.split("train")) == 0:
        raise TrnftError("tokenize produced no training sequences; check the dataset and templates")
    return config
