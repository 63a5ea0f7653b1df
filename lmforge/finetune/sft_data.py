"""Supervised fine-tuning data: conversations rendered in the model's chat format, loss on the assistant only.

Inputs (JSONL, one example per line):
    chat:        {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}
    instruction: {"instruction": "...", "input": "... (optional)", "output": "...", "system": "... (optional)"}

Which tokens an assistant turn owns is found by rendering the conversation up to the turn with the
generation prompt and up to the end of the turn: the difference is the turn (its text and the format's
end-of-turn token, e.g. <|eot_id|> or <|im_end|>). GLM-4 has no end-of-turn token: the model ends a turn by
emitting the next role token (<|user|>, a stop token), so that token is trained too, and EOS after the last
turn. Short examples are packed into one row with position ids restarting per example, which makes the
model attend block-diagonally (no attention across examples).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmforge.errors import LmforgeError
from lmforge.jsonl import read_jsonl
from lmforge.train.objectives import IGNORE_INDEX

ROLES = ("system", "user", "assistant", "tool", "observation")


@dataclass
class Example:
    ids: list[int]
    labels: list[int]  # IGNORE_INDEX where no loss is taken


@dataclass
class SFTReport:
    examples: int = 0
    truncated: int = 0
    skipped: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    notes: list[str] = field(default_factory=list)

    def format(self) -> str:
        return (
            f"{self.examples} examples, {self.tokens:,} tokens ({self.trained_tokens:,} assistant tokens trained); "
            f"{self.truncated} truncated, {self.skipped} skipped as longer than the sequence length"
        )


def read_conversations(path: str | Path) -> list[list[dict[str, str]]]:
    """Chat or instruction JSONL -> conversations, validated with the line number of any problem."""
    conversations = []
    for number, obj in read_jsonl(path):
        where = f"{path}:{number}"
        if "messages" in obj:
            messages = obj["messages"]
            if not isinstance(messages, list) or not messages:
                raise LmforgeError(f"{where}: 'messages' must be a non-empty list.")
            for m in messages:
                if (
                    not isinstance(m, dict)
                    or not isinstance(m.get("role"), str)
                    or not isinstance(m.get("content"), str)
                ):
                    raise LmforgeError(f"{where}: every message needs a string 'role' and a string 'content'.")
                if m["role"] not in ROLES:
                    raise LmforgeError(f"{where}: unknown role {m['role']!r}; use one of {', '.join(ROLES)}.")
            messages = [{"role": m["role"], "content": m["content"]} for m in messages]
        elif "instruction" in obj:
            for key in ("instruction", "output"):
                if not isinstance(obj.get(key), str):
                    raise LmforgeError(f"{where}: an instruction example needs a string '{key}'.")
            user = obj["instruction"] + (f"\n\n{obj['input']}" if obj.get("input") else "")
            messages = ([{"role": "system", "content": obj["system"]}] if obj.get("system") else []) + [
                {"role": "user", "content": user},
                {"role": "assistant", "content": obj["output"]},
            ]
        else:
            raise LmforgeError(
                f"{where}: expected 'messages' (chat) or 'instruction' + 'output' (instruction) fields, "
                f"got {sorted(obj)}."
            )
        if not any(m["role"] == "assistant" for m in messages):
            raise LmforgeError(f"{where}: the conversation has no assistant turn, so there is nothing to learn from.")
        conversations.append(messages)
    return conversations


def render(tokenizer: Any, messages: Sequence[dict[str, str]]) -> Example:
    """Token ids of a conversation in the tokenizer's chat format, labels on the assistant turns only."""
    ids = list(tokenizer.apply_chat_template(list(messages), add_generation_prompt=False))
    labels = [IGNORE_INDEX] * len(ids)
    stops = set(tokenizer.stop_token_ids)
    last_end, ends_with_stop = 0, False
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(list(messages[:i]), add_generation_prompt=True) if i else []
        upto = tokenizer.apply_chat_template(list(messages[: i + 1]), add_generation_prompt=False)
        if ids[: len(upto)] != upto or upto[: len(before)] != before:
            raise LmforgeError(
                "the chat template renders earlier turns differently depending on later ones, so the assistant "
                "tokens cannot be located; use a template whose output grows turn by turn."
            )
        start, end = len(before), len(upto)
        labels[start:end] = ids[start:end]
        ends_with_stop = bool(stops & set(ids[start:end]))
        if not ends_with_stop and end < len(ids) and ids[end] in stops:
            labels[end] = ids[end]  # GLM-4: the turn ends by emitting the next role token
            ends_with_stop = True
        last_end = end
    if last_end == len(ids) and not ends_with_stop:  # the conversation ends on a turn with no end token
        eos = tokenizer.eos_token_id
        if eos is None:
            raise LmforgeError("the tokenizer has no EOS token to end the last assistant turn with.")
        ids.append(eos)
        labels.append(eos)
    return Example(ids, labels)


def tokenize_conversations(
    tokenizer: Any, conversations: Sequence[list[dict[str, str]]], seq_len: int, too_long: str = "truncate"
) -> tuple[list[Example], SFTReport]:
    """Render every conversation; examples longer than seq_len are truncated (keeping the start) or skipped."""
    if too_long not in ("truncate", "skip"):
        raise LmforgeError(f"too_long must be 'truncate' or 'skip', got {too_long!r}.")
    report = SFTReport()
    examples = []
    for messages in conversations:
        ex = render(tokenizer, messages)
        if len(ex.ids) > seq_len:
            if too_long == "skip":
                report.skipped += 1
                continue
            report.truncated += 1
            ex = Example(ex.ids[:seq_len], ex.labels[:seq_len])
        if all(label == IGNORE_INDEX for label in ex.labels):
            report.skipped += 1  # truncation removed every assistant token
            continue
        examples.append(ex)
        report.tokens += len(ex.ids)
        report.trained_tokens += sum(label != IGNORE_INDEX for label in ex.labels)
    report.examples = len(examples)
    if not examples:
        raise LmforgeError(f"no usable examples ({report.format()}); raise --seq-len or check the data.")
    return examples, report


class SFTLoader:
    """Batches of rows [B, T]; each row packs whole examples (or holds one, right-padded, with pack=False).

    Examples are visited once per epoch in a seeded order; state_dict/load_state_dict resume exactly.
    Labels are shifted here: row position t predicts token t+1."""

    def __init__(
        self,
        examples: list[Example],
        batch_size: int,
        seq_len: int,
        pad_id: int,
        seed: int = 0,
        pack: bool = True,
        shuffle: bool = True,
    ) -> None:
        self.examples, self.batch_size, self.seq_len = examples, batch_size, seq_len
        self.pad_id, self.seed, self.pack, self.shuffle = pad_id, seed, pack, shuffle
        self.epoch, self.cursor = 0, 0

    def _order(self, epoch: int) -> np.ndarray:
        n = len(self.examples)
        return np.random.default_rng((self.seed, epoch)).permutation(n) if self.shuffle else np.arange(n)

    def _position(self, offset: int = 0) -> tuple[int, int]:
        """(epoch, index) of the example `offset` places after the cursor."""
        index = self.cursor + offset
        return self.epoch + index // len(self.examples), index % len(self.examples)

    def _example_at(self, offset: int = 0) -> Example:
        epoch, index = self._position(offset)
        return self.examples[int(self._order(epoch)[index])]

    def _next_example(self) -> Example:
        ex = self._example_at()
        self.epoch, self.cursor = self._position(1)
        return ex

    def _row(self) -> tuple[list[int], list[int], list[int]]:
        # One more token than seq_len: inputs are row[:-1], labels row[1:].
        ids, labels, positions = [], [], []
        while True:
            ex = self._next_example()
            ids += ex.ids
            labels += ex.labels
            positions += list(range(len(ex.ids)))
            if not self.pack or len(ids) + len(self._example_at().ids) > self.seq_len + 1:
                break
        pad = self.seq_len + 1 - len(ids)
        ids += [self.pad_id] * pad
        labels += [IGNORE_INDEX] * pad
        positions += list(range(pad))  # padding is its own "document": it never sees the examples
        return ids[: self.seq_len + 1], labels[: self.seq_len + 1], positions[: self.seq_len + 1]

    def __iter__(self) -> SFTLoader:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        rows = [self._row() for _ in range(self.batch_size)]
        ids = torch.tensor([r[0] for r in rows])
        labels = torch.tensor([r[1] for r in rows])
        positions = torch.tensor([r[2] for r in rows])
        return {"input_ids": ids[:, :-1], "labels": labels[:, 1:], "position_ids": positions[:, :-1]}

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "cursor": self.cursor, "seed": self.seed, "examples": len(self.examples)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("examples") != len(self.examples) or state.get("seed") != self.seed:
            raise LmforgeError("the fine-tuning data or seed changed since the checkpoint; resume with the same ones.")
        self.epoch, self.cursor = state["epoch"], state["cursor"]


def eval_batches(examples: list[Example], batch_size: int, seq_len: int, pad_id: int):
    """Every example exactly once, one per row, in order (for validation loss)."""
    for start in range(0, len(examples), batch_size):
        loader = SFTLoader(examples[start : start + batch_size], batch_size, seq_len, pad_id, pack=False, shuffle=False)
        batch = next(loader)
        n = min(batch_size, len(examples) - start)
        yield {k: v[:n] for k, v in batch.items()}
