"""Metrics over model outputs: accuracy and calibration for multiple choice, and text-generation metrics
(exact match, BLEU via sacrebleu, ROUGE-L via rouge-score, distinct-n and self-BLEU for diversity)."""

from __future__ import annotations

import math
from collections.abc import Sequence

from lmforge.errors import LmforgeError


def softmax(values: Sequence[float]) -> list[float]:
    top = max(values)
    exps = [math.exp(v - top) for v in values]
    total = sum(exps)
    return [e / total for e in exps]


def expected_calibration_error(confidences: Sequence[float], correct: Sequence[bool], bins: int = 10) -> float:
    """|accuracy - confidence| averaged over equal-width confidence bins, weighted by bin size (Guo et al.
    2017). Confidence = the probability the model gives its chosen answer, normalised over the choices."""
    n = len(confidences)
    total = 0.0
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        members = [i for i, c in enumerate(confidences) if lo < c <= hi or (b == 0 and c == 0)]
        if members:
            acc = sum(correct[i] for i in members) / len(members)
            conf = sum(confidences[i] for i in members) / len(members)
            total += len(members) / n * abs(acc - conf)
    return total


def stderr_of_mean(values: Sequence[float]) -> float:
    n = len(values)
    if n < 2:
        return 0.0
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


def _require(module: str, extra: str = "eval") -> None:
    raise LmforgeError(
        f"this metric needs {module}: `pip install {module}` (or the extra: `pip install lmforge[{extra}]`)."
    )


def bleu(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus BLEU (0-100) with sacrebleu's defaults (13a tokenizer)."""
    try:
        import sacrebleu
    except ImportError:
        _require("sacrebleu")
    width = max(len(r) for r in references)
    streams = [[r[i] if i < len(r) else r[0] for r in references] for i in range(width)]
    return float(sacrebleu.corpus_bleu(list(predictions), streams).score)


def rouge_l(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Mean ROUGE-L F1 (0-1), best over each example's references (Google's rouge-score package)."""
    try:
        from rouge_score import rouge_scorer
    except ImportError:
        _require("rouge-score")
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    scores = [
        max(scorer.score(r, p)["rougeL"].fmeasure for r in refs)
        for p, refs in zip(predictions, references, strict=True)
    ]
    return sum(scores) / len(scores)


def exact_match(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    hits = [any(p.strip() == r.strip() for r in refs) for p, refs in zip(predictions, references, strict=True)]
    return sum(hits) / len(hits)


def distinct_n(predictions: Sequence[str], n: int) -> float:
    """Unique n-grams / all n-grams over the whitespace tokens of every prediction (Li et al. 2016)."""
    grams = [tuple(words[i : i + n]) for p in predictions for words in [p.split()] for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def self_bleu(predictions: Sequence[str]) -> float:
    """Mean sentence BLEU (0-100) of each prediction against all the others (Zhu et al. 2018): lower is
    more diverse."""
    try:
        import sacrebleu
    except ImportError:
        _require("sacrebleu")
    if len(predictions) < 2:
        return 0.0
    scores = [
        sacrebleu.sentence_bleu(p, [q for j, q in enumerate(predictions) if j != i]).score
        for i, p in enumerate(predictions)
    ]
    return sum(scores) / len(scores)
