"""Task files: multiple-choice and generation JSONL, read with errors that name the line.

multiple choice: {"question": "...", "choices": ["...", ...], "answer": 0}   (or "context" used verbatim)
generation:      {"prompt": "...", "reference": "..." or ["...", ...]}
perplexity:      any other text file (or JSONL with "text"), or a directory made by `lmforge prepare`
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from pathlib import Path

from lmforge.errors import LmforgeError
from lmforge.jsonl import read_jsonl


@dataclass(frozen=True)
class ChoiceExample:
    context: str  # what precedes every choice (already templated)
    choices: tuple[str, ...]
    answer: int
    shot_text: str  # this example written as a solved few-shot demonstration


@dataclass(frozen=True)
class GenerationExample:
    prompt: str
    references: tuple[str, ...]


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def detect_task_type(path: Path) -> str:
    """'choice', 'generation' or 'perplexity', from the fields of the first example (or the file kind)."""
    if path.is_dir():
        return "perplexity"
    if path.suffix != ".jsonl":
        return "perplexity"
    _, first = read_jsonl(path)[0]
    if "choices" in first:
        return "choice"
    if "prompt" in first:
        return "generation"
    if "text" in first:
        return "perplexity"
    raise LmforgeError(
        f"{path}: cannot tell the task type from the fields {sorted(first)}; multiple-choice examples have "
        "'question'/'context', 'choices' and 'answer', generation examples 'prompt' and 'reference', "
        "text for perplexity 'text'."
    )


def _text(path: Path, number: int, obj: dict, key: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str):
        raise LmforgeError(f"{path}:{number}: '{key}' must be a string, got {value!r}.")
    return value


def load_choice_task(path: Path) -> list[ChoiceExample]:
    examples = []
    for number, obj in read_jsonl(path):
        if "context" in obj:
            context = _text(path, number, obj, "context")
        elif "question" in obj:
            context = f"Question: {_text(path, number, obj, 'question')}\nAnswer:"
        else:
            raise LmforgeError(f"{path}:{number}: a multiple-choice example needs 'question' or 'context'.")
        choices = obj.get("choices")
        if not isinstance(choices, list) or not choices:
            raise LmforgeError(f"{path}:{number}: 'choices' must be a non-empty list of strings.")
        if not all(isinstance(c, str) and c for c in choices):
            raise LmforgeError(f"{path}:{number}: every choice must be a non-empty string.")
        answer = obj.get("answer")
        if not isinstance(answer, int) or isinstance(answer, bool):
            raise LmforgeError(f"{path}:{number}: 'answer' must be the index of the right choice, got {answer!r}.")
        if not 0 <= answer < len(choices):
            raise LmforgeError(
                f"{path}:{number}: answer index {answer} is out of range for {len(choices)} choices (0-based)."
            )
        # The continuation is " {choice}" when the context ends in a word, as in lm-evaluation-harness tasks.
        sep = "" if context.endswith((" ", "\n")) else " "
        choices_t = tuple(sep + c for c in choices)
        examples.append(ChoiceExample(context, choices_t, answer, context + choices_t[answer]))
    return examples


def load_generation_task(path: Path) -> list[GenerationExample]:
    examples = []
    for number, obj in read_jsonl(path):
        prompt = _text(path, number, obj, "prompt")
        ref = obj.get("reference", obj.get("references"))
        refs = (ref,) if isinstance(ref, str) else tuple(ref) if isinstance(ref, list) else ()
        if not refs or not all(isinstance(r, str) for r in refs):
            raise LmforgeError(f"{path}:{number}: 'reference' must be a string or a list of strings.")
        examples.append(GenerationExample(prompt, refs))
    return examples


def load_texts(path: Path, text_field: str = "text") -> list[str]:
    if path.suffix == ".jsonl":
        return [_text(path, n, obj, text_field) for n, obj in read_jsonl(path)]
    try:
        return [path.read_text(encoding="utf-8")]
    except UnicodeDecodeError:
        raise LmforgeError(f"{path} is not UTF-8 text.") from None


def with_fewshot(example: ChoiceExample, shots: list[ChoiceExample], k: int, rng: random.Random) -> str:
    """The example's context preceded by k solved examples drawn (without replacement) from `shots`."""
    if k == 0:
        return example.context
    if k > len(shots):
        raise LmforgeError(f"--num-fewshot {k} needs at least {k} few-shot examples; the split has {len(shots)}.")
    chosen = rng.sample(shots, k)
    return "\n\n".join(s.shot_text for s in chosen) + "\n\n" + example.context
