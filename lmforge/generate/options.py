"""Generation options, named as in transformers' GenerationConfig, validated on construction."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from lmforge.errors import LmforgeError, suggest


@dataclass(frozen=True)
class GenerationOptions:
    """What to generate and how. Defaults: greedy, 32 new tokens, no filtering.

    Unlike transformers (whose GenerationConfig defaults to top_k=50), no filter is on unless asked for;
    temperature 0 means greedy, as in the OpenAI API and vLLM.
    """

    max_new_tokens: int = 32
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    min_p: float = 0.0  # 0: off
    typical_p: float = 1.0  # 1: off
    repetition_penalty: float = 1.0  # 1: off (CTRL, Keskar et al. 2019)
    no_repeat_ngram_size: int = 0  # 0: off
    num_beams: int = 1
    length_penalty: float = 1.0  # beam score = sum logprob / length ** length_penalty
    early_stopping: bool | str = False  # beam search: True, False or "never", as in transformers
    num_return_sequences: int = 1
    eos_token_id: tuple[int, ...] | None = None  # None: the model's eos ids
    stop_strings: tuple[str, ...] = ()
    seed: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.eos_token_id, int):
            object.__setattr__(self, "eos_token_id", (self.eos_token_id,))
        elif self.eos_token_id is not None:
            object.__setattr__(self, "eos_token_id", tuple(int(t) for t in self.eos_token_id))
        if isinstance(self.stop_strings, str):
            object.__setattr__(self, "stop_strings", (self.stop_strings,))
        else:
            object.__setattr__(self, "stop_strings", tuple(self.stop_strings))
        if self.do_sample and self.temperature == 0:
            object.__setattr__(self, "do_sample", False)  # temperature 0 is greedy
        checks = [
            (self.max_new_tokens > 0, f"max_new_tokens must be positive, got {self.max_new_tokens}"),
            (self.temperature >= 0, f"temperature must be >= 0 (0 is greedy), got {self.temperature}"),
            (self.top_k >= 0, f"top_k must be >= 0 (0 is off), got {self.top_k}"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p}"),
            (0 < self.typical_p <= 1, f"typical_p must be in (0, 1], got {self.typical_p}"),
            (self.repetition_penalty > 0, f"repetition_penalty must be > 0 (1 is off), got {self.repetition_penalty}"),
            (self.no_repeat_ngram_size >= 0, f"no_repeat_ngram_size must be >= 0, got {self.no_repeat_ngram_size}"),
            (self.num_beams >= 1, f"num_beams must be >= 1, got {self.num_beams}"),
            (self.num_return_sequences >= 1, f"num_return_sequences must be >= 1, got {self.num_return_sequences}"),
            (self.early_stopping in (True, False, "never"), "early_stopping must be true, false or 'never'"),
        ]
        for ok, message in checks:
            if not ok:
                raise LmforgeError(message + ".")
        if self.num_beams > 1 and self.do_sample:
            raise LmforgeError("beam sampling is not supported: use num_beams > 1 with do_sample=False, or sampling.")
        if self.num_beams > 1 and self.num_return_sequences > self.num_beams:
            raise LmforgeError(
                f"num_return_sequences ({self.num_return_sequences}) cannot exceed num_beams ({self.num_beams})."
            )
        if self.num_beams == 1 and not self.do_sample and self.num_return_sequences > 1:
            raise LmforgeError("greedy decoding returns one sequence per prompt; sample or use beams for more.")

    @classmethod
    def from_kwargs(cls, **options: Any) -> GenerationOptions:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            hints = "".join(suggest(k, known) for k in unknown)
            raise LmforgeError(f"unknown generation options {unknown}.{hints} Known: {', '.join(sorted(known))}.")
        return cls(**options)
