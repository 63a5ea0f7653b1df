"""`lmforge eval`: run tasks on a model and write the numbers with everything needed to trust them
(model, data file hash, settings, time taken)."""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from lmforge.errors import LmforgeError
from lmforge.eval import metrics as M
from lmforge.eval.perplexity import shard_perplexity, text_perplexity
from lmforge.eval.scoring import encode_text, loglikelihood
from lmforge.eval.tasks import (
    detect_task_type,
    file_sha256,
    load_choice_task,
    load_generation_task,
    load_texts,
    with_fewshot,
)
from lmforge.model import Transformer
from lmforge.options import option, validate
from lmforge.progress import Progress


@dataclass
class EvalSettings:
    batch_size: int = option(8, "sequences scored per forward pass")
    limit: int | None = option(None, "evaluate the first N examples only")
    num_fewshot: int = option(0, "multiple choice: examples shown before each question")
    fewshot_file: str | None = option(None, "multiple-choice JSONL the few-shot examples are drawn from")
    seed: int = option(0, "seed for drawing few-shot examples and for sampling")
    max_length: int | None = option(None, "context length for scoring (default: the model's)")
    stride: int | None = option(None, "perplexity: tokens predicted per window (default: the max length)")
    max_new_tokens: int = option(64, "generation tasks: tokens to generate at most")
    temperature: float | None = option(None, "generation tasks: sample at this temperature (default: greedy)")
    generation: dict[str, Any] = field(default_factory=dict)  # extra lmforge.generate options (library callers)
    progress: bool = True

    def __post_init__(self) -> None:
        validate(self)
        if self.batch_size <= 0 or (self.limit is not None and self.limit <= 0) or self.num_fewshot < 0:
            raise LmforgeError("batch_size and limit must be positive and num_fewshot >= 0.")
        if self.temperature is not None and not self.temperature >= 0:
            raise LmforgeError(f"temperature must be >= 0 (0 is greedy), got {self.temperature}.")

    def generation_options(self) -> dict[str, Any]:
        """The lmforge.generate options of generation tasks: sampling when a temperature > 0 is set."""
        options = dict(self.generation)
        if self.temperature is not None:
            options.update(do_sample=self.temperature > 0, temperature=self.temperature, seed=self.seed)
        return options


@dataclass
class TaskResult:
    task: str
    type: str
    file: str
    sha256: str
    examples: int
    metrics: dict[str, float]
    seconds: float
    samples: list[dict[str, Any]] = field(default_factory=list)


def run_task(
    model: Transformer, tokenizer: Any, task: str, s: EvalSettings, task_type: str | None = None
) -> TaskResult:
    path = Path(task)
    if not path.exists():
        raise LmforgeError(f"task {task!r} is not a file or directory; pass a JSONL/text file or prepared shards.")
    kind = task_type or detect_task_type(path)
    if kind not in ("choice", "generation", "perplexity"):
        raise LmforgeError(f"unknown task type {kind!r}; use choice, generation or perplexity.")
    started = time.perf_counter()
    if kind == "choice":
        metrics, n, samples = _choice(model, tokenizer, path, s)
    elif kind == "generation":
        metrics, n, samples = _generation(model, tokenizer, path, s)
    else:
        metrics, n, samples = _perplexity(model, tokenizer, path, s)
    digest = file_sha256(path / "index.json") if path.is_dir() else file_sha256(path)
    return TaskResult(path.stem, kind, str(path), digest, n, metrics, time.perf_counter() - started, samples)


def _choice(model: Transformer, tokenizer: Any, path: Path, s: EvalSettings) -> tuple[dict, int, list]:
    examples = load_choice_task(path)[: s.limit]
    shots = load_choice_task(Path(s.fewshot_file)) if s.fewshot_file else []
    if s.num_fewshot and not shots:
        raise LmforgeError("--num-fewshot needs --fewshot-file: few-shot examples come from a separate split.")
    rng = random.Random(s.seed)
    contexts = [with_fewshot(ex, shots, s.num_fewshot, rng) for ex in examples]
    requests = [(ctx, choice) for ctx, ex in zip(contexts, examples, strict=True) for choice in ex.choices]
    scores = loglikelihood(model, tokenizer, requests, s.batch_size, s.max_length, s.progress)
    acc, acc_norm, confidences, correct, samples = [], [], [], [], []
    k = 0
    for ex in examples:
        lls = [sc.logprob for sc in scores[k : k + len(ex.choices)]]
        k += len(ex.choices)
        pick = max(range(len(lls)), key=lls.__getitem__)
        pick_norm = max(range(len(lls)), key=lambda i: lls[i] / len(ex.choices[i]))
        probs = M.softmax(lls)
        acc.append(float(pick == ex.answer))
        acc_norm.append(float(pick_norm == ex.answer))
        confidences.append(probs[pick])
        correct.append(pick == ex.answer)
        samples.append({"answer": ex.answer, "pred": pick, "pred_norm": pick_norm, "loglikelihoods": lls})
    n = len(examples)
    return (
        {
            "acc": sum(acc) / n,
            "acc_stderr": M.stderr_of_mean(acc),
            "acc_norm": sum(acc_norm) / n,
            "acc_norm_stderr": M.stderr_of_mean(acc_norm),
            "calibration_error": M.expected_calibration_error(confidences, correct),
        },
        n,
        samples,
    )


def _generation(model: Transformer, tokenizer: Any, path: Path, s: EvalSettings) -> tuple[dict, int, list]:
    from lmforge.generate.api import generate

    examples = load_generation_task(path)[: s.limit]
    options = {"max_new_tokens": s.max_new_tokens, "eos_token_id": tokenizer.stop_token_ids, **s.generation_options()}
    predictions: list[str] = []
    with Progress(len(examples), "generate", unit="ex", enabled=s.progress) as bar:
        for start in range(0, len(examples), s.batch_size):
            chunk = examples[start : start + s.batch_size]
            prompts = [encode_text(tokenizer, ex.prompt) for ex in chunk]
            outputs = generate(model, prompts, tokenizer=tokenizer, **options)
            predictions += [tokenizer.decode(o, skip_special_tokens=True).strip() for o in outputs]
            bar.update(len(chunk))
    refs = [ex.references for ex in examples]
    samples = [
        {"prompt": ex.prompt, "prediction": p, "references": list(ex.references)}
        for ex, p in zip(examples, predictions, strict=True)
    ]
    return (
        {
            "exact_match": M.exact_match(predictions, refs),
            "bleu": M.bleu(predictions, refs),
            "rouge_l": M.rouge_l(predictions, refs),
            "distinct_1": M.distinct_n(predictions, 1),
            "distinct_2": M.distinct_n(predictions, 2),
            "self_bleu": M.self_bleu(predictions),
        },
        len(examples),
        samples,
    )


def _perplexity(model: Transformer, tokenizer: Any, path: Path, s: EvalSettings) -> tuple[dict, int, list]:
    max_length = s.max_length or model.config.max_position_embeddings
    if path.is_dir():
        from lmforge.data.shards import TokenShards, has_split

        split = "val" if has_split(path, "val") else "train"
        result = shard_perplexity(
            model, TokenShards(path, split), max_length, s.stride, s.batch_size, progress=s.progress
        )
    else:
        texts = load_texts(path)[: s.limit]
        result = text_perplexity(model, tokenizer, texts, max_length, s.stride, s.batch_size, s.progress)
    return result.metrics(), result.documents, []


def write_results(results: list[TaskResult], model_path: str, settings: EvalSettings, out: Path) -> tuple[Path, Path]:
    """JSON (everything, with per-example samples) and a short markdown report."""
    from lmforge import __version__

    out.mkdir(parents=True, exist_ok=True)
    payload = {
        "model": model_path,
        "lmforge_version": __version__,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "settings": asdict(settings),
        "results": [asdict(r) for r in results],
    }
    json_path, md_path = out / "results.json", out / "report.md"
    tmp = json_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    tmp.replace(json_path)
    md_path.write_text(format_table(results, markdown=True, model=model_path) + "\n")
    return json_path, md_path


def format_table(results: list[TaskResult], markdown: bool = False, model: str = "") -> str:
    lines = [f"# lmforge eval: {model}", ""] if markdown else []
    lines += ["| task | type | n | metric | value |", "|---|---|---|---|---|"]
    for r in results:
        for name, value in r.metrics.items():
            if name.endswith("_stderr") or name in ("tokens", "bytes", "words"):
                continue
            stderr = r.metrics.get(f"{name}_stderr")
            shown = f"{value:.4f}" + (f" ± {stderr:.4f}" if stderr is not None else "")
            lines.append(f"| {r.task} | {r.type} | {r.examples} | {name} | {shown} |")
    if markdown:
        lines += ["", "| task | file | sha256 | seconds |", "|---|---|---|---|"]
        lines += [f"| {r.task} | {r.file} | {r.sha256[:16]} | {r.seconds:.1f} |" for r in results]
    return "\n".join(lines)
