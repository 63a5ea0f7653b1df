"""A fine-tuning task every machine has data for: summarise a Python function in one line.

From the standard library's functions with docstrings: the instruction holds the function without its
docstring (unparsed from the AST, cut to a few hundred characters), the answer is the docstring's first
line. Preference pairs put the right first line against another function's. Functions are split into
training and held-out sets by a hash of their file's path, so held-out functions come from files no
fine-tuning example was taken from.
"""

from __future__ import annotations

import ast
import copy
import json
import random
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

INSTRUCTION = "Summarize this Python function in one line:\n"


@dataclass(frozen=True)
class Function:
    file: str
    code: str  # without the docstring
    summary: str  # the docstring's first line


def functions_in(path: Path, max_code_chars: int = 300) -> list[Function]:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return []
    out = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        doc = ast.get_docstring(node)
        if not doc:
            continue
        summary = doc.strip().splitlines()[0].strip()
        if not 12 <= len(summary) <= 90:
            continue
        bare = copy.deepcopy(node)
        bare.body = bare.body[1:] or [ast.Pass()]  # drop the docstring statement
        try:
            code = ast.unparse(bare)
        except (ValueError, AttributeError, RecursionError):
            continue
        if len(code) > max_code_chars:
            code = code[:max_code_chars].rsplit("\n", 1)[0] + "\n    ..."
        out.append(Function(str(path), code, summary))
    return out


def is_held_out(fn: Function, share: int = 10) -> bool:
    return zlib.crc32(fn.file.encode()) % share == 0


def user_message(fn: Function) -> str:
    return INSTRUCTION + fn.code


@dataclass
class DocstringTask:
    sft: Path  # instruction JSONL
    dpo: Path  # preference JSONL
    eval_generation: Path  # held-out: prompt (chat-rendered) -> reference summary
    eval_preference: Path  # held-out: two choices, the right summary first or second
    train_functions: int
    held_out_functions: int


def build_task(
    files: list[Path], tokenizer: Any, out: Path, max_train: int = 3000, max_eval: int = 200, seed: int = 0
) -> DocstringTask:
    """Write the four JSONL files of the demo into `out`."""
    rng = random.Random(seed)
    functions = [fn for f in files for fn in functions_in(f)]
    train = [fn for fn in functions if not is_held_out(fn)]
    held = [fn for fn in functions if is_held_out(fn)]
    rng.shuffle(train)
    rng.shuffle(held)
    train, held = train[:max_train], held[:max_eval]
    out.mkdir(parents=True, exist_ok=True)

    def write(name: str, rows: list[dict]) -> Path:
        path = out / name
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return path

    def chat_prompt(fn: Function) -> str:
        return tokenizer.apply_chat_template([{"role": "user", "content": user_message(fn)}], tokenize=False)

    def other(fn: Function, pool: list[Function]) -> str:
        while True:
            pick = rng.choice(pool)
            if pick.summary != fn.summary:
                return pick.summary

    sft = write("sft.jsonl", [{"instruction": user_message(fn), "output": fn.summary} for fn in train])
    dpo = write(
        "dpo.jsonl", [{"prompt": user_message(fn), "chosen": fn.summary, "rejected": other(fn, train)} for fn in train]
    )
    gen = write("eval_generation.jsonl", [{"prompt": chat_prompt(fn), "reference": fn.summary} for fn in held])
    pref_rows = []
    for fn in held:
        choices = [fn.summary, other(fn, held)]
        answer = rng.randrange(2)
        if answer:
            choices.reverse()
        pref_rows.append({"context": chat_prompt(fn), "choices": choices, "answer": answer})
    pref = write("eval_preference.jsonl", pref_rows)
    return DocstringTask(sft, dpo, gen, pref, len(train), len(held))
