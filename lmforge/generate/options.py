"""Generation options, named as in transformers' GenerationConfig, validated on construction."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from lmforge.errors import LmforgeError, suggest
from lmforge.options import option, validate


@dataclass(frozen=True)
class GenerationOptions:
    """What to generate and how. Defaults: greedy, 32 new tokens, no filtering.

    Unlike transformers (whose GenerationConfig defaults to top_k=50), no filter is on unless asked for;
    temperature 0 means greedy, as in the OpenAI API and vLLM.
    """

    max_new_tokens: int = option(32, "tokens to generate at most")
    do_sample: bool = option(False, "sample instead of taking the most likely token")
    temperature: float = option(1.0, "divide the logits by this before sampling (0: greedy)")
    top_k: int = option(0, "sample among the k most likely tokens only (0: off)")
    top_p: float = option(1.0, "nucleus sampling: the smallest set of tokens with this much probability (1: off)")
    min_p: float = option(0.0, "drop tokens less likely than min_p times the most likely one (0: off)")
    typical_p: float = option(1.0, "locally typical sampling mass (1: off)")
    repetition_penalty: float = option(1.0, "CTRL penalty on tokens already present (1: off; Keskar et al. 2019)")
    no_repeat_ngram_size: int = option(0, "never repeat an n-gram of this size (0: off)")
    num_beams: int = option(1, "beam search with this many beams (1: off)")
    length_penalty: float = option(1.0, "beam score = sum of log-probs / length ** length_penalty")
    early_stopping: bool | str = option(
        False, "beam search stops: true (once enough beams end), false or never", choices=(True, False, "never")
    )
    num_return_sequences: int = option(1, "sequences to return per prompt")
    eos_token_id: tuple[int, ...] | None = option(None, "ids that end a sequence (default: the model's eos ids)")
    stop_strings: tuple[str, ...] = option((), "stop once the text contains this string (repeatable)", split=False)
    seed: int | None = option(None, "seed of the sampler")

    def __post_init__(self) -> None:
        validate(self)
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
